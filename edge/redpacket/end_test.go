package redpacket

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A sharded rain ends soon after its last packet is granted even when
// nobody asks for more afterwards: here the owner's viewer takes the pool's
// last packet, and the holder's ask for more as it grants its own last one
// (the lease ahead on its last packet) fails — the owner was unreachable
// for a moment. The rain's end time is an hour away.
func TestShardedRainEndsAfterItsLastGrant(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	// The owner's watch waits 3 s (1 s by default) so that it cannot take
	// n2's last packet back before n2's viewer grabs it below.
	c.svc("n1").cfg.EndCheck = 3 * time.Second
	const count, total = 3, 300
	code := c.rain(t, "n1", total, count, time.Hour)
	h := c.svc("n2")
	sh := h.shardOf(code, "n1")
	slice := func() (free int, leasing bool) {
		sh.mu.Lock()
		defer sh.mu.Unlock()
		return len(sh.free), sh.leasing != nil
	}
	if _, perr := c.grab("n2", "n1", 1, code); perr != nil { // n2 leases one, and one more ahead
		t.Fatal(perr)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		if free, leasing := slice(); free == 1 && !leasing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("n2's lease ahead did not arrive")
		}
	}
	if _, perr := c.grab("n1", "n1", 2, code); perr != nil { // the pool's last packet
		t.Fatal(perr)
	}
	if left, _ := c.svc("n1").mem.Len(context.Background(), code); left != 0 {
		t.Fatalf("%d packets left in the owner's pool", left)
	}
	c.mu.Lock()
	c.down["n1"] = true // n2 cannot reach the owner
	c.mu.Unlock()
	if _, perr := c.grab("n2", "n1", 3, code); perr != nil { // n2's last packet
		t.Fatal(perr)
	}
	waitLeaseFailed(t, sh)
	c.mu.Lock()
	c.down["n1"] = false
	c.mu.Unlock()
	v := c.conserve(t, "n1", code, total) // waits up to 10 s for the end
	if v.GrantedCount != count || v.Refunded != 0 {
		t.Fatalf("%+v", v)
	}
}

// The same after the owner restarts: its rain resumes with every packet
// out with n2, which granted its last one while the owner was down (its ask
// for more failed). Nobody asks again; the owner asks n2 itself.
func TestShardedRainEndsAfterItsLastGrantAcrossRestart(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	const count, total = 2, 200
	code := c.rain(t, "n1", total, count, time.Hour)
	sh := c.svc("n2").shardOf(code, "n1")
	if _, perr := c.grab("n2", "n1", 1, code); perr != nil { // n2 leases one, and the other ahead
		t.Fatal(perr)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		sh.mu.Lock()
		free, leasing := len(sh.free), sh.leasing != nil
		sh.mu.Unlock()
		if free == 1 && !leasing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("n2's lease ahead did not arrive")
		}
	}
	m := c.kill("n1")
	if _, perr := c.grab("n2", "n1", 2, code); perr != nil { // n2's last packet, the owner down
		t.Fatal(perr)
	}
	waitLeaseFailed(t, sh)
	c.start(t, "n1", m.dir)
	v := c.conserve(t, "n1", code, total)
	if v.GrantedCount != count || v.Refunded != 0 {
		t.Fatalf("%+v", v)
	}
}

// waitLeaseFailed waits for sh's lease ahead on its last packet (started on
// a goroutine of its own by the grab) to fail: the owner is down.
func waitLeaseFailed(t *testing.T, sh *shard) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		sh.mu.Lock()
		failed := sh.leasing == nil && errors.Is(sh.lastErr, errDown)
		sh.mu.Unlock()
		if failed {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the lease ahead on the last packet did not fail")
		}
	}
}

// A lease ahead answered "none to lease ahead" is not "none left" for the
// holder that still has packets: a grab that found its slice empty and
// waited for that lease (whose answer brought the packet the grab then
// pops) must not tell its viewer that the rain is over. Here n3's viewers
// then take every packet, n2's idle slice included.
func TestLeaseAheadAnsweredEmptyIsNotNoneLeft(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	const count, total = 100, 10_000
	code := c.rain(t, "n1", total, count, time.Hour)
	got := 0
	for node, user := range map[string]int64{"n2": 1, "n3": 2} { // both lease a slice
		if _, perr := c.grab(node, "n1", user, code); perr != nil {
			t.Fatal(perr)
		}
		got++
	}
	u, n := c.takePool(t, code, 1000) // the owner's viewers take its pool
	got += n
	h := c.svc("n3")
	sh := h.shardOf(code, "n1")
	slice := func() (free int, leasing bool) {
		sh.mu.Lock()
		defer sh.mu.Unlock()
		return len(sh.free), sh.leasing != nil
	}
	for {
		free, leasing := slice()
		if leasing {
			time.Sleep(time.Millisecond)
			continue
		}
		if free <= 1 {
			break
		}
		if _, perr := c.grab("n3", "n1", u, code); perr != nil { // n3's viewers, down to its last packet
			t.Fatal(perr)
		}
		u++
		got++
	}
	if err := h.refill(sh); err != nil {
		t.Fatalf("a lease ahead answered empty, the holder's own packet still there: %v", err)
	}
	sh.mu.Lock()
	dry := sh.dry
	sh.mu.Unlock()
	if !dry {
		t.Fatal("the lease ahead was not answered empty (nothing tested)")
	}
	for ; got < count; u++ {
		if _, perr := c.grab("n3", "n1", u, code); perr != nil {
			t.Fatalf("grab %d of %d: %v", got+1, count, perr)
		}
		got++
	}
	c.conserve(t, "n1", code, total)
}
