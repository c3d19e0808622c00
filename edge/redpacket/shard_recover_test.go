package redpacket

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// drain grabs code with fresh users through nodes in turn until the owner
// answers "none left" (a "retry" answer — a holder lagging or being asked
// what it has — is retried), and returns the grants it got.
func (c *cluster) drain(t *testing.T, owner, code string, nodes []string, user int64) int {
	t.Helper()
	got := 0
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; ; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("not drained after 30 s (%d grants)", got)
		}
		_, err := c.grab(nodes[i%len(nodes)], owner, user, code)
		switch {
		case err == nil:
			got++
			user++
		case err.Code == proto.CodeRedPacketEmpty:
			if nodes[i%len(nodes)] == owner {
				return got
			}
		case err.Code == proto.CodeInternal:
			time.Sleep(20 * time.Millisecond)
		default:
			t.Fatalf("grab: %v", err)
		}
	}
}

// A holder restarts mid-rain (its slice was in its memory only): the owner
// asks the new process what that node has — nothing in memory, its earlier
// grants in its Pebble — and puts the rest of the old slice back into its
// pool, so every packet is granted (none refunded while viewers still
// grab), each once, the earlier grants counted once. The restarted node
// grants again from new slices.
func TestShardedRainHolderRestartRecovered(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	const count, total = 200, 20_000
	code := c.rain(t, "n1", total, count, time.Hour)
	for u := int64(1); u <= 10; u++ {
		if _, err := c.grab("n2", "n1", u, code); err != nil {
			t.Fatal(err)
		}
	}
	m := c.kill("n2") // its unused slice is lost with its memory
	c.start(t, "n2", m.dir)
	got := 10 + c.drain(t, "n1", code, []string{"n1", "n2", "n3"}, 100)
	if got != count {
		t.Fatalf("%d of %d packets granted after the holder's restart", got, count)
	}
	v := c.conserve(t, "n1", code, total)
	if v.GrantedCount != count || v.Refunded != 0 {
		t.Fatalf("view %+v: the restarted holder's slice was not put back", v)
	}
	if _, per := c.grants(t, code); per["n2"] <= 10 {
		t.Fatalf("the restarted holder granted nothing new: %v", per)
	}
}

// A holder restarted mid-rain (no slice in its memory) is closed by the
// rain's settlement, which makes it a closed slice it never had ready: a
// grab through it answers 30003 "none left", as through any other node —
// not 50000 "unreachable, retry", which its viewers would retry for the
// closed slice's 10 minutes.
func TestRestartedHolderClosedBySettlementAnswersNoneLeft(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	const count, total = 20, 2_000
	code := c.rain(t, "n1", total, count, 2*time.Second)
	for u := int64(1); u <= 3; u++ {
		if _, err := c.grab("n2", "n1", u, code); err != nil {
			t.Fatal(err)
		}
	}
	m := c.kill("n2")
	c.start(t, "n2", m.dir)
	c.conserve(t, "n1", code, total) // waits for FINISHED (ends_at passes)
	for _, n := range []string{"n2", "n3"} {
		owner, _ := c.svc(n).ShardOwner(code)
		if owner == "" {
			owner = "n1"
		}
		if _, perr := c.svc(n).GrabVia(owner, 50, code); perr == nil || perr.Code != proto.CodeRedPacketEmpty {
			t.Fatalf("grab through %s of the finished rain: %v, want 30003", n, perr)
		}
	}
}

// A lease answer lost on its way to the holder (built and recorded on the
// owner, the holder's call timed out): once no answer can still arrive, the
// owner finds those packets missing at the holder and pools them again.
func TestShardedRainLostLeaseAnswerRecovered(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const count, total = 100, 10_000
	code := c.rain(t, "n1", total, count, time.Hour)
	if _, err := c.grab("n2", "n1", 1, code); err != nil { // the first slice arrives
		t.Fatal(err)
	}
	c.lose.Store(1)
	u := int64(2)
	for c.lose.Load() > 0 { // until a lease answer is lost (n2's slice ran low)
		if _, err := c.grab("n2", "n1", u, code); err != nil && err.Code != proto.CodeInternal {
			t.Fatal(err)
		}
		u++
	}
	got := 0
	_ = c.nodes["n2"].store.Scan(grantPrefix(code), func(_, _ []byte) error { got++; return nil })
	got += c.drain(t, "n1", code, []string{"n1", "n2"}, 1000)
	if got != count {
		t.Fatalf("%d of %d packets granted after a lost lease answer", got, count)
	}
	v := c.conserve(t, "n1", code, total)
	if v.GrantedCount != count || v.Refunded != 0 {
		t.Fatalf("view %+v: the lost answer's packets were not pooled again", v)
	}
}

// The bitmap of RecoverRep.Has: bit i of byte i/8.
func TestRecoverBitmap(t *testing.T) {
	var b bitmap
	for _, i := range []int32{0, 7, 8, 63, 64, 130, -1} {
		b.set(i)
	}
	b.clear(8)
	has := b.bytes(131)
	if len(has) != 17 {
		t.Fatalf("%d bytes", len(has))
	}
	for i := 0; i < 131; i++ {
		want := i == 0 || i == 7 || i == 63 || i == 64 || i == 130
		if got := has[i/8]&(1<<(i%8)) != 0; got != want {
			t.Errorf("index %d: %v, want %v", i, got, want)
		}
	}
}

// Grabbers on three nodes while a holder restarts in the middle of the
// storm (grabs in flight there fail with it): every packet is granted once,
// on one node, none refunded, and the ledgers balance.
func TestShardedRainHolderRestartMidStorm(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	c.latency = 2 * time.Millisecond
	const count, total, grabbers = 600, 60_000, 8
	code := c.rain(t, "n1", total, count, time.Hour)
	nodes := []string{"n1", "n2", "n3"}
	var granted atomic.Int64
	var restarting atomic.Bool
	var wg sync.WaitGroup
	for g := range grabbers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				node := nodes[(g+i)%3]
				if node == "n2" && restarting.Load() {
					continue
				}
				user := int64(10_000*(g+1) + i)
				_, err := c.grab(node, "n1", user, code)
				switch {
				case err == nil:
					granted.Add(1)
				case err.Code == proto.CodeRedPacketEmpty && node == "n1":
					return
				case err.Code == proto.CodeRedPacketEmpty, err.Code == proto.CodeInternal:
					time.Sleep(5 * time.Millisecond)
				default:
					t.Errorf("grab on %s: %v", node, err)
					return
				}
			}
		}()
	}
	for granted.Load() < count/4 {
		time.Sleep(time.Millisecond)
	}
	restarting.Store(true)
	m := c.nodes["n2"]
	m.stop() // grabs in flight on n2 end with it
	c.start(t, "n2", m.dir)
	restarting.Store(false)
	wg.Wait()
	v := c.conserve(t, "n1", code, total)
	grants, per := c.grants(t, code)
	if len(grants) != count || v.Refunded != 0 || granted.Load() > int64(len(grants)) {
		t.Fatalf("%d durable grants of %d (%d answered ok), view %+v", len(grants), count, granted.Load(), v)
	}
	t.Logf("granted %d answered ok, %d durable; per node %v", granted.Load(), len(grants), per)
}

// A lease answer still on its way to the holder when the owner asks what
// the holder has (a holder paused past the quiet time, say): the answer is
// not named, the owner pools its packets again, and the holder drops it on
// arrival — every index is still granted once.
func TestRecoveryDropsAnAnswerOnItsWay(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const count, total = 60, 6_000
	code := c.rain(t, "n1", total, count, time.Hour)
	if _, err := c.grab("n2", "n1", 1, code); err != nil { // n2's first slice
		t.Fatal(err)
	}
	gate := make(chan int)
	c.mu.Lock()
	c.leaseGate = gate
	c.mu.Unlock()
	onItsWay := 0
	for u := int64(2); onItsWay == 0; u++ { // until n2 leases ahead
		if u > 20 {
			t.Fatal("n2 never leased ahead")
		}
		if _, err := c.grab("n2", "n1", u, code); err != nil {
			t.Fatal(err)
		}
		select {
		case onItsWay = <-gate:
		case <-time.After(50 * time.Millisecond):
		}
	}
	time.Sleep(recoverQuiet + 50*time.Millisecond)
	o := c.svc("n1")
	r := o.get(code)
	r.mu.Lock()
	seen := r.rounds
	r.mu.Unlock()
	if rd := o.reclaimRound(r, seen, time.Now().Add(2*time.Second)); rd.got < onItsWay {
		t.Fatalf("the round got %d packets back, %d were on their way", rd.got, onItsWay)
	}
	c.mu.Lock()
	c.leaseGate = nil
	c.mu.Unlock()
	gate <- 0 // the answer arrives now
	got := 0
	_ = c.nodes["n2"].store.Scan(grantPrefix(code), func(_, _ []byte) error { got++; return nil })
	got += c.drain(t, "n1", code, []string{"n2", "n1"}, 1000)
	if got != count {
		t.Fatalf("%d of %d packets granted", got, count)
	}
	if v := c.conserve(t, "n1", code, total); v.GrantedCount != count || v.Refunded != 0 {
		t.Fatalf("view %+v", v)
	}
}
