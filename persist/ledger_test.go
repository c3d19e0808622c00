package persist_test

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

func openLedger(t *testing.T, dir string) (*persist.Store, *persist.Ledger) {
	t.Helper()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l, err := persist.NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return st, l
}

func credit(t *testing.T, l *persist.Ledger, user, amount int64, req string) persist.Result {
	t.Helper()
	r, err := l.Apply(persist.Op{User: user, ReqID: req, Postings: []persist.Posting{{User: user, Delta: amount, Reason: persist.ReasonDev}}})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func debitOp(user, amount int64, req string) persist.Op {
	return persist.Op{User: user, ReqID: req, Postings: []persist.Posting{{User: user, Delta: -amount, Reason: persist.ReasonGift}}}
}

func TestConcurrentDebitsNeverOverdraw(t *testing.T) {
	st, l := openLedger(t, t.TempDir())
	defer st.Close()
	credit(t, l, 1, 500, "c1")
	var ok, insufficient atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 1000; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, err := l.Apply(debitOp(1, 1, fmt.Sprintf("g%d", i)))
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, persist.ErrInsufficient):
				insufficient.Add(1)
			default:
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if ok.Load() != 500 || insufficient.Load() != 500 {
		t.Fatalf("ok %d insufficient %d", ok.Load(), insufficient.Load())
	}
	if b, _ := l.Balance(1); b != 0 {
		t.Fatalf("balance %d", b)
	}
	trades, err := l.Trades(1, 0, 10000)
	if err != nil || len(trades) != 501 {
		t.Fatalf("trades %d %v", len(trades), err)
	}
	c, d, b := persisttest.CheckConservation(t, l)
	if c != 500 || d != 500 || b != 0 {
		t.Fatalf("sums %d %d %d", c, d, b)
	}
}

func TestSameReqIDDebitsOnce(t *testing.T) {
	dir := t.TempDir()
	st, l := openLedger(t, dir)
	credit(t, l, 2, 100, "c1")
	results := make([]persist.Result, 50)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := l.Apply(debitOp(2, 7, "same"))
			if err != nil {
				t.Error(err)
			}
			results[i] = r
		}(i)
	}
	wg.Wait()
	for _, r := range results {
		if r.TradeIDs[0] != results[0].TradeIDs[0] || r.Balances[0] != 93 {
			t.Fatalf("different results: %+v vs %+v", r, results[0])
		}
	}
	if b, _ := l.Balance(2); b != 93 {
		t.Fatalf("balance %d", b)
	}
	persisttest.CheckConservation(t, l)

	// After a restart the same req_id still replays the first result.
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, l = openLedger(t, dir)
	defer st.Close()
	r, err := l.Apply(debitOp(2, 7, "same"))
	if err != nil || !r.Replayed || r.TradeIDs[0] != results[0].TradeIDs[0] {
		t.Fatalf("after restart: %+v %v", r, err)
	}
	if b, _ := l.Balance(2); b != 93 {
		t.Fatalf("balance after restart %d", b)
	}
	// New trades get fresh ids after the restart.
	r2 := credit(t, l, 2, 1, "c2")
	if r2.TradeIDs[0] <= results[0].TradeIDs[0] {
		t.Fatalf("trade id reused: %d", r2.TradeIDs[0])
	}
	persisttest.CheckConservation(t, l)
}

func TestInsufficientIsRepliedSameAndMovesNothing(t *testing.T) {
	st, l := openLedger(t, t.TempDir())
	defer st.Close()
	credit(t, l, 3, 5, "c1")
	for i := 0; i < 3; i++ {
		if _, err := l.Apply(debitOp(3, 6, "big")); !errors.Is(err, persist.ErrInsufficient) {
			t.Fatalf("try %d: %v", i, err)
		}
	}
	if b, _ := l.Balance(3); b != 5 {
		t.Fatalf("balance %d", b)
	}
	persisttest.CheckConservation(t, l)
}

func TestTransferAtomicAcrossUsers(t *testing.T) {
	st, l := openLedger(t, t.TempDir())
	defer st.Close()
	credit(t, l, 10, 50, "c")
	op := persist.Op{User: 10, ReqID: "t1", Postings: []persist.Posting{
		{User: 10, Delta: -30, Reason: persist.ReasonGift}, {User: 11, Delta: 30, Reason: persist.ReasonGift}},
		Tallies: []persist.Tally{{Name: "recv", User: 11, Delta: 30}}}
	if _, err := l.Apply(op); err != nil {
		t.Fatal(err)
	}
	op.ReqID = "t2"
	if _, err := l.Apply(op); !errors.Is(err, persist.ErrInsufficient) {
		t.Fatalf("second transfer: %v", err)
	}
	b10, _ := l.Balance(10)
	b11, _ := l.Balance(11)
	recv, _ := l.Tally("recv", 11)
	if b10 != 20 || b11 != 30 || recv != 30 {
		t.Fatalf("balances %d %d recv %d", b10, b11, recv)
	}
	persisttest.CheckConservation(t, l)
}

func TestTradesPagingNewestFirst(t *testing.T) {
	st, l := openLedger(t, t.TempDir())
	defer st.Close()
	for i := 0; i < 25; i++ {
		credit(t, l, 4, 1, fmt.Sprintf("c%d", i))
	}
	credit(t, l, 5, 1, "other")
	var all []persist.Trade
	before := int64(0)
	for {
		page, err := l.Trades(4, before, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		all = append(all, page...)
		before = page[len(page)-1].ID
	}
	if len(all) != 25 {
		t.Fatalf("%d trades", len(all))
	}
	for i := 1; i < len(all); i++ {
		if all[i].ID >= all[i-1].ID || all[i].User != 4 {
			t.Fatalf("order at %d: %+v", i, all[i])
		}
	}
}

func TestExpireIdem(t *testing.T) {
	st, l := openLedger(t, t.TempDir())
	defer st.Close()
	first := credit(t, l, 6, 1, "r1")
	n, err := l.ExpireIdem(time.Now().Add(time.Hour))
	if err != nil || n != 1 {
		t.Fatalf("expired %d %v", n, err)
	}
	// Expired: the same req_id is a new request now.
	again := credit(t, l, 6, 1, "r1")
	if again.Replayed || again.TradeIDs[0] == first.TradeIDs[0] {
		t.Fatalf("not expired: %+v", again)
	}
}

// Many async ops from many users land in shared group commits (one balance
// merge per account per batch): every callback fires once, in-memory and
// durable balances agree before and after a restart, and duplicates across
// the restart replay.
func TestGroupCommitManyAsyncOps(t *testing.T) {
	dir := t.TempDir()
	st, l := openLedger(t, dir)
	const users, perUser = 50, 40
	for u := int64(1); u <= users; u++ {
		credit(t, l, u, 100, "seed")
	}
	var wg sync.WaitGroup
	var calls, ok, insufficient atomic.Int64
	for u := int64(1); u <= users; u++ {
		for i := 0; i < perUser; i++ {
			wg.Add(1)
			// Each user: 40 debits of 3 (only 33 fit in 100) plus transfers to
			// the next user, all in flight at once.
			op := debitOp(u, 3, fmt.Sprintf("d%d", i))
			if i%10 == 0 {
				op = persist.Op{User: u, ReqID: fmt.Sprintf("t%d", i), Postings: []persist.Posting{
					{User: u, Delta: -1, Reason: persist.ReasonGift}, {User: u%users + 1, Delta: 1, Reason: persist.ReasonGift}},
					Tallies: []persist.Tally{{Name: "recv", User: u%users + 1, Delta: 1}}}
			}
			l.ApplyAsync(op, func(_ persist.Result, err error) {
				defer wg.Done()
				calls.Add(1)
				switch {
				case err == nil:
					ok.Add(1)
				case errors.Is(err, persist.ErrInsufficient):
					insufficient.Add(1)
				default:
					t.Error(err)
				}
			})
		}
	}
	wg.Wait()
	if calls.Load() != users*perUser || ok.Load() == 0 || insufficient.Load() == 0 {
		t.Fatalf("calls %d ok %d insufficient %d", calls.Load(), ok.Load(), insufficient.Load())
	}
	before := map[int64]int64{}
	var sum int64
	for u := int64(1); u <= users; u++ {
		b, _ := l.Balance(u)
		if b < 0 {
			t.Fatalf("user %d balance %d", u, b)
		}
		before[u] = b
		sum += b
	}
	credits, debits, balances := persisttest.CheckConservation(t, l)
	if balances != sum || credits-debits != sum {
		t.Fatalf("balances %d (memory %d), credits %d, debits %d", balances, sum, credits, debits)
	}
	l.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, l = openLedger(t, dir)
	defer st.Close()
	for u := int64(1); u <= users; u++ {
		if b, _ := l.Balance(u); b != before[u] {
			t.Fatalf("user %d: %d after restart, %d before", u, b, before[u])
		}
	}
	r, err := l.Apply(persist.Op{User: 1, ReqID: "t0", Postings: []persist.Posting{
		{User: 1, Delta: -1, Reason: persist.ReasonGift}, {User: 2, Delta: 1, Reason: persist.ReasonGift}}})
	if err != nil || !r.Replayed {
		t.Fatalf("duplicate after restart: %+v %v", r, err)
	}
	persisttest.CheckConservation(t, l)
}

func TestApplyAfterCloseRefused(t *testing.T) {
	st, l := openLedger(t, t.TempDir())
	defer st.Close()
	credit(t, l, 1, 5, "c")
	l.Close()
	if _, err := l.Apply(debitOp(1, 1, "late")); !errors.Is(err, persist.ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

// A credit that would take a balance past MaxBalance is refused
// (ErrBalanceLimit, nothing moved): int64 wrapped it to a negative balance
// that the ledger then kept, and Lua doubles in the shared wallet lose such
// a balance's last digits. A balance at the bound still takes debits.
func TestBalanceAboveTheBoundRefused(t *testing.T) {
	_, l := openLedger(t, t.TempDir())
	credit(t, l, 1, persist.MaxBalance-1, "c1")
	credit(t, l, 1, 1, "c2") // exactly at the bound
	for i, d := range []int64{1, math.MaxInt64, math.MinInt64 + 1} {
		_, err := l.Apply(persist.Op{User: 1, ReqID: fmt.Sprint("over", i), Postings: []persist.Posting{{User: 1, Delta: d, Reason: persist.ReasonDev}}})
		if !errors.Is(err, persist.ErrBalanceLimit) || !errors.Is(err, persist.ErrBadOp) {
			t.Fatalf("delta %d on a balance of %d: %v, want ErrBalanceLimit", d, int64(persist.MaxBalance), err)
		}
	}
	// One op whose second posting would pass the bound moves nothing.
	_, err := l.Apply(persist.Op{User: 2, ReqID: "pair", Postings: []persist.Posting{
		{User: 2, Delta: 5, Reason: persist.ReasonDev}, {User: 1, Delta: 5, Reason: persist.ReasonDev}}})
	if !errors.Is(err, persist.ErrBalanceLimit) {
		t.Fatalf("op past the bound: %v", err)
	}
	if _, err := l.Apply(debitOp(1, 7, "d")); err != nil {
		t.Fatal(err)
	}
	if b, _ := l.Balance(1); b != persist.MaxBalance-7 {
		t.Fatalf("balance %d, want %d", b, int64(persist.MaxBalance-7))
	}
	if b, _ := l.Balance(2); b != 0 {
		t.Fatalf("user 2 balance %d after a refused op", b)
	}
	persisttest.CheckConservation(t, l)
}

// A duplicate whose earlier result cannot be read (an unreadable group row
// or spill row: a bad block, a record that does not decode) is answered
// ErrInProgress ("retry with the same req_id": the first may have debited),
// never that plain error, which callers tell as "failed"; nothing moves
// twice, and the next retry whose record reads again replays.
func TestUnreadableDuplicateIsInProgress(t *testing.T) {
	for _, c := range []struct {
		name   string
		budget int64 // 1: every record goes to a spill row (read on disk)
		prefix []byte
	}{{"group row", 0, persist.PrefixIdemG}, {"spill row", 1, persist.PrefixIdemSpill}} {
		t.Run(c.name, func(t *testing.T) {
			st, l := openBudgetLedger(t, t.TempDir(), c.budget)
			defer st.Close()
			defer l.Close()
			credit(t, l, 1, 10, "c")
			first, err := l.Apply(debitOp(1, 4, "d"))
			if err != nil {
				t.Fatal(err)
			}
			var keys, vals [][]byte
			if err := st.Scan(c.prefix, func(k, v []byte) error {
				keys, vals = append(keys, bytes.Clone(k)), append(vals, bytes.Clone(v))
				return nil
			}); err != nil || len(keys) == 0 {
				t.Fatalf("no %s rows (%v)", c.name, err)
			}
			for _, k := range keys {
				if err := st.Put(k, []byte{1, 0x80}); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := l.Apply(debitOp(1, 4, "d")); !errors.Is(err, persist.ErrInProgress) {
				t.Fatalf("duplicate with an unreadable record: %v, want ErrInProgress", err)
			}
			for i, k := range keys {
				if err := st.Put(k, vals[i]); err != nil {
					t.Fatal(err)
				}
			}
			r, err := l.Apply(debitOp(1, 4, "d"))
			if err != nil || !r.Replayed || r.TradeIDs[0] != first.TradeIDs[0] {
				t.Fatalf("retry: %+v %v, want the first's replay %+v", r, err, first)
			}
			if b, _ := l.Balance(1); b != 6 {
				t.Fatalf("balance %d, want 6 (debited once)", b)
			}
		})
	}
}

// The balances kept in memory stay about LedgerConfig.Balances however many
// users the node touches (every one was kept for good: ~24 B each, growing
// with uptime), and dropping them keeps every answer exact: concurrent
// credits and debits over many more users than the bound, each user's
// balance then read back, transfers between users whose balances were
// dropped, and a restart.
func TestLedgerBalancesInMemoryBounded(t *testing.T) {
	dir := t.TempDir()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const bound, users, rounds = 128, 600, 2
	l, err := persist.OpenLedger(st, persist.LedgerConfig{Balances: bound})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				for u := int64(1 + w); u <= users; u += 8 {
					if _, err := l.Apply(persist.Op{User: u, ReqID: fmt.Sprint("c", r), Postings: []persist.Posting{{User: u, Delta: 10, Reason: persist.ReasonDev}}}); err != nil {
						t.Error(err)
						return
					}
					if _, err := l.Apply(debitOp(u, 3, fmt.Sprint("d", r))); err != nil {
						t.Error(err)
						return
					}
					// A transfer to a user another worker is busy with.
					if _, err := l.Apply(persist.Op{User: u, ReqID: fmt.Sprint("t", r), Postings: []persist.Posting{
						{User: u, Delta: -1, Reason: persist.ReasonGift}, {User: u%users + 1, Delta: 1, Reason: persist.ReasonGift}}}); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	if n := persist.BalancesInMemory(l); n > bound {
		t.Fatalf("%d balances in memory, bound %d", n, bound)
	}
	check := func(l *persist.Ledger) {
		t.Helper()
		for u := int64(1); u <= users; u++ {
			if b, err := l.Balance(u); err != nil || b != rounds*7 {
				t.Fatalf("user %d balance %d (%v), want %d", u, b, err, rounds*7)
			}
		}
		// A debit of the whole balance of each: exact, or it would be
		// refused (too little in memory) or overdraw (too much).
		for u := int64(1); u <= users; u++ {
			if r, err := l.Apply(debitOp(u, rounds*7, "all")); err != nil || r.Balances[0] != 0 {
				t.Fatalf("user %d debit of %d: %+v %v", u, rounds*7, r, err)
			}
		}
		persisttest.CheckConservation(t, l)
	}
	check(l)
	l.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	_, l = openLedger(t, dir)
	for u := int64(1); u <= users; u++ {
		if b, _ := l.Balance(u); b != 0 {
			t.Fatalf("user %d balance %d after a restart, want 0", u, b)
		}
	}
	persisttest.CheckConservation(t, l)
}
