package persist

import "testing"

// With every balance of a shard busy (ops committing), a load keeps its
// balance without sweeping the map for nothing: before, each load past the
// bound swept every balance and counted a drop although none could go —
// loads quadratic in the ops in flight, and every balance read meanwhile
// read again (a drop seen). Once they are no longer busy, the next load
// brings the shard back under its bound.
func TestKeepBalanceAllBusySweepsNothing(t *testing.T) {
	const bound, users = 8, 1000
	sh := &ledgerShard{bal: map[int64]int64{}, busy: map[int64]int32{}, maxBal: bound}
	for u := int64(1); u <= users; u++ {
		sh.keepBalance(u, u)
		sh.busy[u]++ // its op reserves and commits
	}
	if len(sh.bal) != users {
		t.Fatalf("%d balances kept, want all %d (busy: none can go)", len(sh.bal), users)
	}
	if sh.dropped != 0 {
		t.Fatalf("%d drops counted with every balance busy, want 0", sh.dropped)
	}
	for u := int64(1); u <= users; u++ {
		sh.settled(u, 0)
	}
	sh.keepBalance(users+1, 0)
	if n := len(sh.bal); n > bound*3/4+1 || sh.dropped != 1 {
		t.Fatalf("%d balances in memory after the ops settled (bound %d), %d drops: want ≤ %d and 1", n, bound, sh.dropped, bound*3/4+1)
	}
	if _, ok := sh.bal[users+1]; !ok {
		t.Fatal("the balance loaded last is not kept")
	}
}
