package persist

import (
	"fmt"
	"time"
)

// Test-only access for the external tests of this package (persist_test).

// LedgerTrades lists user's trade rows in st, oldest first.
func LedgerTrades(st *Store, user int64) ([]Trade, error) {
	var out []Trade
	err := st.ScanRange(Key2(PrefixTrade, uint64(user), 0), Key(PrefixTrade, uint64(user)+1), func(_, v []byte) (bool, error) {
		t, err := decodeTrade(v)
		out = append(out, t)
		return true, err
	})
	return out, err
}

// SetCrashAt sets the test crash points of w ("intent", "script", "final":
// Apply stops dead there as if the process had been killed); nil clears.
// Set it only while no Apply runs.
func SetCrashAt(w *SharedWallet, f func(point string) bool) { w.crashAt = f }

// ErrCrashed is what Apply returns at a crash point.
var ErrCrashed = errCrashed

// RunOrderCrashChild runs a crash scenario of TestKill9BetweenDependentGroups
// in a child process: it opens the ledger in dir, stops at the scenario's
// crash point and prints how far it got (the parent kill -9s it then). It
// never returns.
func RunOrderCrashChild(scenario, dir string, credit, debit Op) {
	fail := func(err error) {
		fmt.Printf("error %v\n", err)
		park()
	}
	st, err := Open(dir)
	if err != nil {
		fail(err)
	}
	l, err := NewLedger(st, nil)
	if err != nil {
		fail(err)
	}
	isOp := func(entries []*commitEntry, op Op) bool {
		for _, e := range entries {
			for _, p := range e.postings {
				if p == op.Postings[0] {
					return true
				}
			}
		}
		return false
	}
	stopped := make(chan struct{})
	l.commit.crashAt = func(point string, entries []*commitEntry) {
		switch {
		case point == map[string]string{"groups": "write", "reserved": "reserved"}[scenario] && isOp(entries, credit):
			close(stopped)
			park() // the crash point: this goroutine goes no further
		case point == "wait" && isOp(entries, debit):
			fmt.Println("debit waits for the credit's group")
		}
	}
	ack := func(name string) func(Result, error) {
		return func(_ Result, err error) {
			if err != nil {
				fmt.Printf("error %s: %v\n", name, err)
				return
			}
			fmt.Printf("acked %s\n", name)
		}
	}
	go l.ApplyAsync(credit, ack("credit"))
	<-stopped
	l.ApplyAsync(debit, ack("debit"))
	park()
}

// park blocks the calling goroutine until the process is killed.
func park() {
	for {
		time.Sleep(time.Hour)
	}
}
