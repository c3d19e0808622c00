package persist

import (
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"
)

func openTestLedger(t *testing.T, dir string) (*Store, *Ledger) {
	t.Helper()
	st, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewLedger(st, nil)
	if err != nil {
		_ = st.Close()
		t.Fatal(err)
	}
	return st, l
}

func countRows(t *testing.T, st *Store, prefix []byte) int {
	t.Helper()
	n := 0
	if err := st.Scan(prefix, func(_, _ []byte) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// The Ledger writes the idempotency records of a group commit as one row:
// no per-request idem/ row, at most one idxg/ row per group; after a restart
// every duplicate replays its first result exactly, a new request is still
// new, and expiry removes the group rows and their hashes.
func TestIdempotencyGroupRows(t *testing.T) {
	dir := t.TempDir()
	st, l := openTestLedger(t, dir)
	const users, perUser = 20, 50
	type key struct {
		user int64
		req  string
	}
	var mu sync.Mutex
	first := map[key]Result{}
	var wg sync.WaitGroup
	for u := int64(1); u <= users; u++ {
		for i := range perUser {
			wg.Add(1)
			op := Op{User: u, ReqID: fmt.Sprintf("r%d", i), Postings: []Posting{{User: u, Delta: 1 + int64(i), Reason: ReasonDev}}}
			l.ApplyAsync(op, func(r Result, err error) {
				defer wg.Done()
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				first[key{u, op.ReqID}] = r
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	if n := countRows(t, st, PrefixIdem); n != 0 {
		t.Fatalf("%d per-request idem rows, want 0", n)
	}
	groups := countRows(t, st, PrefixIdemG)
	if groups == 0 || groups > users*perUser {
		t.Fatalf("%d group rows for %d requests", groups, users*perUser)
	}
	t.Logf("%d requests in %d group rows", users*perUser, groups)
	l.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	st, l = openTestLedger(t, dir)
	for k, want := range first {
		got, err := l.Apply(Op{User: k.user, ReqID: k.req, Postings: []Posting{{User: k.user, Delta: 1000, Reason: ReasonDev}}})
		if err != nil || !got.Replayed {
			t.Fatalf("%v after restart: %+v %v", k, got, err)
		}
		got.Replayed = false
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%v replayed %+v, first %+v", k, got, want)
		}
	}
	// New requests still move money; the sums did not change by the replays.
	for u := int64(1); u <= users; u++ {
		if b, _ := l.Balance(u); b != perUser*(perUser+1)/2 {
			t.Fatalf("user %d balance %d", u, b)
		}
	}
	if r, err := l.Apply(Op{User: 1, ReqID: "new", Postings: []Posting{{User: 1, Delta: 1, Reason: ReasonDev}}}); err != nil || r.Replayed {
		t.Fatalf("new request: %+v %v", r, err)
	}
	n, err := l.ExpireIdem(time.Now().Add(2 * time.Hour))
	if err != nil || n != users*perUser+1 {
		t.Fatalf("expired %d (%v), want %d", n, err, users*perUser+1)
	}
	if g := countRows(t, st, PrefixIdemG); g != 0 {
		t.Fatalf("%d group rows left after expiry", g)
	}
	if r, err := l.Apply(Op{User: 1, ReqID: "r0", Postings: []Posting{{User: 1, Delta: 1, Reason: ReasonDev}}}); err != nil || r.Replayed {
		t.Fatalf("expired request not new: %+v %v", r, err)
	}
	if c, d, b, err := l.Audit(); err != nil || c-d != b {
		t.Fatalf("audit: credits %d debits %d balances %d: %v", c, d, b, err)
	}
	l.Close()
	_ = st.Close()
}

// Records written one row per request (the shared wallet's layout, and the
// Ledger's before group rows) still answer duplicates after an upgrade.
func TestLegacyIdemRowsStillDedupe(t *testing.T) {
	dir := t.TempDir()
	st, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	op := Op{User: 7, ReqID: "old", Postings: []Posting{{User: 7, Delta: 40, Reason: ReasonDev}}}
	res := Result{TradeIDs: []int64{1}, Balances: []int64{40}, At: time.Now().UnixMilli()}
	if err := st.Apply(func(b *Batch) error { return writeOp(b, op, res) }); err != nil {
		t.Fatal(err)
	}
	if n := countRows(t, st, PrefixIdem); n != 1 {
		t.Fatalf("%d idem rows", n)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, l := openTestLedger(t, dir)
	defer st.Close()
	defer l.Close()
	got, err := l.Apply(op)
	if err != nil || !got.Replayed || got.TradeIDs[0] != 1 || got.Balances[0] != 40 || got.At != res.At {
		t.Fatalf("legacy duplicate: %+v %v", got, err)
	}
	if b, _ := l.Balance(7); b != 40 {
		t.Fatalf("balance %d, want 40", b)
	}
	if n, err := l.ExpireIdem(time.Now().Add(2 * time.Hour)); err != nil || n != 1 {
		t.Fatalf("expired %d %v", n, err)
	}
}

// A hash hit whose group row does not hold the request (a 64-bit hash
// collision) is a new request, not someone else's result.
func TestIdemGroupMissIsNotFound(t *testing.T) {
	st, l := openTestLedger(t, t.TempDir())
	defer st.Close()
	defer l.Close()
	r, err := l.Apply(Op{User: 3, ReqID: "a", Postings: []Posting{{User: 3, Delta: 5, Reason: ReasonDev}}})
	if err != nil {
		t.Fatal(err)
	}
	sh := l.shard(3)
	sh.mu.Lock()
	var loc idemLoc
	sh.done.lookup(l.idemHash(3, "a"), func(x idemLoc) bool { loc = x; return false })
	sh.mu.Unlock()
	if loc.group() == 0 {
		t.Fatalf("record not in a group row: %x", loc)
	}
	if got, found, err := l.readIdem(loc, 3, "a"); err != nil || !found || !reflect.DeepEqual(got.TradeIDs, r.TradeIDs) {
		t.Fatalf("own record: %+v %v %v", got, found, err)
	}
	for _, q := range []struct {
		user int64
		req  string
	}{{3, "b"}, {4, "a"}} {
		if _, found, err := l.readIdem(loc, q.user, q.req); err != nil || found {
			t.Fatalf("%v found in another request's group: %v %v", q, found, err)
		}
	}
	if _, found, err := l.readIdem(mkLoc(loc.hour(), loc.group()+100), 3, "a"); err != nil || found {
		t.Fatalf("absent group row: %v %v", found, err)
	}
}

// A balance read from Pebble while another op of the same user commits and
// its balance is then dropped from memory is stale: it is read again, never
// kept (the op would check a debit against coins already spent).
func TestDroppedBalanceNotKeptStale(t *testing.T) {
	st, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err := OpenLedger(st, LedgerConfig{Balances: ledgerShards}) // one per shard
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	const u, v = 1, 1 + ledgerShards // one shard
	var mu sync.Mutex
	armed := false
	loaded, resume := make(chan struct{}), make(chan struct{})
	l.commit.crashAt = func(point string, _ []*commitEntry) {
		mu.Lock()
		stop := point == "loaded" && armed
		armed = armed && !stop
		mu.Unlock()
		if stop {
			close(loaded)
			<-resume // u's balance read (100), not kept yet
		}
	}
	credit := func(user int64, req string, d int64) error {
		_, err := l.Apply(Op{User: user, ReqID: req, Postings: []Posting{{User: user, Delta: d, Reason: ReasonDev}}})
		return err
	}
	if err := credit(u, "c", 100); err != nil {
		t.Fatal(err)
	}
	if err := credit(v, "v1", 1); err != nil { // drops u's balance
		t.Fatal(err)
	}
	mu.Lock()
	armed = true
	mu.Unlock()
	var calls sync.WaitGroup
	calls.Add(1)
	var errA error
	go func() {
		defer calls.Done()
		errA = credit(u, "a", -100)
	}()
	<-loaded
	// Meanwhile another debit of u's 100 commits, and u's balance is dropped.
	if err := credit(u, "b", -100); err != nil {
		t.Fatal(err)
	}
	if err := credit(v, "v2", 1); err != nil {
		t.Fatal(err)
	}
	close(resume)
	calls.Wait()
	if !errors.Is(errA, ErrInsufficient) {
		t.Fatalf("second debit of 100 from a balance of 100: %v, want ErrInsufficient", errA)
	}
	if b, err := l.loadBalance(u); b != 0 || err != nil {
		t.Fatalf("durable balance %d (%v), want 0", b, err)
	}
}

// A balance read while a credit commits does not show the credit until it
// is durable (a crash before the fsync takes it back after it was shown),
// while a debit committing is shown spent at once (it cannot be spent
// twice meanwhile).
func TestBalanceShowsNoCreditBeforeItIsDurable(t *testing.T) {
	l := freshLedger(t)
	const u = 7
	apply := func(req string, d int64) chan error {
		ch := make(chan error, 1)
		l.ApplyAsync(Op{User: u, ReqID: req, Postings: []Posting{{User: u, Delta: d, Reason: ReasonDev}}}, func(_ Result, err error) { ch <- err })
		return ch
	}
	if <-apply("first", 50) != nil {
		t.Fatal("first credit failed")
	}
	var mu sync.Mutex
	armed := true
	held, resume := make(chan struct{}), make(chan struct{})
	var release sync.Once
	defer release.Do(func() { close(resume) }) // a failed check does not leave the committer held
	l.commit.crashAt = func(point string, _ []*commitEntry) {
		mu.Lock()
		stop := point == "write" && armed
		armed = armed && !stop
		mu.Unlock()
		if stop {
			close(held)
			<-resume // the group is not written yet
		}
	}
	credit := apply("credit", 100)
	<-held
	if b, err := l.Balance(u); err != nil || b != 50 {
		t.Fatalf("balance %d (%v) while a credit of 100 waits for its write, want 50", b, err)
	}
	debit := apply("debit", -30) // queued behind the held group
	if b, err := l.Balance(u); err != nil || b != 20 {
		t.Fatalf("balance %d (%v) with a debit of 30 committing, want 20 (spent at once, the credit not shown)", b, err)
	}
	release.Do(func() { close(resume) })
	if err := <-credit; err != nil {
		t.Fatal(err)
	}
	if err := <-debit; err != nil {
		t.Fatal(err)
	}
	if b, err := l.Balance(u); err != nil || b != 120 {
		t.Fatalf("balance %d (%v) once both are durable, want 120", b, err)
	}
	// A debit of the whole held credit, reserved against it: nothing shown
	// (never a negative balance) until both are durable.
	mu.Lock()
	armed, held, resume = true, make(chan struct{}), make(chan struct{})
	release = sync.Once{}
	mu.Unlock()
	credit = apply("credit2", 100)
	<-held
	debit = apply("debit2", -220)
	if b, err := l.Balance(u); err != nil || b != 0 {
		t.Fatalf("balance %d (%v) with 120 durable, +100 and −220 committing, want 0", b, err)
	}
	release.Do(func() { close(resume) })
	if err := <-credit; err != nil {
		t.Fatal(err)
	}
	if err := <-debit; err != nil {
		t.Fatal(err)
	}
	if b, err := l.Balance(u); err != nil || b != 0 {
		t.Fatalf("balance %d (%v) once both are durable, want 0", b, err)
	}
}

// A trade is listed, and a tally read, only once its group is durable: a
// read of Pebble that saw a group waiting for its fsync waits for it (a
// crash before the fsync would take back a trade already listed). Before,
// both were answered from the group still waiting.
func TestTradesAndTalliesShownOnlyOnceDurable(t *testing.T) {
	st, l := openTestLedger(t, t.TempDir())
	defer st.Close()
	defer l.Close()
	const u = 7
	held, resume := make(chan struct{}), make(chan struct{})
	var once, release sync.Once
	defer release.Do(func() { close(resume) })
	l.commit.crashAt = func(point string, _ []*commitEntry) {
		if point == "sync" {
			once.Do(func() {
				close(held)
				<-resume // in the WAL, readable; its fsync not done
			})
		}
	}
	credit := make(chan error, 1)
	l.ApplyAsync(Op{User: u, ReqID: "c", Postings: []Posting{{User: u, Delta: 100, Reason: ReasonDev}},
		Tallies: []Tally{{Name: "recv", User: u, Delta: 100}}}, func(_ Result, err error) { credit <- err })
	<-held
	type read struct {
		trades int
		tally  int64
		err    error
	}
	got := make(chan read, 1)
	go func() {
		ts, err := l.Trades(u, 0, 10)
		if err != nil {
			got <- read{err: err}
			return
		}
		v, err := l.Tally("recv", u)
		got <- read{len(ts), v, err}
	}()
	select {
	case r := <-got:
		t.Fatalf("read %+v while the credit's group waits for its fsync", r)
	case <-time.After(200 * time.Millisecond):
	}
	// A read that cannot be shown durable in time is refused ("retry"),
	// not held for as long as the disk stalls.
	setWait := func(d time.Duration) {
		l.commit.mu.Lock()
		l.commit.durableWait = d
		l.commit.mu.Unlock()
	}
	setWait(50 * time.Millisecond)
	if _, err := l.Trades(u, 0, 10); !errors.Is(err, ErrWalletUnavailable) {
		t.Fatalf("trades with the fsync stalled past the wait: %v, want ErrWalletUnavailable", err)
	}
	setWait(durableWait)
	release.Do(func() { close(resume) })
	if err := <-credit; err != nil {
		t.Fatal(err)
	}
	if r := <-got; r.err != nil || r.trades != 1 || r.tally != 100 {
		t.Fatalf("once durable: %+v, want the trade and the tally of 100", r)
	}
}

// Balance of a user not in memory reads Pebble, which shows a batch before
// its fsync: a credit of the user whose group entered the log meanwhile
// (not synced yet) is not shown — answered from memory, where the user is
// until the credit is durable. Before, it was shown, and a crash then took
// it back.
func TestBalanceOfAUserNotInMemoryShowsNoCreditBeforeItIsDurable(t *testing.T) {
	l := freshLedger(t)
	const u = 9
	held, resume := make(chan struct{}), make(chan struct{})
	credited := make(chan error, 1)
	var release, once sync.Once
	defer release.Do(func() { close(resume) })
	l.commit.crashAt = func(point string, _ []*commitEntry) {
		switch point {
		case "balance": // Balance found u not in memory: a credit of u starts now
			once.Do(func() {
				go l.ApplyAsync(Op{User: u, ReqID: "c", Postings: []Posting{{User: u, Delta: 100, Reason: ReasonDev}}},
					func(_ Result, err error) { credited <- err })
				<-held // in the log, readable, not synced
			})
		case "sync":
			close(held)
			<-resume
		}
	}
	if b, err := l.Balance(u); err != nil || b != 0 {
		t.Fatalf("balance %d (%v) while a credit of 100 waits for its fsync, want 0", b, err)
	}
	release.Do(func() { close(resume) })
	if err := <-credited; err != nil {
		t.Fatal(err)
	}
	if b, err := l.Balance(u); err != nil || b != 100 {
		t.Fatalf("balance %d (%v) once the credit is durable, want 100", b, err)
	}
}

// freshLedger is a ledger on a fresh store, both closed when the test ends.
func freshLedger(t *testing.T) *Ledger {
	t.Helper()
	st, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	l, err := OpenLedger(st, LedgerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}
