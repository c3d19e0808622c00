package persist_test

import (
	"fmt"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

func openBudgetLedger(t *testing.T, dir string, budget int64) (*persist.Store, *persist.Ledger) {
	t.Helper()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l, err := persist.OpenLedger(st, persist.LedgerConfig{IdemMemoryBytes: budget})
	if err != nil {
		_ = st.Close()
		t.Fatal(err)
	}
	return st, l
}

type reqKey struct {
	user int64
	req  string
}

// applyAll applies a credit of 1+i to user u for every (u, "r<i>") given,
// each twice at once (a concurrent duplicate), and returns the first
// results; the two answers of a pair must agree.
func applyAll(t *testing.T, l *persist.Ledger, users, perUser int) map[reqKey]persist.Result {
	t.Helper()
	var mu sync.Mutex
	first := map[reqKey]persist.Result{}
	var wg sync.WaitGroup
	for u := int64(1); u <= int64(users); u++ {
		for i := range perUser {
			op := persist.Op{User: u, ReqID: fmt.Sprintf("r%d", i), Postings: []persist.Posting{{User: u, Delta: 1 + int64(i), Reason: persist.ReasonDev}}}
			var pair [2]persist.Result
			var pwg sync.WaitGroup
			for k := range 2 {
				wg.Add(1)
				pwg.Add(1)
				l.ApplyAsync(op, func(r persist.Result, err error) {
					defer wg.Done()
					defer pwg.Done()
					if err != nil {
						t.Error(err)
					}
					pair[k] = r
				})
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				pwg.Wait()
				if pair[0].Replayed == pair[1].Replayed {
					t.Errorf("%d/%s: replayed %v and %v, want exactly one first", u, op.ReqID, pair[0].Replayed, pair[1].Replayed)
				}
				a, b := pair[0], pair[1]
				a.Replayed, b.Replayed = false, false
				if !reflect.DeepEqual(a, b) {
					t.Errorf("%d/%s: duplicate got %+v, first %+v", u, op.ReqID, b, a)
				}
				mu.Lock()
				first[reqKey{u, op.ReqID}] = a
				mu.Unlock()
			}()
		}
		if u%50 == 0 {
			wg.Wait() // bound what is in flight
		}
	}
	wg.Wait()
	return first
}

// checkReplays sends every request again (with a different amount) and
// checks it gets its first result and moves nothing.
func checkReplays(t *testing.T, l *persist.Ledger, first map[reqKey]persist.Result, users, perUser int) {
	t.Helper()
	for k, want := range first {
		got, err := l.Apply(persist.Op{User: k.user, ReqID: k.req, Postings: []persist.Posting{{User: k.user, Delta: 1000, Reason: persist.ReasonDev}}})
		if err != nil || !got.Replayed {
			t.Fatalf("%v again: %+v %v", k, got, err)
		}
		got.Replayed = false
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%v replayed %+v, first %+v", k, got, want)
		}
	}
	for u := int64(1); u <= int64(users); u++ {
		if b, _ := l.Balance(u); b != int64(perUser*(perUser+1)/2) {
			t.Fatalf("user %d balance %d, want %d", u, b, perUser*(perUser+1)/2)
		}
	}
}

// With a memory budget too small for a single hash every duplicate check
// goes to disk: concurrent and later duplicates get the first result, also
// after a restart, a new request is still new, and expiry removes the
// records.
func TestIdemTinyBudgetExactlyOnce(t *testing.T) {
	dir := t.TempDir()
	st, l := openBudgetLedger(t, dir, 1)
	const users, perUser = 40, 30
	first := applyAll(t, l, users, perUser)
	if n := l.IdemMemoryBytes(); n != 0 {
		t.Fatalf("memory index holds %d bytes with a budget of 1", n)
	}
	checkReplays(t, l, first, users, perUser)
	persisttest.CheckConservation(t, l)
	l.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	st, l = openBudgetLedger(t, dir, 1)
	defer st.Close()
	defer l.Close()
	checkReplays(t, l, first, users, perUser)
	if r, err := l.Apply(persist.Op{User: 1, ReqID: "new", Postings: []persist.Posting{{User: 1, Delta: 1, Reason: persist.ReasonDev}}}); err != nil || r.Replayed {
		t.Fatalf("new request: %+v %v", r, err)
	}
	// Spill rows expire with the 12 h period they are in.
	n, err := l.ExpireIdem(time.Now().Add(25 * time.Hour))
	if err != nil || n != users*perUser+1 {
		t.Fatalf("expired %d (%v), want %d", n, err, users*perUser+1)
	}
	if r, err := l.Apply(persist.Op{User: 1, ReqID: "r0", Postings: []persist.Posting{{User: 1, Delta: 1, Reason: persist.ReasonDev}}}); err != nil || r.Replayed {
		t.Fatalf("expired request not new: %+v %v", r, err)
	}
	persisttest.CheckConservation(t, l)
}

// Many more requests than the memory budget holds: the memory index (and
// the process's heap) stays within the budget, and exactly once holds for
// the requests in memory and for those beyond it.
func TestIdemMemoryWithinBudget(t *testing.T) {
	const budget = 128 << 10 // holds ~6k hashes
	st, l := openBudgetLedger(t, t.TempDir(), budget)
	defer st.Close()
	defer l.Close()
	heap := func() uint64 {
		var m runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	const users, perUser = 2000, 50 // 100k requests
	op := func(u int64, i int, delta int64) persist.Op {
		return persist.Op{User: u, ReqID: fmt.Sprintf("r%d", i), Postings: []persist.Posting{{User: u, Delta: delta, Reason: persist.ReasonDev}}}
	}
	apply := func(i int) { // request i of every user, at once
		var wg sync.WaitGroup
		for u := int64(1); u <= users; u++ {
			wg.Add(1)
			l.ApplyAsync(op(u, i, 1), func(r persist.Result, err error) {
				defer wg.Done()
				if err != nil || r.Replayed {
					t.Errorf("%d/r%d: %+v %v", u, i, r, err)
				}
			})
		}
		wg.Wait()
	}
	apply(0) // the users' balances are in memory from here on
	h0 := heap()
	for i := 1; i < perUser; i++ {
		apply(i)
	}
	h1 := heap()
	t.Logf("heap %d → %d KiB for %d requests; index %d KiB (budget %d KiB)", h0>>10, h1>>10, users*perUser, l.IdemMemoryBytes()>>10, budget>>10)
	if n := l.IdemMemoryBytes(); n > budget || n < budget/2 {
		t.Fatalf("memory index %d bytes, budget %d", n, budget)
	}
	// A map of every hash takes ≥ 20 B per request (2 MiB here).
	if h1 > h0 && h1-h0 > budget+1<<20 {
		t.Fatalf("heap grew %d KiB for %d requests (budget %d KiB)", (h1-h0)>>10, users*perUser, budget>>10)
	}
	// Duplicates of requests in memory (the first ones) and beyond it.
	for u := int64(1); u <= users; u += 7 {
		for _, i := range []int{0, 1, perUser / 2, perUser - 1} {
			r, err := l.Apply(op(u, i, 1000))
			if err != nil || !r.Replayed || r.Balances[0] != int64(i+1) {
				t.Fatalf("%d/r%d again: %+v %v", u, i, r, err)
			}
		}
		if b, _ := l.Balance(u); b != perUser {
			t.Fatalf("user %d balance %d, want %d", u, b, perUser)
		}
	}
	persisttest.CheckConservation(t, l)
}

// Written with room for every hash, reopened with a budget too small: the
// ledger boots (the records that do not fit are found on disk) and every
// duplicate is still caught.
func TestIdemBootOverBudget(t *testing.T) {
	dir := t.TempDir()
	st, l := openBudgetLedger(t, dir, 0)
	const users, perUser = 200, 40
	first := applyAll(t, l, users, perUser)
	l.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	for _, budget := range []int64{64 << 10, 1} {
		st, l = openBudgetLedger(t, dir, budget)
		if n := l.IdemMemoryBytes(); n > budget {
			t.Fatalf("memory index %d bytes after boot, budget %d", n, budget)
		}
		checkReplays(t, l, first, users, perUser)
		persisttest.CheckConservation(t, l)
		l.Close()
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
	}
	st, l = openBudgetLedger(t, dir, 0) // room again
	defer st.Close()
	defer l.Close()
	checkReplays(t, l, first, users, perUser)
	persisttest.CheckConservation(t, l)
}

// Boot time with LIVEEDGE_IDEM_BOOT_ROWS (e.g. 10000000) requests in the
// window, laid out as the default budget leaves them: reported, not
// asserted. Skipped unless the variable is set (it writes ~0.5 GB).
func TestIdemBootTime(t *testing.T) {
	rows, _ := strconv.Atoi(os.Getenv("LIVEEDGE_IDEM_BOOT_ROWS"))
	if rows <= 0 {
		t.Skip("set LIVEEDGE_IDEM_BOOT_ROWS to measure")
	}
	dir := t.TempDir()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := persist.WriteIdemLayout(st, rows, persist.DefaultIdemMemoryBytes); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %d records in %v", rows, time.Since(t0))
	st, err = persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	t0 = time.Now()
	l, err := persist.OpenLedger(st, persist.LedgerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t.Logf("OpenLedger with %d requests in the window: %v, memory index %d MiB", rows, time.Since(t0), l.IdemMemoryBytes()>>20)
	// The first and the last request written are duplicates.
	for _, i := range []int{0, rows - 1} {
		op := persist.Op{User: int64(1 + i%100_000), ReqID: fmt.Sprintf("gift:c%d-w%d-%d", i%16, i%4, i/100_000),
			Postings: []persist.Posting{{User: int64(1 + i%100_000), Delta: 1, Reason: persist.ReasonDev}}}
		if r, err := l.Apply(op); err != nil || !r.Replayed {
			t.Fatalf("request %d after boot: %+v %v", i, r, err)
		}
	}
}
