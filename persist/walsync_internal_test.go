package persist

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// With Options.WALMinSync concurrent ledger ops wait for and share the next
// fsync of the WAL, and each is still answered only once durable: every
// op's trade is there after a reopen.
func TestWALMinSyncOpsDurable(t *testing.T) {
	const interval = 20 * time.Millisecond
	run := func(minSync time.Duration) (took time.Duration) {
		dir := t.TempDir()
		st, err := OpenWith(dir, Options{WALMinSync: minSync})
		if err != nil {
			t.Fatal(err)
		}
		l, err := NewLedger(st, nil)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 25 {
					if _, err := l.Apply(Op{User: int64(1 + w), ReqID: fmt.Sprint("c", i), Postings: []Posting{{User: int64(1 + w), Delta: 1, Reason: ReasonDev}}}); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		took = time.Since(start)
		l.Close()
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
		st, err = Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = st.Close() }()
		for w := range 8 {
			if trades, err := LedgerTrades(st, int64(1+w)); err != nil || len(trades) != 25 {
				t.Fatalf("user %d: %d trades after a reopen (%v), want 25", 1+w, len(trades), err)
			}
		}
		// After the restart every op is a duplicate: replayed, nothing
		// moves again; each balance is the sum of its trades.
		l, err = NewLedger(st, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		for w := range 8 {
			u := int64(1 + w)
			for i := range 25 {
				r, err := l.Apply(Op{User: u, ReqID: fmt.Sprint("c", i), Postings: []Posting{{User: u, Delta: 1, Reason: ReasonDev}}})
				if err != nil || !r.Replayed {
					t.Fatalf("user %d op %d again after the restart: %+v %v, want replayed", u, i, r, err)
				}
			}
			if b, err := l.Balance(u); err != nil || b != 25 {
				t.Fatalf("user %d: balance %d (%v) after the duplicates, want 25", u, b, err)
			}
		}
		return took
	}
	t.Logf("200 ops, 8 at a time: %v with a %v minimum between fsyncs, %v without", run(interval), interval, run(0))
}
