package persist

import (
	"fmt"
	"strings"
	"sync"
	"testing"
)

// A duplicate whose first request's record sits in a group row (thousands
// of records committed together, long req_ids): its replay reads the record
// in place. Before, each replay copied the whole row and made a string per
// record scanned — hundreds of KB per duplicate, and a client may resend one
// req_id in a loop (a duplicate skips the rate limits).
func BenchmarkDuplicateReplayFromAGroupRow(b *testing.B) {
	st, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	l, err := NewLedger(st, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	op := func(i int) Op {
		return Op{User: int64(i%64 + 1), ReqID: fmt.Sprintf("%04d-%s", i, strings.Repeat("x", 120)),
			Postings: []Posting{{User: int64(i%64 + 1), Delta: 1, Reason: ReasonDev}}}
	}
	const n = 4000
	var wg sync.WaitGroup
	wg.Add(n)
	for i := range n {
		l.ApplyAsync(op(i), func(_ Result, err error) {
			if err != nil {
				b.Error(err)
			}
			wg.Done()
		})
	}
	wg.Wait()
	dup := op(n - 1)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if r, err := l.Apply(dup); err != nil || !r.Replayed {
			b.Fatalf("replay: %+v %v", r, err)
		}
	}
}
