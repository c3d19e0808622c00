package redpacket

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist"
)

// forgetfulWallet answers the first op whose request id starts with prefix
// "in progress" without applying it, and keeps it (the shared wallet's
// watcher lands it later: land). Once forget is set, every later op with
// that prefix reaches the ledger under a request id it never saw: the
// original's idempotency record has expired (a day later).
type forgetfulWallet struct {
	*persist.Ledger
	prefix string

	mu     sync.Mutex
	held   *persist.Op
	forget bool
}

func (w *forgetfulWallet) take(op *persist.Op) (hold bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !strings.HasPrefix(op.ReqID, w.prefix) {
		return false
	}
	if w.held == nil {
		w.held = op
		return true
	}
	if w.forget {
		op.ReqID += "/after-its-idempotency-expired"
	}
	return false
}

func (w *forgetfulWallet) Apply(op persist.Op) (persist.Result, error) {
	if w.take(&op) {
		return persist.Result{}, persist.ErrInProgress
	}
	return w.Ledger.Apply(op)
}

func (w *forgetfulWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	if w.take(&op) {
		done(persist.Result{}, persist.ErrInProgress)
		return
	}
	w.Ledger.ApplyAsync(op, done)
}

// land applies the held op (the watcher found it ran) and makes the wallet
// forget its request id from then on.
func (w *forgetfulWallet) land(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	op := w.held
	w.forget = true
	w.mu.Unlock()
	if op == nil {
		t.Fatal("no op held")
	}
	if _, err := w.Ledger.Apply(*op); err != nil {
		t.Fatal(err)
	}
}

// An op of a rain answered in doubt that the wallet then found ran is not
// sent again when it is retried later — by then (a day) its request id's
// idempotency record may be gone, and the op would run a second time: the
// anchor's T debited twice by a retried prepare, refunded twice by a
// retried cancel, a grabber credited twice by a grant in doubt re-applied
// at the rain's end. Each case checks the balances and the ledger's audit.
func TestOpsInDoubtThatRanAreNotSentAgain(t *testing.T) {
	t.Run("prepare", func(t *testing.T) {
		n := newPendingNode(t) // the anchor has 1,000
		fund(t, n, 1000)
		w := &forgetfulWallet{Ledger: n.l, prefix: "rp-prep:"}
		n.start(t, w)
		code := n.create(t, 1000, 10)
		if _, err := n.svc.Prepare(shardAnchor, code); err == nil {
			t.Fatal("prepare answered ok, want it in doubt")
		}
		w.land(t)
		v, err := n.svc.Prepare(shardAnchor, code)
		if err != nil || v.State != StatePrepared {
			t.Fatalf("retried prepare: %+v %v", v, err)
		}
		if b := n.balance(t); b != 1000 {
			t.Fatalf("anchor balance %d after the retried prepare, want 1000 (T debited once)", b)
		}
		if fin, err := n.svc.Cancel(shardAnchor, code); err != nil || fin.Refunded != 1000 {
			t.Fatalf("cancel: %+v %v", fin, err)
		}
		if b := n.balance(t); b != 2000 {
			t.Fatalf("anchor balance %d after the cancel, want 2000", b)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		n := newPendingNode(t)
		w := &forgetfulWallet{Ledger: n.l, prefix: "rp-end:"}
		n.start(t, w)
		code := n.create(t, 1000, 10)
		if _, err := n.svc.Prepare(shardAnchor, code); err != nil {
			t.Fatal(err)
		}
		if _, err := n.svc.Cancel(shardAnchor, code); err == nil {
			t.Fatal("cancel answered ok, want it in doubt")
		}
		w.land(t)
		fin, err := n.svc.Cancel(shardAnchor, code)
		if err != nil || fin.State != StateFinished || fin.Refunded != 1000 {
			t.Fatalf("retried cancel: %+v %v", fin, err)
		}
		if b := n.balance(t); b != 1000 {
			t.Fatalf("anchor balance %d after the retried cancel, want 1000 (T refunded once)", b)
		}
	})
	t.Run("grant", func(t *testing.T) {
		n := newPendingNode(t)
		w := &forgetfulWallet{Ledger: n.l, prefix: "rp:"}
		n.start(t, w)
		code := n.running(t, 200, 2, time.Second) // ends with a grant in doubt
		if _, perr := n.svc.Grab(100, code); perr == nil {
			t.Fatal("first grab answered ok, want it in doubt")
		}
		w.land(t)
		if _, perr := n.svc.Grab(101, code); perr != nil {
			t.Fatal(perr)
		}
		if fin := n.finished(t, code); fin.GrantedCount != 2 || fin.GrantedAmount != 200 || fin.Refunded != 0 {
			t.Fatalf("finished %+v", fin)
		}
		var users int64
		for _, u := range []int64{100, 101} {
			b, err := n.l.Balance(u)
			if err != nil {
				t.Fatal(err)
			}
			users += b
		}
		if users != 200 {
			t.Fatalf("grabbers hold %d, want the rain's 200 (each packet credited once)", users)
		}
		if b := n.balance(t); b != 800 {
			t.Fatalf("anchor balance %d, want 800", b)
		}
	})
}

// fund credits the anchor amount more.
func fund(t *testing.T, n *pendingNode, amount int64) {
	t.Helper()
	if _, err := n.l.Apply(persist.Op{Postings: []persist.Posting{{User: shardAnchor, Delta: amount, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
}

// A rain still RUNNING past its end (its settlement waits for a holder
// that is down) keeps its room: each renewal's claim lasts roomKeep past
// the renewal, not past the rain's end — which, once passed, let the claim
// lapse and another rain start in the room.
func TestRoomClaimRenewedPastTheEnd(t *testing.T) {
	n := newPendingNode(t)
	now := time.Now()
	var until int64
	n.startWith(t, n.l, func(c *Config) {
		c.Now = func() time.Time { return now }
		c.RoomRun = func(_ context.Context, _ int64, _ string, u int64) (bool, error) { until = u; return true, nil }
	})
	rec := record{Code: "c", Room: shardRoom, EndsAt: now.UnixMilli()}
	for _, late := range []time.Duration{0, time.Hour} {
		now = time.UnixMilli(rec.EndsAt).Add(late)
		if err := n.svc.roomRun(context.Background(), rec); err != nil {
			t.Fatal(err)
		}
		if want := now.Add(roomKeep).UnixMilli(); until != want {
			t.Fatalf("%v past the end: claimed until %v, want %v", late, time.UnixMilli(until), time.UnixMilli(want))
		}
	}
}

// A holder that gave back every packet it was leased and granted none is
// forgotten some time after the rain's end even when its close never came
// (the owner settles without it: it has nothing out there). Before, it was
// looked at again every minute for the life of the process.
func TestEmptiedShardForgottenWithoutItsClose(t *testing.T) {
	n := newPendingNode(t)
	now := time.Now()
	n.startWith(t, n.l, func(c *Config) { c.Now = func() time.Time { return now } })
	sh := n.svc.shardOf("emptied", "n2")
	sh.mu.Lock()
	sh.ready, sh.held, sh.endsAt = true, true, now.UnixMilli()
	sh.mu.Unlock()
	forgotten := func() bool {
		n.svc.sweepShard(sh)
		n.svc.mu.Lock()
		defer n.svc.mu.Unlock()
		return n.svc.shards["emptied"] == nil
	}
	if forgotten() {
		t.Fatal("forgotten at the rain's end, before its close could come")
	}
	now = now.Add(tombstoneTTL)
	if !forgotten() {
		t.Fatal("an emptied holder never closed is kept after the tombstone time")
	}
	// One still holding a packet (or with grants: the same index bits) is
	// kept until its close.
	sh2 := n.svc.shardOf("holding", "n2")
	sh2.mu.Lock()
	sh2.ready, sh2.held, sh2.endsAt = true, true, now.Add(-tombstoneTTL).UnixMilli()
	sh2.mine.set(3)
	sh2.mu.Unlock()
	n.svc.sweepShard(sh2)
	n.svc.mu.Lock()
	kept := n.svc.shards["holding"] != nil
	n.svc.mu.Unlock()
	if !kept {
		t.Fatal("a holder with a packet forgotten before its close")
	}
}
