package persist

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bytedance/sonic"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist/redistest"
)

// sharedNode is one node's half of a shared wallet: its own Pebble, one Redis.
type sharedNode struct {
	dir   string
	store *Store
	rdb   rueidis.Client
	w     *SharedWallet
}

func newRedisClient(t *testing.T, addr string) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func startShared(t *testing.T, addr, dir, node string, nodes []string) *sharedNode {
	t.Helper()
	st, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	rdb := newRedisClient(t, addr)
	w, err := NewSharedWallet(st, rdb, SharedConfig{Node: node, Nodes: nodes})
	if err != nil {
		t.Fatal(err)
	}
	n := &sharedNode{dir: dir, store: st, rdb: rdb, w: w}
	t.Cleanup(n.stop)
	return n
}

func waitReady(t *testing.T, ns ...*sharedNode) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, n := range ns {
		if err := n.w.WaitReady(ctx); err != nil {
			t.Fatal("shared wallet not ready")
		}
	}
}

func (n *sharedNode) stop() {
	if n.w != nil {
		n.w.Close()
		n.rdb.Close()
		_ = n.store.Close()
		n.w = nil
	}
}

func auditAcross(t *testing.T, rdb rueidis.Client, stores ...*Store) (credits, debits int64) {
	t.Helper()
	credits, debits, _, err := AuditShared(func(u int64) (int64, error) {
		b, err := rdb.Do(context.Background(), rdb.B().Get().Key(balKey(u)).Build()).AsInt64()
		if rueidis.IsRedisNil(err) {
			return 0, nil
		}
		return b, err
	}, stores...)
	if err != nil {
		t.Fatal(err)
	}
	return credits, debits
}

func TestSharedConcurrentDebitsTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	nodes := []string{"a", "b"}
	a := startShared(t, rs.Addr, t.TempDir(), "a", nodes)
	b := startShared(t, rs.Addr, t.TempDir(), "b", nodes)
	waitReady(t, a, b)
	if _, err := a.w.Apply(Op{User: 1, ReqID: "seed", Postings: []Posting{{User: 1, Delta: 500, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	var ok, poor atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 1000; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			w := a.w
			if i%2 == 1 {
				w = b.w
			}
			_, err := w.Apply(Op{User: 1, ReqID: fmt.Sprintf("g%d", i), Postings: []Posting{{User: 1, Delta: -1, Reason: ReasonGift}}})
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, ErrInsufficient):
				poor.Add(1)
			default:
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if ok.Load() != 500 || poor.Load() != 500 {
		t.Fatalf("ok %d poor %d", ok.Load(), poor.Load())
	}
	if bal, _ := b.w.Balance(1); bal != 0 {
		t.Fatalf("balance %d", bal)
	}
	c, d := auditAcross(t, a.rdb, a.store, b.store)
	if c != 500 || d != 500 {
		t.Fatalf("credits %d debits %d", c, d)
	}
	trades, err := a.w.Trades(1, 0, 2000)
	if err != nil || len(trades) != 501 {
		t.Fatalf("recent trades %d %v", len(trades), err)
	}
}

func TestSharedSameReqIDAcrossNodes(t *testing.T) {
	rs := redistest.Start(t)
	nodes := []string{"a", "b"}
	a := startShared(t, rs.Addr, t.TempDir(), "a", nodes)
	b := startShared(t, rs.Addr, t.TempDir(), "b", nodes)
	waitReady(t, a, b)
	if _, err := a.w.Apply(Op{User: 2, ReqID: "seed", Postings: []Posting{{User: 2, Delta: 100, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	res := make([]Result, 50)
	var wg sync.WaitGroup
	for i := range res {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			w := []*SharedWallet{a.w, b.w}[i%2]
			r, err := w.Apply(Op{User: 2, ReqID: "same", Postings: []Posting{{User: 2, Delta: -7, Reason: ReasonGift}}})
			if err != nil {
				t.Error(err)
			}
			res[i] = r
		}(i)
	}
	wg.Wait()
	for _, r := range res {
		if r.TradeIDs[0] != res[0].TradeIDs[0] || r.Balances[0] != 93 {
			t.Fatalf("results differ: %+v %+v", r, res[0])
		}
	}
	auditAcross(t, a.rdb, a.store, b.store)
}

// Crash points: after the intent (script never ran), after the script
// (Pebble never finalized) and after the ledger write (the key never marked
// done). A restart resolves all three: no money lost, none moved twice. Of
// them, only the op that ran and reached the ledger at the restart is told
// (Settled.AtOpen): its Apply never answered ok — the one finalized before
// the stop may have, and is not told (its effects are never sent twice).
func TestSharedCrashPoints(t *testing.T) {
	rs, dir, n := seededNode(t)
	n.w.crashAt = func(p string) bool { return p == "intent" }
	if _, err := n.w.Apply(Op{User: 3, ReqID: "lost", Postings: []Posting{{User: 3, Delta: -10, Reason: ReasonGift}}}); !errors.Is(err, errCrashed) {
		t.Fatal(err)
	}
	n.w.crashAt = func(p string) bool { return p == "script" }
	if _, err := n.w.Apply(Op{User: 3, ReqID: "ran", Postings: []Posting{{User: 3, Delta: -20, Reason: ReasonGift}}}); !errors.Is(err, errCrashed) {
		t.Fatal(err)
	}
	n.w.crashAt = func(p string) bool { return p == "final" }
	if _, err := n.w.Apply(Op{User: 3, ReqID: "written", Postings: []Posting{{User: 3, Delta: -5, Reason: ReasonGift}}}); !errors.Is(err, errCrashed) {
		t.Fatal(err)
	}
	n.stop()
	n = startShared(t, rs.Addr, dir, "a", nil) // restart: intents resolved
	waitReady(t, n)
	if bal, _ := n.w.Balance(3); bal != 75 {
		t.Fatalf("balance %d, want 75 (the debits that ran are kept, the other is not)", bal)
	}
	if err := n.store.Scan(prefixIntent, func(k, _ []byte) error { return fmt.Errorf("intent left: %x", k) }); err != nil {
		t.Fatal(err)
	}
	told := make(chan Settled, 10)
	n.w.OnSettled(func(st Settled) { told <- st })
	n.w.TellSettledAtOpen()
	n.w.TellSettledAtOpen() // once
	var st Settled
	select {
	case st = <-told:
	case <-time.After(5 * time.Second):
		t.Fatal("the op that ran before the stop was not told")
	}
	if st.ReqID != "ran" || !st.AtOpen || !st.Ran || len(st.Postings) != 1 || st.Postings[0].Delta != -20 || len(st.Result.TradeIDs) != 1 {
		t.Fatalf("told %+v, want the op \"ran\" settled at open", st)
	}
	select {
	case more := <-told:
		t.Fatalf("told %+v as well, want only the op whose share reached the ledger at the restart", more)
	case <-time.After(200 * time.Millisecond):
	}
	// Retrying the requests: "ran" and "written" replay, "lost" runs now.
	r, err := n.w.Apply(Op{User: 3, ReqID: "ran", Postings: []Posting{{User: 3, Delta: -20, Reason: ReasonGift}}})
	if err != nil || !r.Replayed || r.TradeIDs[0] != st.Result.TradeIDs[0] {
		t.Fatalf("ran: %+v %v (told trade %v)", r, err, st.Result.TradeIDs)
	}
	if r, err := n.w.Apply(Op{User: 3, ReqID: "written", Postings: []Posting{{User: 3, Delta: -5, Reason: ReasonGift}}}); err != nil || !r.Replayed {
		t.Fatalf("written: %+v %v", r, err)
	}
	if _, err := n.w.Apply(Op{User: 3, ReqID: "lost", Postings: []Posting{{User: 3, Delta: -10, Reason: ReasonGift}}}); err != nil {
		t.Fatal(err)
	}
	if bal, _ := n.w.Balance(3); bal != 65 {
		t.Fatalf("balance %d, want 65", bal)
	}
	auditAcross(t, n.rdb, n.store)
}

// An op answered in doubt whose share a resolve wrote before the node
// stopped (the script's reply was lost, the resolve inside Apply wrote the
// share, marking the key done failed) is owed to the listeners: told once,
// at the first start that tells at all — not at a start that failed before
// its businesses were wired — and never again. One whose resolve went
// through (its Apply answered ok after a lost reply) is never told.
func TestSharedOwedOpToldOnceAcrossRestarts(t *testing.T) {
	rs, dir, n := seededNode(t)
	told := make(chan Settled, 10)
	listen := func(n *sharedNode) { n.w.OnSettled(func(st Settled) { told <- st }) }
	none := func(when string) {
		t.Helper()
		select {
		case st := <-told:
			t.Fatalf("%s: told %+v", when, st)
		case <-time.After(300 * time.Millisecond):
		}
	}
	listen(n)
	var failMark atomic.Bool
	n.w.crashAt = func(p string) bool { return p == "reply" || p == "mark" && failMark.Load() }
	okOp := Op{User: 3, ReqID: "answered", Postings: []Posting{{User: 3, Delta: -10, Reason: ReasonGift}}}
	if r, err := n.w.Apply(okOp); err != nil || r.Balances[0] != 90 {
		t.Fatalf("lost reply, resolved at once: %+v %v, want ok", r, err)
	}
	failMark.Store(true)
	doubtOp := Op{User: 3, ReqID: "doubt", Postings: []Posting{{User: 3, Delta: -20, Reason: ReasonGift}}}
	if _, err := n.w.Apply(doubtOp); !errors.Is(err, ErrInDoubt) {
		t.Fatalf("lost reply, done mark failed: %v, want ErrInDoubt", err)
	}
	none("while the watcher cannot mark it done")
	n.stop()

	n = startShared(t, rs.Addr, dir, "a", nil) // a start that fails before telling
	waitReady(t, n)
	n.stop()
	n = startShared(t, rs.Addr, dir, "a", nil)
	waitReady(t, n)
	listen(n)
	n.w.TellSettledAtOpen()
	select {
	case st := <-told:
		if st.ReqID != "doubt" || !st.AtOpen || !st.Ran || len(st.Postings) != 1 || st.Postings[0].Delta != -20 || st.Result.Balances[0] != 70 {
			t.Fatalf("told %+v, want the op answered in doubt", st)
		}
		r, err := n.w.Apply(doubtOp)
		if err != nil || !r.Replayed || r.TradeIDs[0] != st.Result.TradeIDs[0] {
			t.Fatalf("retry: %+v %v, want the replay of trade %v", r, err, st.Result.TradeIDs)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the op answered in doubt was never told")
	}
	none("after the owed op")
	n.stop()
	n = startShared(t, rs.Addr, dir, "a", nil)
	waitReady(t, n)
	listen(n)
	n.w.TellSettledAtOpen()
	none("at the start after it was told")
	if r, err := n.w.Apply(okOp); err != nil || !r.Replayed {
		t.Fatalf("retry of the op answered ok: %+v %v", r, err)
	}
	if bal, _ := n.w.Balance(3); bal != 70 {
		t.Fatalf("balance %d, want 70", bal)
	}
	noIntents(t, n.store)
	auditAcross(t, n.rdb, n.store)
}

// Redis restarted empty: the balances, tallies and idempotency records come
// back from the two nodes' ledgers; until both contributed nothing moves.
func TestSharedRebuildAfterRedisLoss(t *testing.T) {
	rs := redistest.Start(t)
	nodes := []string{"a", "b"}
	a := startShared(t, rs.Addr, t.TempDir(), "a", nodes)
	b := startShared(t, rs.Addr, t.TempDir(), "b", nodes)
	waitReady(t, a, b)
	for i, w := range []*SharedWallet{a.w, b.w} {
		if _, err := w.Apply(Op{User: 4, ReqID: fmt.Sprint("seed", i), Postings: []Posting{{User: 4, Delta: 100, Reason: ReasonDev}}}); err != nil {
			t.Fatal(err)
		}
	}
	first, err := b.w.Apply(Op{User: 4, ReqID: "gift1", Postings: []Posting{{User: 4, Delta: -30, Reason: ReasonGift}, {User: 5, Delta: 30, Reason: ReasonGift}},
		Tallies: []Tally{{Name: "recv", User: 5, Delta: 30}}})
	if err != nil {
		t.Fatal(err)
	}
	rs.Restart()
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := a.w.Apply(Op{User: 4, ReqID: "after", Postings: []Posting{{User: 4, Delta: -1, Reason: ReasonGift}}})
		if err == nil {
			break
		}
		if !errors.Is(err, ErrWalletUnavailable) || time.Now().After(deadline) {
			t.Fatalf("after Redis restart: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if bal, _ := a.w.Balance(4); bal != 169 {
		t.Fatalf("user 4 balance %d, want 169", bal)
	}
	if bal, _ := b.w.Balance(5); bal != 30 {
		t.Fatalf("user 5 balance %d", bal)
	}
	if recv, _ := a.w.Tally("recv", 5); recv != 30 {
		t.Fatalf("tally %d", recv)
	}
	// The idempotency record survived: a retry replays, no second debit.
	r, err := a.w.Apply(Op{User: 4, ReqID: "gift1", Postings: []Posting{{User: 4, Delta: -30, Reason: ReasonGift}, {User: 5, Delta: 30, Reason: ReasonGift}}})
	if err != nil || !r.Replayed || r.TradeIDs[0] != first.TradeIDs[0] {
		t.Fatalf("retry after rebuild: %+v %v", r, err)
	}
	auditAcross(t, a.rdb, a.store, b.store)
}

func idemValue(t *testing.T, rdb rueidis.Client, user int64, req string) string {
	t.Helper()
	v, err := rdb.Do(context.Background(), rdb.B().Get().Key(idemRKey(user, req)).Build()).ToString()
	if err != nil && !rueidis.IsRedisNil(err) {
		t.Fatal(err)
	}
	return v
}

func noIntents(t *testing.T, st *Store) {
	t.Helper()
	if err := st.Scan(prefixIntent, func(k, _ []byte) error { return fmt.Errorf("intent left: %x", k) }); err != nil {
		t.Fatal(err)
	}
}

// twoNodesCredited starts nodes "a" (Pebble in dirA) and "b" on one Redis and
// credits user with amount (req_id "seed") through a.
func twoNodesCredited(t *testing.T, user, amount int64) (rs *redistest.Server, dirA string, a, b *sharedNode) {
	t.Helper()
	rs = redistest.Start(t)
	nodes := []string{"a", "b"}
	dirA = t.TempDir()
	a = startShared(t, rs.Addr, dirA, "a", nodes)
	b = startShared(t, rs.Addr, t.TempDir(), "b", nodes)
	waitReady(t, a, b)
	if _, err := a.w.Apply(Op{User: user, ReqID: "seed", Postings: []Posting{{User: user, Delta: amount, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	return rs, dirA, a, b
}

// A duplicate is never acknowledged before the first request is durable: the
// first request's node stops (is killed) after its script ran in Redis but
// before its ledger fsync — or after the fsync but before it marked the key
// done — and a duplicate through the other node is told "in progress", not
// ok, until the first node is back and has finished; then it replays.
func TestSharedDuplicateWaitsUntilDurable(t *testing.T) {
	for _, point := range []string{"script", "final"} {
		t.Run(point, func(t *testing.T) {
			rs, dirA, a, b := twoNodesCredited(t, 6, 100)
			if v := idemValue(t, a.rdb, 6, "seed"); v == "" || v[:1] == pendingMark {
				t.Fatalf("a finished request's key is %q, want done", v)
			}
			op := Op{User: 6, ReqID: "x", Postings: []Posting{{User: 6, Delta: -10, Reason: ReasonGift}}}
			a.w.crashAt = func(p string) bool { return p == point }
			if _, err := a.w.Apply(op); !errors.Is(err, errCrashed) {
				t.Fatalf("crash at %s: %v", point, err)
			}
			if v := idemValue(t, a.rdb, 6, "x"); v == "" || v[:1] != pendingMark {
				t.Fatalf("key of the interrupted request is %q, want pending", v)
			}
			b.w.dupWait = 200 * time.Millisecond
			if r, err := b.w.Apply(op); !errors.Is(err, ErrInProgress) {
				t.Fatalf("duplicate while the first is not durable: %+v %v, want ErrInProgress", r, err)
			}
			// A duplicate that waits long enough sees the first finish when
			// its node comes back.
			b.w.dupWait = 20 * time.Second
			type answer struct {
				r   Result
				err error
			}
			got := make(chan answer, 1)
			go func() { r, err := b.w.Apply(op); got <- answer{r, err} }()
			time.Sleep(100 * time.Millisecond)
			a.w.crashAt = nil
			a.stop()
			a = startShared(t, rs.Addr, dirA, "a", []string{"a", "b"}) // resolves the intent
			ans := <-got
			if ans.err != nil || !ans.r.Replayed || ans.r.Balances[0] != 90 {
				t.Fatalf("duplicate after the first node came back: %+v %v", ans.r, ans.err)
			}
			noIntents(t, a.store)
			if v := idemValue(t, a.rdb, 6, "x"); v[:1] == pendingMark {
				t.Fatalf("key still pending after resolution: %q", v)
			}
			if bal, _ := b.w.Balance(6); bal != 90 {
				t.Fatalf("balance %d, want 90", bal)
			}
			if c, d := auditAcross(t, a.rdb, a.store, b.store); c != 100 || d != 10 {
				t.Fatalf("credits %d debits %d, want 100 and 10 (the debit exactly once)", c, d)
			}
		})
	}
}

// The double failure: the first request's node dies between its script and
// its fsync and Redis loses everything. The duplicate was never told ok, so
// dropping the interrupted op is right: the retry runs afresh, debits once.
func TestSharedDuplicateDoubleFailure(t *testing.T) {
	rs, dirA, a, b := twoNodesCredited(t, 7, 100)
	op := Op{User: 7, ReqID: "x", Postings: []Posting{{User: 7, Delta: -10, Reason: ReasonGift}}}
	a.w.crashAt = func(p string) bool { return p == "script" }
	if _, err := a.w.Apply(op); !errors.Is(err, errCrashed) {
		t.Fatal(err)
	}
	b.w.dupWait = 200 * time.Millisecond
	if r, err := b.w.Apply(op); !errors.Is(err, ErrInProgress) {
		t.Fatalf("duplicate: %+v %v, want ErrInProgress", r, err)
	}
	a.stop()
	rs.Restart()
	a = startShared(t, rs.Addr, dirA, "a", []string{"a", "b"})
	waitReady(t, a, b)
	noIntents(t, a.store)
	deadline := time.Now().Add(20 * time.Second)
	for {
		r, err := b.w.Apply(op)
		if err == nil {
			if r.Replayed || r.Balances[0] != 90 {
				t.Fatalf("retry after the double failure: %+v, want a fresh debit to 90", r)
			}
			break
		}
		if !errors.Is(err, ErrWalletUnavailable) || time.Now().After(deadline) {
			t.Fatalf("retry after the double failure: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if c, d := auditAcross(t, a.rdb, a.store, b.store); c != 100 || d != 10 {
		t.Fatalf("credits %d debits %d", c, d)
	}
}

// ApplyAsync runs a bounded number of Applies at once node-wide; the rest
// wait for a slot and all complete.
func TestSharedApplyAsyncBounded(t *testing.T) {
	rs := redistest.Start(t)
	n := startShared(t, rs.Addr, t.TempDir(), "a", nil)
	waitReady(t, n)
	if _, err := n.w.Apply(Op{User: 8, ReqID: "seed", Postings: []Posting{{User: 8, Delta: 1000, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	n.w.asyncSlots = make(chan struct{}, 3)
	var running, most atomic.Int64
	n.w.crashAt = func(p string) bool { // a probe inside Apply, never a crash
		if p == "intent" {
			c := running.Add(1)
			for m := most.Load(); c > m && !most.CompareAndSwap(m, c); m = most.Load() {
			}
			time.Sleep(5 * time.Millisecond)
			running.Add(-1)
		}
		return false
	}
	const calls = 60
	var wg sync.WaitGroup
	var ok atomic.Int64
	for i := 0; i < calls; i++ {
		wg.Add(1)
		go n.w.ApplyAsync(Op{User: 8, ReqID: fmt.Sprint("a", i), Postings: []Posting{{User: 8, Delta: -1, Reason: ReasonGift}}},
			func(_ Result, err error) {
				defer wg.Done()
				if err != nil {
					t.Error(err)
					return
				}
				ok.Add(1)
			})
	}
	wg.Wait()
	if ok.Load() != calls || most.Load() > 3 {
		t.Fatalf("%d ok, at most %d at once: want %d and <= 3", ok.Load(), most.Load(), calls)
	}
	if bal, _ := n.w.Balance(8); bal != 1000-calls {
		t.Fatalf("balance %d", bal)
	}
	auditAcross(t, n.rdb, n.store)
}

// What Apply could not settle — its ledger write failed after the script ran
// ("script": Apply then answers ErrInProgress), or the done mark failed
// ("final") — is settled by the watcher: the share written once, the key
// done, the intent gone, without a restart; a waiting duplicate replays.
func TestSharedUnsettledRetriedByWatcher(t *testing.T) {
	for _, point := range []string{"script", "final"} {
		t.Run(point, func(t *testing.T) {
			_, _, a, b := twoNodesCredited(t, 9, 100)
			op := Op{User: 9, ReqID: "x", Postings: []Posting{{User: 9, Delta: -10, Reason: ReasonGift}}}
			a.w.crashAt = func(p string) bool { return p == point }
			if _, err := a.w.Apply(op); !errors.Is(err, errCrashed) {
				t.Fatal(err)
			}
			a.w.crashAt = nil
			// As Apply does when the write or the mark fails: hand the
			// intent to the watcher.
			n := 0
			if err := a.store.Scan(prefixIntent, func(k, v []byte) error {
				var in intent
				if err := sonic.Unmarshal(v, &in); err != nil {
					return err
				}
				a.w.unsettle(unsettledOp{no: KeyID(k), in: in})
				n++
				return nil
			}); err != nil || n != 1 {
				t.Fatalf("intents %d %v", n, err)
			}
			r, err := b.w.Apply(op) // waits for the watcher (every 200 ms)
			if err != nil || !r.Replayed || r.Balances[0] != 90 {
				t.Fatalf("duplicate: %+v %v", r, err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				left := 0
				_ = a.store.Scan(prefixIntent, func(_, _ []byte) error { left++; return nil })
				if left == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("intent not deleted after the watcher settled it")
				}
				time.Sleep(20 * time.Millisecond)
			}
			if c, d := auditAcross(t, a.rdb, a.store, b.store); c != 100 || d != 10 {
				t.Fatalf("credits %d debits %d", c, d)
			}
		})
	}
}

// An op without postings (only a tally and a record: a red-packet settlement
// with nothing left to refund) applies, and its retry replays — its result
// has empty trade and balance lists ("||at"), which the parser once refused,
// leaving the request "in progress" for ever.
func TestSharedOpWithoutPostings(t *testing.T) {
	rs := redistest.Start(t)
	a := startShared(t, rs.Addr, t.TempDir(), "a", []string{"a"})
	waitReady(t, a)
	op := Op{User: 5, ReqID: "settle", Tallies: []Tally{{Name: "given", User: 5, Delta: 10}},
		Static: []Record{{Key: []byte("rec/x"), Value: []byte("v")}}}
	r, err := a.w.Apply(op)
	if err != nil || len(r.TradeIDs) != 0 || len(r.Balances) != 0 {
		t.Fatalf("apply: %+v, %v", r, err)
	}
	r, err = a.w.Apply(op)
	if err != nil || !r.Replayed {
		t.Fatalf("retry: %+v, %v", r, err)
	}
	if v, _ := a.w.Tally("given", 5); v != 10 {
		t.Fatalf("tally %d, want 10 (once)", v)
	}
	noIntents(t, a.store)
}

// A contribution batch is checked whole before anything is written: a bad op
// after good ones (a deadline that is not a number, a truncated op) writes
// nothing and leaves the batch's marker unset — the retry then applies the
// good ops once, not twice. An idempotency row whose window is over (a
// stale row on some node's disk) is not written: it must not overwrite the
// key of a newer request with the same req_id.
func TestContribBatchCheckedBeforeWriting(t *testing.T) {
	rdb := newRedisClient(t, redistest.Start(t).Addr)
	ctx := context.Background()
	if err := rdb.Do(ctx, rdb.B().Hset().Key(keyMeta).FieldValue().FieldValue("gen", "g1").FieldValue("state", "rebuilding").
		FieldValue("nodes", "1").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	run := func(ops ...string) error {
		return contribScript.Exec(ctx, rdb, []string{keyMeta, keyContrib + "g1"}, append([]string{"g1", "n:0"}, ops...)).Error()
	}
	if err := run("incr", "le:bal:{1}", "5", "idem", "le:idem:{1}:r", "v", "soon"); err == nil {
		t.Fatal("a batch with a bad deadline accepted")
	}
	if err := run("incr", "le:bal:{1}", "5", "hset", "le:x", "f"); err == nil {
		t.Fatal("a truncated op accepted")
	}
	if n, err := rdb.Do(ctx, rdb.B().Exists().Key("le:bal:{1}").Build()).AsInt64(); err != nil || n != 0 {
		t.Fatalf("a refused batch wrote: %d %v", n, err)
	}
	if err := rdb.Do(ctx, rdb.B().Set().Key("le:idem:{1}:old").Value("newer").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	live := strconv.FormatInt(time.Now().Add(time.Hour).UnixMilli(), 10)
	for range 2 {
		if err := run("incr", "le:bal:{1}", "5", "idem", "le:idem:{1}:r", "v", live, "idem", "le:idem:{1}:old", "stale", "1000",
			"hset", "le:x", "f", "v"); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := rdb.Do(ctx, rdb.B().Get().Key("le:bal:{1}").Build()).AsInt64(); err != nil || b != 5 {
		t.Fatalf("balance after the batch and its repeat: %d %v, want 5", b, err)
	}
	if v, err := rdb.Do(ctx, rdb.B().Get().Key("le:idem:{1}:r").Build()).ToString(); err != nil || v != "v" {
		t.Fatalf("a live row: %q %v", v, err)
	}
	if ms, err := rdb.Do(ctx, rdb.B().Pttl().Key("le:idem:{1}:r").Build()).AsInt64(); err != nil || ms < 50*60*1000 {
		t.Fatalf("a live row's expiry in %d ms %v, want about an hour", ms, err)
	}
	if v, err := rdb.Do(ctx, rdb.B().Get().Key("le:idem:{1}:old").Build()).ToString(); err != nil || v != "newer" {
		t.Fatalf("a stale row overwrote a newer key: %q %v", v, err)
	}
}

// A rebuild reads the ledger only after the Applies under way have written
// their shares: an op whose script ran just before Redis lost its data (held
// between its script and its ledger write) is in the contribution — without
// the barrier its debit was read as never made, and the rebuilt balance kept
// the coins.
func TestRebuildWaitsForAppliesUnderWay(t *testing.T) {
	n, done, release := rebuildWaitingForADebit(t, 1)
	release()
	if err := <-done; err != nil {
		t.Fatalf("the debit under way: %v", err)
	}
	waitReady(t, n)
	if b, err := RedisBalance(n.rdb, 1); err != nil || b != 40 {
		t.Fatalf("rebuilt balance %d %v, want 40 (100 − 60)", b, err)
	}
	if _, _, _, err := AuditShared(func(u int64) (int64, error) { return RedisBalance(n.rdb, u) }, n.store); err != nil {
		t.Fatal(err)
	}
}

// rebuildWaitingForADebit is a one-node shared wallet whose users are
// credited 100 each, with user 1's debit of 60 held between its script and
// its ledger write (release lets it go on; done gets its outcome) while
// Redis lost its data: the watcher has noticed, and its rebuild waits for
// that debit.
func rebuildWaitingForADebit(t *testing.T, users ...int64) (n *sharedNode, done <-chan error, release func()) {
	t.Helper()
	n = startShared(t, redistest.Start(t).Addr, t.TempDir(), "a", []string{"a"})
	waitReady(t, n)
	for _, u := range users {
		if _, err := n.w.Apply(Op{User: u, ReqID: "seed", Postings: []Posting{{User: u, Delta: 100, Reason: ReasonDev}}}); err != nil {
			t.Fatal(err)
		}
	}
	inScript, held := make(chan struct{}), make(chan struct{})
	var once sync.Once
	n.w.crashAt = func(p string) bool {
		if p == "script" {
			once.Do(func() { // the debit's; not the Applies that come after it
				close(inScript)
				<-held
			})
		}
		return false
	}
	out := make(chan error, 1)
	go func() {
		_, err := n.w.Apply(Op{User: 1, ReqID: "spend", Postings: []Posting{{User: 1, Delta: -60, Reason: ReasonGift}}})
		out <- err
	}()
	<-inScript // the debit ran in Redis; its ledger share is not written yet
	if err := n.rdb.Do(context.Background(), n.rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // the watcher notices the loss and starts a rebuild
	var releaseOnce sync.Once
	return n, out, func() { releaseOnce.Do(func() { close(held) }) }
}

// An Apply that comes while a rebuild waits for the Applies under way is
// answered "unavailable" at once: it queued behind the rebuild's barrier
// (for as long as the slowest Apply under way took in Redis, up to its
// call timeout) only to find no generation.
func TestApplyDuringTheRebuildBarrierFailsFast(t *testing.T) {
	n, done, release := rebuildWaitingForADebit(t, 1, 2)
	if n.w.Ready() {
		t.Fatal("no rebuild under way")
	}
	other := make(chan error, 1)
	go func() {
		_, err := n.w.Apply(Op{User: 2, ReqID: "other", Postings: []Posting{{User: 2, Delta: -10, Reason: ReasonGift}}})
		other <- err
	}()
	select {
	case err := <-other:
		release()
		if !errors.Is(err, ErrWalletUnavailable) {
			t.Fatalf("an Apply during the rebuild's barrier: %v, want ErrWalletUnavailable", err)
		}
	case <-time.After(time.Second):
		release()
		t.Fatalf("an Apply during the rebuild's barrier still waits after 1 s (answered after the debit under way: %v)", <-other)
	}
	if err := <-done; err != nil {
		t.Fatalf("the debit under way: %v", err)
	}
	waitReady(t, n)
	if _, err := n.w.Apply(Op{User: 2, ReqID: "other", Postings: []Posting{{User: 2, Delta: -10, Reason: ReasonGift}}}); err != nil {
		t.Fatalf("retried after the rebuild: %v", err)
	}
	if b1, b2 := redisBalanceOf(t, n, 1), redisBalanceOf(t, n, 2); b1 != 40 || b2 != 90 {
		t.Fatalf("balances %d, %d; want 40, 90", b1, b2)
	}
	if _, _, _, err := AuditShared(func(u int64) (int64, error) { return RedisBalance(n.rdb, u) }, n.store); err != nil {
		t.Fatal(err)
	}
}

// redisBalanceOf reads user's balance from Redis itself (Balance may answer
// from the client-side cache before its invalidation arrives).
func redisBalanceOf(t *testing.T, n *sharedNode, user int64) int64 {
	t.Helper()
	b, err := RedisBalance(n.rdb, user)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// seededShared is one shared-wallet node on a fresh Redis, ready, user
// credited 100.
func seededShared(t *testing.T, user int64) *sharedNode {
	t.Helper()
	rs := redistest.Start(t)
	n := startShared(t, rs.Addr, t.TempDir(), "a", nil)
	waitReady(t, n)
	if _, err := n.w.Apply(Op{User: user, ReqID: "seed", Postings: []Posting{{User: user, Delta: 100, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	return n
}

// The script runs an op with a claim only while its claim holds the key:
// absent (expired, or released by a resolve that concluded "not run") it
// refuses and moves nothing; another request's claim or a result makes it a
// duplicate. resolve releases the claim before reading le:applied, so a
// script still on its way (its reply lost, not its request) cannot run
// after "not run" was concluded.
func TestSharedScriptRunsOnlyUnderItsClaim(t *testing.T) {
	const user = 41
	n := seededShared(t, user)
	ctx := context.Background()
	gen := n.w.gen.Load()
	in := intent{User: user, ReqID: "g", Gen: *gen, At: time.Now().UnixMilli(), Claim: claimMark + "a:test",
		Postings: []Posting{{User: user, Delta: -60, Reason: ReasonGift}}}
	key := idemRKey(user, in.ReqID)
	set := func(v string) {
		if err := n.rdb.Do(ctx, n.rdb.B().Set().Key(key).Value(v).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	balance := func() int64 { return redisBalanceOf(t, n, user) }
	run := func(want string) {
		t.Helper()
		if status, _, err := n.w.runScript(ctx, 1<<40, in); err != nil || status != want {
			t.Fatalf("script with the key %q: %q %v, want %q", idemValue(t, n.rdb, user, in.ReqID), status, err, want)
		}
	}
	run("claim") // no claim: expired or released
	set(claimMark + "b:other")
	run("dup") // another request claimed it: wait for that one
	if bal := balance(); bal != 100 {
		t.Fatalf("balance %d after refused scripts, want 100", bal)
	}

	// An intent whose outcome was unknown: resolve releases its claim and
	// drops it (its script did not run); the script arriving late refuses.
	set(in.Claim)
	no := n.w.intentNo.Add(1)
	iv, _ := sonic.Marshal(in)
	if err := n.store.Apply(func(b *Batch) error { return b.Set(Key(prefixIntent, no), iv, nil) }); err != nil {
		t.Fatal(err)
	}
	if _, out, err := n.w.resolve(ctx, no, in, nil); err != nil || out != outcomeNotRun {
		t.Fatalf("resolve: %v %v, want not run", out, err)
	}
	if v := idemValue(t, n.rdb, user, in.ReqID); v != "" {
		t.Fatalf("claim left after resolve: %q", v)
	}
	run("claim")
	if bal := balance(); bal != 100 {
		t.Fatalf("balance %d after the late script, want 100", bal)
	}
	// Under its claim it runs.
	set(in.Claim)
	run("ok")
	if bal := balance(); bal != 40 {
		t.Fatalf("balance %d, want 40", bal)
	}
}

// A script still on its way when its intent is resolved "not run" — its
// request delayed (a connection Redis had not read yet when the call timed
// out), not only its reply lost — must not land afterwards, whether or not
// the op holds a claim: its balance would move in Redis with no share in any
// ledger, after the caller was told nothing moved. Before the fence, an op
// whose claim call went unanswered (claim optional) or without a req_id ran.
func TestSharedLateScriptFencedAfterResolve(t *testing.T) {
	const user = 43
	n := seededShared(t, user)
	ctx := context.Background()
	balance := func() int64 { return redisBalanceOf(t, n, user) }
	gen := *n.w.gen.Load()
	debit := []Posting{{User: user, Delta: -30, Reason: ReasonGift}}
	// Intents written as Apply writes them, numbered as it numbers them.
	write := func(in intent) uint64 {
		t.Helper()
		no := n.w.intentNo.Add(1)
		iv, _ := sonic.Marshal(in)
		if err := n.store.Apply(func(b *Batch) error { return b.Set(Key(prefixIntent, no), iv, nil) }); err != nil {
			t.Fatal(err)
		}
		return no
	}
	for _, c := range []struct {
		name string
		in   intent
	}{
		{"claim unanswered (optional)", intent{User: user, ReqID: "g1", Gen: gen, At: time.Now().UnixMilli(),
			Claim: claimMark + "a:lost", ClaimMaybe: true, Postings: debit}},
		{"no req_id", intent{User: user, ReqID: "auto:a:x", Gen: gen, At: time.Now().UnixMilli(), Postings: debit}},
	} {
		no := write(c.in)
		if _, out, err := n.w.resolve(ctx, no, c.in, nil); err != nil || out != outcomeNotRun {
			t.Fatalf("%s: resolve %v %v, want not run", c.name, out, err)
		}
		if status, _, err := n.w.runScript(ctx, no, c.in); err != nil || status != "fenced" {
			t.Fatalf("%s: the late script answered %q %v, want fenced", c.name, status, err)
		}
		if b := balance(); b != 100 {
			t.Fatalf("%s: balance %d after the late script, want 100", c.name, b)
		}
		if v := idemValue(t, n.rdb, user, c.in.ReqID); v != "" {
			t.Fatalf("%s: the late script left %q under its key", c.name, v)
		}
	}
	// The fence stops at the resolved intent: a later one runs.
	late := intent{User: user, ReqID: "auto:a:y", Gen: gen, At: time.Now().UnixMilli(), Postings: debit}
	if status, _, err := n.w.runScript(ctx, n.w.intentNo.Add(1), late); err != nil || status != "ok" {
		t.Fatalf("a later intent's script: %q %v, want ok", status, err)
	}
	if b := balance(); b != 70 {
		t.Fatalf("balance %d, want 70", b)
	}
	// And Apply keeps working after fences, its ops numbered past them.
	if r, err := n.w.Apply(Op{User: user, ReqID: "after", Postings: debit}); err != nil || r.Balances[0] != 40 {
		t.Fatalf("apply after the fence: %+v %v, want balance 40", r, err)
	}
}

// An intent whose op is in this node's ledger is settled as run even when
// Redis no longer says so: the done mark removed its le:applied entry and
// only the mark's reply was lost (or Redis lost the generation after the
// share was contributed). Before, resolve answered "not run" for it — and a
// business told so dropped what it owed for an op that landed.
func TestSharedResolveFindsTheOpInTheLedger(t *testing.T) {
	rs := redistest.Start(t)
	n := startShared(t, rs.Addr, t.TempDir(), "a", nil)
	waitReady(t, n)
	const user = 42
	r, err := n.w.Apply(Op{User: user, ReqID: "seed", Postings: []Posting{{User: user, Delta: 100, Reason: ReasonDev}}})
	if err != nil {
		t.Fatal(err)
	}
	// The intent as the node had it before the done mark's lost reply.
	in := intent{User: user, ReqID: "seed", Gen: *n.w.gen.Load(), At: r.At,
		Postings: []Posting{{User: user, Delta: 100, Reason: ReasonDev}}}
	no := n.w.intentNo.Add(1)
	iv, _ := sonic.Marshal(in)
	if err := n.store.Apply(func(b *Batch) error { return b.Set(Key(prefixIntent, no), iv, nil) }); err != nil {
		t.Fatal(err)
	}
	got, out, err := n.w.resolve(context.Background(), no, in, nil)
	if err != nil || out != outcomeDone || len(got.TradeIDs) != 1 || got.TradeIDs[0] != r.TradeIDs[0] || got.Balances[0] != 100 {
		t.Fatalf("resolve: %+v %v %v, want done with the op's result %+v", got, out, err, r)
	}
	if _, err := n.store.Get(Key(prefixIntent, no)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("intent left: %v", err)
	}
	if bal, _ := n.w.Balance(user); bal != 100 {
		t.Fatalf("balance %d, want 100", bal)
	}

	// A duplicate's intent (same req_id, later: its script answered "dup"
	// or never ran) is not this record's op: not run — else a business
	// would be told its duplicate ran and send the effects again — though
	// the req_id ran (outcomeElsewhere: its caller is told "retry", never
	// "nothing moved").
	dup := in
	dup.At = r.At + 1
	no = n.w.intentNo.Add(1)
	iv, _ = sonic.Marshal(dup)
	if err := n.store.Apply(func(b *Batch) error { return b.Set(Key(prefixIntent, no), iv, nil) }); err != nil {
		t.Fatal(err)
	}
	if got, out, err := n.w.resolve(context.Background(), no, dup, nil); err != nil || out != outcomeElsewhere {
		t.Fatalf("resolve of a duplicate's intent: %+v %v %v, want not run here, run elsewhere", got, out, err)
	}
}

// OnReady listeners run when a generation other than the last one becomes
// ready on the node: once after Redis lost its data and was rebuilt (state
// that lives in Redis only is put back then), not again while it stays
// ready.
func TestOnReadyRunsAfterARebuild(t *testing.T) {
	n := seededShared(t, 1)
	var calls atomic.Int32
	n.w.OnReady(func() { calls.Add(1) })
	time.Sleep(500 * time.Millisecond) // watcher rounds on the same generation
	if c := calls.Load(); c != 0 {
		t.Fatalf("OnReady ran %d times with no new generation", c)
	}
	if err := n.rdb.Do(context.Background(), n.rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); calls.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("OnReady did not run after the rebuild")
		}
	}
	if !n.w.Ready() {
		t.Fatal("OnReady ran before the wallet was ready")
	}
	if b := redisBalanceOf(t, n, 1); b != 100 {
		t.Fatalf("rebuilt balance %d, want 100", b)
	}
	time.Sleep(500 * time.Millisecond)
	if c := calls.Load(); c != 1 {
		t.Fatalf("OnReady ran %d times for one rebuild", c)
	}
}

// seededNode starts node "a" (alone) on a fresh Redis and dir, ready, with
// user 3 credited 100 (req_id "seed").
func seededNode(t *testing.T) (*redistest.Server, string, *sharedNode) {
	t.Helper()
	rs := redistest.Start(t)
	dir := t.TempDir()
	n := startShared(t, rs.Addr, dir, "a", nil)
	waitReady(t, n)
	if _, err := n.w.Apply(Op{User: 3, ReqID: "seed", Postings: []Posting{{User: 3, Delta: 100, Reason: ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	return rs, dir, n
}

// DropTally deletes a tally in Redis and the node's share of it on disk (a
// rebuild of Redis from the disks does not bring it back).
func TestSharedDropTally(t *testing.T) {
	rs := redistest.Start(t)
	n := startShared(t, rs.Addr, t.TempDir(), "a", nil)
	waitReady(t, n)
	if _, err := n.w.Apply(Op{User: 5, ReqID: "pk", Postings: []Posting{{User: 5, Delta: 10, Reason: ReasonDev}},
		Tallies: []Tally{{Name: "pk:x", User: 7, Delta: 30}, {Name: "recv", User: 7, Delta: 30}}}); err != nil {
		t.Fatal(err)
	}
	if v, _ := n.w.TallyFresh("pk:x", 7); v != 30 {
		t.Fatalf("tally %d, want 30", v)
	}
	if v, err := n.store.Get(TallyKey("pk:x", 7)); err != nil || DecodeInt64(v) != 30 {
		t.Fatalf("the disk's share before the drop: %v %v, want 30", v, err)
	}
	if err := n.w.DropTally("pk:x", 7); err != nil {
		t.Fatal(err)
	}
	if v, _ := n.w.TallyFresh("pk:x", 7); v != 0 {
		t.Fatalf("tally %d after the drop", v)
	}
	if _, err := n.store.Get(TallyKey("pk:x", 7)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the disk's share still there: %v", err)
	}
	if v, _ := n.w.TallyFresh("recv", 7); v != 30 {
		t.Fatalf("another tally changed: %d", v)
	}
}

// A duplicate through another node whose script answered "dup" (the first
// request ran there) and whose reply was lost is told "in progress, retry
// with the same req_id" — never "unavailable, nothing moved", which a client
// would take as leave to pay again under a new req_id. Its retry replays the
// first result.
func TestSharedDuplicateWithALostReplyIsNotNothingMoved(t *testing.T) {
	_, _, a, b := twoNodesCredited(t, 6, 100)
	op := Op{User: 6, ReqID: "x", Postings: []Posting{{User: 6, Delta: -10, Reason: ReasonGift}}}
	first, err := a.w.Apply(op)
	if err != nil {
		t.Fatal(err)
	}
	b.w.crashAt = func(p string) bool { return p == "claimreply" || p == "reply" }
	if _, err := b.w.Apply(op); errors.Is(err, ErrWalletUnavailable) || !errors.Is(err, ErrInProgress) {
		t.Fatalf("duplicate whose reply was lost: %v, want ErrInProgress", err)
	}
	b.w.crashAt = nil
	if r, err := b.w.Apply(op); err != nil || !r.Replayed || r.TradeIDs[0] != first.TradeIDs[0] {
		t.Fatalf("retry: %+v %v, want the replay of trade %v", r, err, first.TradeIDs)
	}
	if bal, _ := b.w.Balance(6); bal != 90 {
		t.Fatalf("balance %d, want 90", bal)
	}
	noIntents(t, b.store)
}

// An op pinned to a generation (Op.Gen) runs only in it: in another —
// a wrong name, or the generation before Redis lost its data — it is
// refused as unavailable and nothing moves; its req_id stays free.
func TestSharedOpPinnedToAGeneration(t *testing.T) {
	const user = 42
	rs := redistest.Start(t)
	n := startShared(t, rs.Addr, t.TempDir(), "a", nil)
	waitReady(t, n)
	ctx := context.Background()
	metaGen := func() string {
		t.Helper()
		g, err := n.rdb.Do(ctx, n.rdb.B().Hget().Key(SharedMetaKey).Field("gen").Build()).ToString()
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	credit := func(req, gen string) (Result, error) {
		return n.w.Apply(Op{User: user, ReqID: req, Gen: gen, Postings: []Posting{{User: user, Delta: 10, Reason: ReasonDev}}})
	}
	balance := func(want int64) {
		t.Helper()
		if b, err := n.w.Balance(user); err != nil || b != want {
			t.Fatalf("balance %d %v, want %d", b, err, want)
		}
	}
	first := metaGen()
	if _, err := credit("c1", "not-a-generation"); !errors.Is(err, ErrWalletUnavailable) {
		t.Fatalf("pinned to another generation: %v, want unavailable", err)
	}
	balance(0)
	noIntents(t, n.store)
	if _, err := credit("c1", first); err != nil {
		t.Fatalf("pinned to the current generation: %v", err)
	}
	balance(10)

	rs.Restart() // Redis empty: a new generation, rebuilt from the ledger
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := credit("c2", "")
		if err == nil {
			break
		}
		// The first call may find the old connection reset (its outcome
		// then settled by the watcher): retried with the same req_id.
		retry := errors.Is(err, ErrWalletUnavailable) || errors.Is(err, ErrInProgress) || errors.Is(err, ErrInDoubt)
		if !retry || time.Now().After(deadline) {
			t.Fatalf("after Redis restart: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	second := metaGen()
	if second == first {
		t.Fatalf("generation %q kept across a Redis restart", first)
	}
	if _, err := credit("c3", first); !errors.Is(err, ErrWalletUnavailable) {
		t.Fatalf("pinned to the generation before the loss: %v, want unavailable", err)
	}
	balance(20)
	if r, err := credit("c3", second); err != nil || r.Replayed {
		t.Fatalf("c3 in the new generation: %+v %v, want applied once", r, err)
	}
	balance(30)
	noIntents(t, n.store)
	auditAcross(t, n.rdb, n.store)
}
