package redpacket

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
)

// codesUnder lists the codes of st's records with prefix.
func codesUnder(t *testing.T, st *persist.Store, prefix []byte) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	if err := st.Scan(prefix, func(k, _ []byte) error { out[string(k[len(prefix):])] = true; return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// A finished rain's record moves to rec/rpdone/, so a start reads only the
// unfinished ones (waiting, running) in rec/rp/; a FINISHED record left
// there (a crash right after the settlement, an older version's) is moved
// at the next start; finished rains are still read by GET.
func TestFinishedRainsMoveOutOfTheStartScan(t *testing.T) {
	c := newCluster(t, "n1")
	m := c.nodes["n1"]
	if _, err := m.ledger.Apply(persist.Op{Postings: []persist.Posting{{User: shardAnchor, Delta: 1000, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	waiting, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cancelled, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.svc.Cancel(shardAnchor, cancelled.Code); err != nil {
		t.Fatal(err)
	}
	settled := c.rain(t, "n1", 100, 1, time.Hour)
	if _, err := c.grab("n1", "n1", 5, settled); err != nil { // the only packet: the rain settles
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if v, _ := m.svc.Get(settled); v.State == StateFinished {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the one-packet rain did not settle")
		}
	}
	running := c.rain(t, "n1", 100, 10, time.Hour)
	check := func(when string) {
		t.Helper()
		if got := codesUnder(t, m.store, prefixRain); len(got) != 2 || !got[waiting.Code] || !got[running] {
			t.Fatalf("%s: rec/rp/ holds %v, want the waiting and the running rain", when, got)
		}
		if got := codesUnder(t, m.store, prefixDone); len(got) != 2 || !got[cancelled.Code] || !got[settled] {
			t.Fatalf("%s: rec/rpdone/ holds %v", when, got)
		}
		s := m.svc
		s.mu.RLock()
		n := len(s.rains)
		s.mu.RUnlock()
		if n != 2 || s.get(waiting.Code) == nil || s.get(running) == nil {
			t.Fatalf("%s: %d rains in memory", when, n)
		}
		for _, code := range []string{cancelled.Code, settled} {
			if v, err := s.Get(code); err != nil || v.State != StateFinished {
				t.Fatalf("%s: finished rain %s: %+v %v", when, code, v, err)
			}
		}
		if v, err := s.Get(settled); err != nil || v.GrantedCount != 1 || v.GrantedAmount != 100 {
			t.Fatalf("%s: settled rain %+v %v", when, v, err)
		}
	}
	check("running")
	restart := func() {
		t.Helper()
		m.stop()
		c.start(t, "n1", m.dir)
		m = c.nodes["n1"]
	}
	restart()
	check("restart")
	// The settled rain's record as a crash before the move (or an older
	// version) leaves it: FINISHED in rec/rp/ only.
	b, err := m.store.Get(doneKey(settled))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.store.Put(rainKey(settled), b); err != nil {
		t.Fatal(err)
	}
	if err := m.store.Delete(doneKey(settled)); err != nil {
		t.Fatal(err)
	}
	if v, err := m.svc.Get(settled); err != nil || v.State != StateFinished {
		t.Fatalf("a finished record not moved yet: %+v %v", v, err)
	}
	restart()
	check("restart after a FINISHED record was left in rec/rp/")
	if _, err := c.grab("n1", "n1", 6, running); err != nil { // the running rain still grants
		t.Fatal(err)
	}
}

// A rain cancelled while it waits frees its anchor's slot at once, and each
// leaves a durable record: without a creation rate a create/cancel loop
// wrote records without bound (no coins needed). Past CreateBurst creations
// in a minute: 10429, nothing written.
func TestCreateCancelLoopIsRateLimited(t *testing.T) {
	c := newCluster(t, "n1")
	m := c.nodes["n1"]
	for i := 0; i < CreateBurst; i++ {
		v, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour)
		if err != nil {
			t.Fatalf("rain %d: %v", i, err)
		}
		if _, err := m.svc.Cancel(shardAnchor, v.Code); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour); proto.AsError(err).Code != proto.CodeRateLimited {
		t.Fatalf("rain %d in the minute: %v, want 10429", CreateBurst+1, err)
	}
	if got := len(codesUnder(t, m.store, prefixRain)) + len(codesUnder(t, m.store, prefixDone)); got != CreateBurst {
		t.Fatalf("%d rain records, want %d", got, CreateBurst)
	}
}

// An anchor's rains are counted on every node (Config.SharedCreates, in
// Redis): a create/cancel loop spread over two nodes gets CreateBurst in the
// minute between them, not CreateBurst on each.
func TestCreateRateCountedAcrossNodes(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	names := []string{"n1", "n2"}
	c := newClusterLimited(t, limit.NewShared(rdb, "rpnew", DefaultCreatesPerMinute, time.Minute, CreateBurst), names...)
	for i := 0; i < CreateBurst; i++ {
		m := c.nodes[names[i%2]]
		v, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour)
		if err != nil {
			t.Fatalf("rain %d: %v", i, err)
		}
		if _, err := m.svc.Cancel(shardAnchor, v.Code); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range names {
		if _, err := c.nodes[n].svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour); proto.AsError(err).Code != proto.CodeRateLimited {
			t.Fatalf("rain %d in the minute through %s: %v, want 10429", CreateBurst+1, n, err)
		}
	}
}

// An anchor at max_per_anchor whose creates are refused (10409) does not
// spend the cluster-wide creation rate: once a rain ends, its next create
// goes through. Before, each refused retry spent a token, and after a few
// the real create got 10429 for up to a minute.
func TestRefusedCreatesSpendNoClusterRate(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	c := newClusterLimited(t, limit.NewShared(rdb, "rpnew", DefaultCreatesPerMinute, time.Minute, CreateBurst), "n1")
	m := c.nodes["n1"]
	m.svc.cfg.MaxPerAnchor = 1
	v, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2*CreateBurst; i++ {
		if _, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour); proto.AsError(err).Code != proto.CodeConflict {
			t.Fatalf("create %d over max_per_anchor: %v, want 10409", i+2, err)
		}
	}
	if _, err := m.svc.Cancel(shardAnchor, v.Code); err != nil {
		t.Fatal(err)
	}
	if _, err := m.svc.Create(shardAnchor, shardRoom, 100, 10, time.Hour); err != nil {
		t.Fatalf("the create once the rain is over: %v, want ok (the refused ones spent nothing)", err)
	}
}
