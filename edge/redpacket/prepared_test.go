package redpacket

import (
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist"
)

// holdWallet runs a rain's prepare op, then takes the service's mutex
// before answering (held is closed then): the test holds it as a start or
// cancel would at that moment, and looks at what they would find.
type holdWallet struct {
	*persist.Ledger
	svc  *Service
	held chan struct{}
}

func (w *holdWallet) Apply(op persist.Op) (persist.Result, error) {
	res, err := w.Ledger.Apply(op)
	if strings.HasPrefix(op.ReqID, "rp-prep:") {
		w.svc.mu.Lock()
		close(w.held)
	}
	return res, err
}

// A rain that a start or cancel can see PREPARED and no longer busy is
// already its room's prepared rain. Before, prepare ended the rain's busy
// mark and only then, under the service's lock, named it the room's: a
// start (or cancel) in between took it out of prepared before it was put
// there, and room info then showed a dead rain.
func TestPreparedRainIsTheRoomsOnceNotBusy(t *testing.T) {
	n := newPendingNode(t)
	w := &holdWallet{Ledger: n.l, held: make(chan struct{})}
	n.start(t, w)
	w.svc = n.svc
	code := n.create(t, 1000, 10)
	r := n.svc.get(code)
	done := make(chan error, 1)
	go func() { _, err := n.svc.Prepare(shardAnchor, code); done <- err }()
	<-w.held // the service's mutex is the test's now
	// Not busy can only be seen once the prepare is over; give it time to
	// get there (it never does here while the test holds the lock).
	released := false
	for deadline := time.Now().Add(500 * time.Millisecond); time.Now().Before(deadline) && !released; time.Sleep(time.Millisecond) {
		r.mu.Lock()
		busy, state := r.busy, r.rec.State
		r.mu.Unlock()
		if !busy {
			prepared := n.svc.prepared[shardRoom]
			n.svc.mu.Unlock()
			released = true
			if state == StatePrepared && prepared != code {
				<-done
				t.Fatalf("the rain is PREPARED and not busy, the room's prepared rain is %q: a start or cancel now leaves room info on a dead rain", prepared)
			}
		}
	}
	if !released {
		n.svc.mu.Unlock()
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, prepared := n.svc.Codes(shardRoom); prepared != code {
		t.Fatalf("prepared %q, want %q", prepared, code)
	}
	if _, err := n.svc.Start(shardAnchor, code); err != nil {
		t.Fatal(err)
	}
	if running, prepared := n.svc.Codes(shardRoom); running != code || prepared != "" {
		t.Fatalf("after the start: running %q, prepared %q", running, prepared)
	}
}
