package persist_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
)

// walletNode is one node of a shared wallet in these tests: its own Pebble
// dir, a client to addr (Redis itself or a fault-injecting proxy before it).
type walletNode struct {
	dir   string
	store *persist.Store
	rdb   rueidis.Client
	w     *persist.SharedWallet
}

func openWalletNode(t *testing.T, addr, dir string, cfg persist.SharedConfig) *walletNode {
	t.Helper()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	w, err := persist.NewSharedWallet(st, rdb, cfg)
	if err != nil {
		t.Fatal(err)
	}
	n := &walletNode{dir: dir, store: st, rdb: rdb, w: w}
	t.Cleanup(n.close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.WaitReady(ctx); err != nil {
		t.Fatal("shared wallet not ready")
	}
	return n
}

func (n *walletNode) close() {
	if n.w != nil {
		n.w.Close()
		n.rdb.Close()
		_ = n.store.Close()
		n.w = nil
	}
}

func directClient(t *testing.T, addr string) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func redisBalance(t *testing.T, c rueidis.Client, user int64) int64 {
	t.Helper()
	b, err := persist.RedisBalance(c, user)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// trades lists user's trade rows in a node's ledger.
func trades(t *testing.T, st *persist.Store, user int64) []persist.Trade {
	t.Helper()
	l, err := persist.LedgerTrades(st, user)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func intents(t *testing.T, st *persist.Store) int {
	t.Helper()
	n := 0
	if err := st.Scan([]byte("intent/"), func(_, _ []byte) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Issue 11 item 6: the script ran in Redis but its reply was lost and Redis
// was then unreachable for longer than the Apply's Redis budget (rueidis
// retries reads within it: 1 s here, 5 s by default). The outcome is
// unknown to Apply, so it
// answers ErrInProgress (10409: retry with the same req_id) — not
// ErrWalletUnavailable, whose "nothing moved" would be a lie — and the
// watcher settles the intent with a fresh context once Redis is back: the
// ledger row written once, Redis and the ledger agree, a retry replays.
func TestSharedLostScriptReplySettledByWatcher(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	direct := directClient(t, rs.Addr)
	n := openWalletNode(t, px.Addr, t.TempDir(), persist.SharedConfig{Node: "a", CallTimeout: time.Second})
	const user = 30
	if _, err := n.w.Apply(persist.Op{User: user, ReqID: "seed", Postings: []persist.Posting{{User: user, Delta: 100, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	op := persist.Op{User: user, ReqID: "g", Postings: []persist.Posting{{User: user, Delta: -60, Reason: persist.ReasonGift}}}
	px.LoseReply("EVALSHA", 1500*time.Millisecond)
	r, err := n.w.Apply(op)
	if px.Fired() != 1 {
		t.Fatalf("the fault was not injected (fired %d)", px.Fired())
	}
	if !errors.Is(err, persist.ErrInProgress) {
		t.Fatalf("Apply with its script reply lost: %+v %v, want ErrInProgress", r, err)
	}
	if b := redisBalance(t, direct, user); b != 40 {
		t.Fatalf("Redis balance %d, want 40 (the script ran)", b)
	}
	// The watcher settles it: the intent goes, the ledger row is written.
	waitFor(t, "the watcher to settle the intent", func() bool {
		return intents(t, n.store) == 0 && len(trades(t, n.store, user)) == 2
	})
	rows := trades(t, n.store, user)
	var debit persist.Trade
	for _, tr := range rows {
		if tr.ReqID == "g" {
			debit = tr
		}
	}
	if debit.Delta != -60 || debit.Balance != 40 {
		t.Fatalf("ledger rows %+v, want the debit to 40 once", rows)
	}
	// A retry with the same req_id gets the original result.
	r, err = n.w.Apply(op)
	if err != nil || !r.Replayed || r.TradeIDs[0] != debit.ID || r.Balances[0] != 40 {
		t.Fatalf("retry: %+v %v, want a replay of trade %d to 40", r, err, debit.ID)
	}
	if b := redisBalance(t, direct, user); b != 40 || len(trades(t, n.store, user)) != 2 {
		t.Fatalf("after the retry: balance %d, %d rows", b, len(trades(t, n.store, user)))
	}
	n.close()
	if c, d, _ := persisttest.CheckSharedConservation(t, rs.Addr, n.dir); c != 100 || d != 60 {
		t.Fatalf("credits %d debits %d, want 100 and 60", c, d)
	}
}
