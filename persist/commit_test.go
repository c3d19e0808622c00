package persist

import (
	"errors"
	"sync/atomic"
	"testing"
)

// fatalCount counts st's fatal failures (OnFatal).
func fatalCount(st *Store) *atomic.Int32 {
	var n atomic.Int32
	st.OnFatal(func(error) { n.Add(1) })
	return &n
}

// storeFailed checks that a failed group commit was the store's fatal
// failure — reported once (a node ends its process there) — and that the
// store refuses other writes from then on.
func storeFailed(t *testing.T, st *Store, fatal *atomic.Int32) {
	t.Helper()
	if n := fatal.Load(); n != 1 {
		t.Fatalf("the store's fatal failure reported %d times, want once", n)
	}
	if err := st.Put([]byte("x"), []byte("y")); !errors.Is(err, ErrStoreFailed) {
		t.Fatalf("a store write after the ledger's failed commit: %v, want ErrStoreFailed", err)
	}
}

// A failed group commit (a disk error) undoes the reservations of its ops,
// answers them with the error, and makes the ledger refuse everything after:
// nothing reaches Pebble, and the balances in memory and on disk agree.
func TestFailedCommitUndoesAndRefusesLaterOps(t *testing.T) {
	st, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err := NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := l.Apply(Op{User: 1, ReqID: "c", Postings: []Posting{{User: 1, Delta: 10, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	fatal := fatalCount(st)
	disk := errors.New("disk gone")
	l.commit.mu.Lock() // the workers read failWrite after taking a group under mu
	l.commit.failWrite = disk
	l.commit.mu.Unlock()
	debit := Op{User: 1, ReqID: "d", Postings: []Posting{{User: 1, Delta: -3, Reason: ReasonGift}}}
	if _, err := l.Apply(debit); !errors.Is(err, disk) {
		t.Fatalf("debit during a disk failure: %v", err)
	}
	if b, _ := l.Balance(1); b != 10 {
		t.Fatalf("balance in memory %d after the failed commit, want 10", b)
	}
	storeFailed(t, st, fatal)
	// Refused from now on, the same request included: nothing is reserved.
	for _, op := range []Op{debit, {User: 2, ReqID: "x", Postings: []Posting{{User: 2, Delta: 5, Reason: ReasonDev}}}} {
		if _, err := l.Apply(op); !errors.Is(err, disk) {
			t.Fatalf("op after the failure: %v", err)
		}
	}
	if b, _ := l.Balance(1); b != 10 {
		t.Fatalf("balance %d", b)
	}
	credits, debits, balances, err := l.Audit()
	if err != nil || credits != 10 || debits != 0 || balances != 10 {
		t.Fatalf("audit: %d %d %d %v", credits, debits, balances, err)
	}
}

// A group commit that fails after its batch entered the WAL (a failed
// fsync) answers its ops in doubt (ErrInProgress), not failed: the batch
// may be durable — here it is, and after the restart the same request
// replays it. Answered "failed", a gift's sender was told nothing moved
// while the debit was on disk. The same for an op whose record is a spill
// row of its own (the memory index full): Pebble makes a batch readable
// before its fsync, so its retry found the spill row and was answered ok —
// for an op that may not be durable (ok on the old code).
func TestCommitFailedInTheWALIsInDoubt(t *testing.T) {
	for _, spill := range []bool{false, true} {
		t.Run(map[bool]string{false: "grouped", true: "spilled"}[spill], func(t *testing.T) {
			commitFailedInTheWAL(t, spill)
		})
	}
}

func commitFailedInTheWAL(t *testing.T, spill bool) {
	dir := t.TempDir()
	st, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Apply(Op{User: 1, ReqID: "c", Postings: []Posting{{User: 1, Delta: 10, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	for i := range l.shards { // spill: the memory index has no room
		if spill {
			sh := &l.shards[i]
			sh.mu.Lock()
			sh.done.reserved = sh.done.capacity()
			sh.mu.Unlock()
		}
	}
	fatal := fatalCount(st)
	fsync := errors.New("fsync failed")
	l.commit.mu.Lock()
	l.commit.failSync = fsync
	l.commit.mu.Unlock()
	debit := Op{User: 1, ReqID: "d", Postings: []Posting{{User: 1, Delta: -3, Reason: ReasonGift}}}
	if _, err := l.Apply(debit); !errors.Is(err, ErrInDoubt) || !errors.Is(err, fsync) {
		t.Fatalf("debit whose fsync failed: %v, want in doubt", err)
	}
	storeFailed(t, st, fatal)
	// Refused from now on, nothing reserved: "retry" (its retry included —
	// "failed" would misreport it), not in doubt itself.
	// Nor is a retry refused by its checks or the balance (nothing moved)
	// while its first attempt may be durable: a gift's check (rate, room)
	// refusing its retry, a balance lowered by a rollback.
	checked := debit
	checked.Check = func() error { return errors.New("refused by its check") }
	poor := Op{User: 1, ReqID: "p", Postings: []Posting{{User: 1, Delta: -1000, Reason: ReasonGift}}}
	for _, op := range []Op{debit, checked, poor, {User: 2, ReqID: "x", Postings: []Posting{{User: 2, Delta: 5, Reason: ReasonDev}}}} {
		if _, err := l.Apply(op); !errors.Is(err, ErrInProgress) || errors.Is(err, ErrInDoubt) {
			t.Fatalf("op after the failure: %v", err)
		}
	}
	l.Close()
	// A failed store closes without writing more (its WAL is replayed).
	if err := st.Close(); !errors.Is(err, ErrStoreFailed) {
		t.Fatalf("Close after the failure: %v, want ErrStoreFailed", err)
	}
	st, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err = NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	res, err := l.Apply(debit)
	if err != nil || !res.Replayed {
		t.Fatalf("the same debit after the restart: %+v %v (want replayed: it was durable)", res, err)
	}
	if b, _ := l.Balance(1); b != 7 {
		t.Fatalf("balance %d, want 7 (debited once)", b)
	}
	credits, debits, balances, err := l.Audit()
	if err != nil || credits-debits != balances {
		t.Fatalf("audit: %d %d %d %v", credits, debits, balances, err)
	}
}
