package persist

import (
	"errors"
	"testing"
)

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
