package persist_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
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

// applyScriptKey is in the command of the apply script only (its trade-id
// sequence; a rebuild's contributions name it too, none runs in these
// faults): the proxy loses that script's reply, not the claim's before it.
const applyScriptKey = "le:seq:trade"

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
	return n
}

func waitWalletsReady(t *testing.T, ns ...*walletNode) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, n := range ns {
		if err := n.w.WaitReady(ctx); err != nil {
			t.Fatal("shared wallet not ready")
		}
	}
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
	waitWalletsReady(t, n)
	const user = 30
	if _, err := n.w.Apply(persist.Op{User: user, ReqID: "seed", Postings: []persist.Posting{{User: user, Delta: 100, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	op := persist.Op{User: user, ReqID: "g", Postings: []persist.Posting{{User: user, Delta: -60, Reason: persist.ReasonGift}}}
	px.LoseReply(applyScriptKey, 1500*time.Millisecond)
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

// A duplicate of a request whose outcome is unknown (its script's reply
// lost, Redis then unreachable) is answered ErrInProgress — on the node of
// the first (which holds the request until it is settled) and on another
// (which cannot read Redis) — never with its Check's refusal: the first may
// have run (here it did). A gift retried on a new connection before it
// re-joined the room was told "failed" (10003 and biz 5557) while its debit
// stood. Once settled, the duplicate replays the first's result.
func TestSharedDuplicateInDoubtNotRefusedByItsCheck(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	cfg := persist.SharedConfig{Nodes: []string{"a", "b"}, CallTimeout: time.Second}
	cfg.Node = "a"
	a := openWalletNode(t, px.Addr, t.TempDir(), cfg)
	cfg.Node = "b"
	b := openWalletNode(t, px.Addr, t.TempDir(), cfg)
	waitWalletsReady(t, a, b)
	const user = 31
	if _, err := a.w.Apply(persist.Op{User: user, ReqID: "seed", Postings: []persist.Posting{{User: user, Delta: 100, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	op := persist.Op{User: user, ReqID: "g", Postings: []persist.Posting{{User: user, Delta: -60, Reason: persist.ReasonGift}}}
	px.LoseReply(applyScriptKey, 5*time.Second) // longer than both Applies below take to fail
	if _, err := a.w.Apply(op); !errors.Is(err, persist.ErrInProgress) {
		t.Fatalf("Apply with its script reply lost: %v, want ErrInProgress", err)
	}
	refused := errors.New("not in the room")
	dup := op
	dup.Check = func() error { return refused }
	for name, n := range map[string]*walletNode{"the first's node": a, "another node": b} {
		if _, err := n.w.Apply(dup); !errors.Is(err, persist.ErrInProgress) {
			t.Fatalf("duplicate on %s while the first is in doubt: %v, want ErrInProgress", name, err)
		}
	}
	for name, n := range map[string]*walletNode{"the first's node": a, "another node": b} {
		var r persist.Result
		waitFor(t, "a replay on "+name+" once the watcher settled the first", func() bool {
			var err error
			r, err = n.w.Apply(dup)
			if err != nil && !errors.Is(err, persist.ErrInProgress) {
				t.Fatalf("duplicate on %s: %v", name, err)
			}
			return err == nil
		})
		if !r.Replayed || r.Balances[0] != 40 {
			t.Fatalf("duplicate on %s once settled: %+v, want a replay to 40", name, r)
		}
	}
}

// A duplicate through another node while the first request is between its
// check and its script (new to Redis then) waits for the first and replays
// it — it is not checked as new: its refusal ("not in the room") would tell
// the client nothing moved while the first's debit lands.
func TestSharedDuplicateThroughAnotherNodeWaitsForTheFirst(t *testing.T) {
	rs := redistest.Start(t)
	cfg := persist.SharedConfig{Nodes: []string{"a", "b"}}
	cfg.Node = "a"
	a := openWalletNode(t, rs.Addr, t.TempDir(), cfg)
	cfg.Node = "b"
	b := openWalletNode(t, rs.Addr, t.TempDir(), cfg)
	waitWalletsReady(t, a, b)
	const user = 32
	if _, err := a.w.Apply(persist.Op{User: user, ReqID: "seed", Postings: []persist.Posting{{User: user, Delta: 100, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	op := persist.Op{User: user, ReqID: "g", Postings: []persist.Posting{{User: user, Delta: -60, Reason: persist.ReasonGift}}}
	reached, resume := make(chan struct{}), make(chan struct{})
	persist.SetCrashAt(a.w, func(point string) bool {
		if point == "intent" {
			close(reached)
			<-resume
		}
		return false
	})
	type reply struct {
		r   persist.Result
		err error
	}
	first, dup := make(chan reply, 1), make(chan reply, 1)
	go func() { r, err := a.w.Apply(op); first <- reply{r, err} }()
	<-reached // a checked it and wrote its intent; its script has not run
	refusing := op
	refusing.Check = func() error { return errors.New("not in the room") }
	go func() { r, err := b.w.Apply(refusing); dup <- reply{r, err} }()
	select {
	case d := <-dup:
		t.Fatalf("duplicate answered while the first is applying: %+v, %v", d.r, d.err)
	case <-time.After(300 * time.Millisecond):
	}
	close(resume)
	f, d := <-first, <-dup
	if f.err != nil || f.r.Balances[0] != 40 {
		t.Fatalf("first: %+v, %v", f.r, f.err)
	}
	if d.err != nil || !d.r.Replayed || d.r.Balances[0] != 40 || d.r.TradeIDs[0] != f.r.TradeIDs[0] {
		t.Fatalf("duplicate through b: %+v, %v; want the first's replay", d.r, d.err)
	}
	// Conservation: one debit in the two ledgers, the balance 100 − 60.
	var debits int
	for _, n := range []*walletNode{a, b} {
		trades, err := persist.LedgerTrades(n.store, user)
		if err != nil {
			t.Fatal(err)
		}
		for _, tr := range trades {
			if tr.Delta < 0 {
				debits++
			}
		}
	}
	if bal, err := b.w.Balance(user); err != nil || bal != 40 || debits != 1 {
		t.Fatalf("balance %d (%v), %d debits; want 40, 1", bal, err, debits)
	}

	// A request refused by its check leaves the req_id free: its retry
	// (through the other node, the rule met now) runs as new.
	persist.SetCrashAt(a.w, nil)
	next := persist.Op{User: user, ReqID: "g2", Postings: []persist.Posting{{User: user, Delta: -30, Reason: persist.ReasonGift}}}
	refused := next
	refused.Check = func() error { return errors.New("not in the room") }
	if _, err := a.w.Apply(refused); err == nil || errors.Is(err, persist.ErrInProgress) {
		t.Fatalf("refused by its check: %v", err)
	}
	if r, err := b.w.Apply(next); err != nil || r.Replayed || r.Balances[0] != 10 {
		t.Fatalf("retry after a refusal: %+v, %v; want a new debit to 10", r, err)
	}
}

// redisSnapshot is every key of a Redis with its TTL, as DUMP gives it.
type redisSnapshot map[string]struct {
	dump string
	pttl int64
}

func snapshotRedis(t *testing.T, c rueidis.Client) redisSnapshot {
	t.Helper()
	ctx := context.Background()
	keys, err := c.Do(ctx, c.B().Keys().Pattern("*").Build()).AsStrSlice()
	if err != nil {
		t.Fatal(err)
	}
	snap := redisSnapshot{}
	for _, k := range keys {
		d, err := c.Do(ctx, c.B().Dump().Key(k).Build()).ToString()
		if err != nil {
			t.Fatal(err)
		}
		ttl, err := c.Do(ctx, c.B().Pttl().Key(k).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		snap[k] = struct {
			dump string
			pttl int64
		}{d, max(ttl, 0)}
	}
	return snap
}

// restoreRedis replaces everything in Redis by snap, atomically (MULTI):
// what a restart from an older RDB snapshot, or a failover to a lagging
// replica, does under the running nodes.
func restoreRedis(t *testing.T, c rueidis.Client, snap redisSnapshot) {
	t.Helper()
	cmds := rueidis.Commands{c.B().Multi().Build(), c.B().Flushall().Build()}
	for k, v := range snap {
		cmds = append(cmds, c.B().Restore().Key(k).Ttl(v.pttl).SerializedValue(v.dump).Build())
	}
	cmds = append(cmds, c.B().Exec().Build())
	for _, r := range c.DoMulti(context.Background(), cmds...) {
		if err := r.Error(); err != nil {
			t.Fatal(err)
		}
	}
}

// metric is the value of the shared wallet's metric liveedge_<name>.
func metric(t *testing.T, w *persist.SharedWallet, name string) float64 {
	t.Helper()
	for _, c := range w.Collectors() {
		ch := make(chan *prometheus.Desc, 1)
		c.Describe(ch)
		if !strings.Contains((<-ch).String(), `"liveedge_`+name+`"`) {
			continue
		}
		mc := make(chan prometheus.Metric, 1)
		c.Collect(mc)
		var m dto.Metric
		if err := (<-mc).Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetGauge().GetValue() + m.GetCounter().GetValue()
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func ledgerSum(t *testing.T, user int64, stores ...*persist.Store) int64 {
	t.Helper()
	var s int64
	for _, st := range stores {
		for _, tr := range trades(t, st, user) {
			s += tr.Delta
		}
	}
	return s
}

// Issue 11 item 8: Redis comes back from an older snapshot under two running
// nodes (same generation in le:meta, balances rolled back: a spent coin
// returns, an acknowledged credit vanishes). The nodes notice that Redis has
// fewer of their ops than their ledgers, rebuild it from the ledgers, and
// the balances equal the ledgers again; idempotency survives.
func TestSharedRedisRollbackDetectedAndRebuilt(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	nodes := []string{"a", "b"}
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: nodes})
	b := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	post := func(n *walletNode, user int64, req string, delta int64) persist.Result {
		t.Helper()
		r, err := n.w.Apply(persist.Op{User: user, ReqID: req, Postings: []persist.Posting{{User: user, Delta: delta, Reason: persist.ReasonDev}}})
		if err != nil {
			t.Fatalf("%s: %v", req, err)
		}
		return r
	}
	const u1, u2 = 40, 41
	post(a, u1, "seed", 100)
	post(b, u1, "g1", -10)
	snap := snapshotRedis(t, direct)
	spent := post(a, u1, "g2", -30) // will "return" with the rollback
	post(b, u2, "c1", 50)           // will "vanish"
	post(a, u1, "g3", -5)
	restoreRedis(t, direct, snap)
	if b := redisBalance(t, direct, u1); b != 90 {
		t.Fatalf("after the restore Redis says %d, want the snapshot's 90", b)
	}
	// State of other subsystems in the rolled-back Redis, which handle a
	// rollback themselves: the wallet's reset leaves it (it deleted every
	// le:* key, which turned a rollback into a total loss for them).
	others := []string{"le:r:{7}:seq", "le:{pk}:run", "le:off:{40}", "le:rp:somecode"}
	for _, k := range others {
		if err := direct.Do(context.Background(), direct.B().Set().Key(k).Value("kept").Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	// No debit is checked against the rolled-back balance, even before the
	// watcher has noticed: the apply script itself compares the counts.
	if r, err := a.w.Apply(persist.Op{User: u1, ReqID: "probe", Postings: []persist.Posting{{User: u1, Delta: -1, Reason: persist.ReasonGift}}}); !errors.Is(err, persist.ErrWalletUnavailable) {
		t.Fatalf("a debit right after the rollback: %+v %v, want ErrWalletUnavailable", r, err)
	}
	waitFor(t, "the nodes to rebuild Redis from their ledgers", func() bool {
		return a.w.Ready() && b.w.Ready() &&
			redisBalance(t, direct, u1) == 55 && redisBalance(t, direct, u2) == 50
	})
	if metric(t, a.w, "wallet_data_losses_total")+metric(t, b.w, "wallet_data_losses_total") == 0 {
		t.Fatal("no node counted the data loss (liveedge_wallet_data_losses_total)")
	}
	waitFor(t, "the audits to pass again (liveedge_wallet_audit_mismatch 0)", func() bool {
		return metric(t, a.w, "wallet_audit_mismatch") == 0 && metric(t, b.w, "wallet_audit_mismatch") == 0
	})
	for _, k := range others {
		if v, err := direct.Do(context.Background(), direct.B().Get().Key(k).Build()).ToString(); err != nil || v != "kept" {
			t.Fatalf("%s after the wallet's reset: %q %v, want it kept", k, v, err)
		}
	}
	for _, u := range []int64{u1, u2} {
		if got, want := redisBalance(t, direct, u), ledgerSum(t, u, a.store, b.store); got != want {
			t.Fatalf("user %d: Redis %d, ledgers %d", u, got, want)
		}
	}
	// The spent coins did not come back: a debit of more than is left fails,
	// a retried request replays, and new ops work.
	if _, err := b.w.Apply(persist.Op{User: u1, ReqID: "big", Postings: []persist.Posting{{User: u1, Delta: -60, Reason: persist.ReasonGift}}}); !errors.Is(err, persist.ErrInsufficient) {
		t.Fatalf("debit of 60 from 55: %v", err)
	}
	r, err := b.w.Apply(persist.Op{User: u1, ReqID: "g2", Postings: []persist.Posting{{User: u1, Delta: -30, Reason: persist.ReasonDev}}})
	if err != nil || !r.Replayed || r.TradeIDs[0] != spent.TradeIDs[0] {
		t.Fatalf("retry of g2: %+v %v, want a replay of %+v", r, err, spent)
	}
	next := post(b, u1, "g4", -5)
	if next.Balances[0] != 50 {
		t.Fatalf("g4: %+v", next)
	}
	for _, old := range []int64{spent.TradeIDs[0]} {
		if next.TradeIDs[0] <= old {
			t.Fatalf("trade id %d reissued (<= %d)", next.TradeIDs[0], old)
		}
	}
	a.close()
	b.close()
	if c, d, _ := persisttest.CheckSharedConservation(t, rs.Addr, a.dir, b.dir); c != 150 || d != 50 {
		t.Fatalf("credits %d debits %d, want 150 and 50", c, d)
	}
}

// Redis comes back from an older snapshot while a node is down: the loss
// took only the dead node's ops (an acknowledged credit, a debit), so no
// live node's own counts fall behind its ledger. The live node still sees
// it — the dead node's count in Redis fell below what it read there before
// — and no op runs against the rolled-back balances (the spent coins are
// not spendable again) until the dead node is back and the wallet rebuilt;
// then the balances are the ledgers' again. Before, the live node went on
// as if nothing had happened.
func TestSharedRollbackOfADeadNodesOpsDetected(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	nodes := []string{"a", "b"}
	adir := t.TempDir()
	a := openWalletNode(t, rs.Addr, adir, persist.SharedConfig{Node: "a", Nodes: nodes})
	b := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	post := func(n *walletNode, user int64, req string, delta int64) {
		t.Helper()
		if _, err := n.w.Apply(persist.Op{User: user, ReqID: req, Postings: []persist.Posting{{User: user, Delta: delta, Reason: persist.ReasonDev}}}); err != nil {
			t.Fatalf("%s: %v", req, err)
		}
	}
	const u1, u2 = 50, 51
	post(b, u1, "seed", 100)
	snap := snapshotRedis(t, direct)
	post(a, u1, "spent", -80) // through a: will "return" with the rollback
	post(a, u2, "credit", 50) // through a: will "vanish"
	// b's watcher reads a's count (every 200 ms): a's two ops are there.
	waitFor(t, "b to read a's count", func() bool { return persist.PeerSeen(b.w, "a") == 2 })
	a.close() // a is down
	restoreRedis(t, direct, snap)
	if bal := redisBalance(t, direct, u1); bal != 100 {
		t.Fatalf("after the restore Redis says %d, want the snapshot's 100", bal)
	}
	waitFor(t, "b to notice the loss of a's ops", func() bool { return b.w.DataLosses() > 0 })
	if _, err := b.w.Apply(persist.Op{User: u1, ReqID: "again", Postings: []persist.Posting{{User: u1, Delta: -80, Reason: persist.ReasonGift}}}); !errors.Is(err, persist.ErrWalletUnavailable) {
		t.Fatalf("spending the returned coins through b: %v, want ErrWalletUnavailable (rebuilding until a is back)", err)
	}
	a = openWalletNode(t, rs.Addr, adir, persist.SharedConfig{Node: "a", Nodes: nodes})
	waitFor(t, "the rebuild with a back", func() bool {
		return a.w.Ready() && b.w.Ready() && redisBalance(t, direct, u1) == 20 && redisBalance(t, direct, u2) == 50
	})
	a.close()
	b.close()
	if c, d, _ := persisttest.CheckSharedConservation(t, rs.Addr, adir, b.dir); c != 150 || d != 80 {
		t.Fatalf("credits %d debits %d, want 150 and 80", c, d)
	}
}

// The same rollback, and the reset that should follow its detection fails
// (a Redis timeout, a node's reset racing another's): the rolled-back
// generation must stay out of service — b retries the reset, never serves
// Apply against the returned balances. Before, b's watcher found the old
// generation "ready" in le:meta on its next tick and used it again until
// the next audit (~200 ms, every cycle while the reset failed): the 80
// coins a spent came back and could be spent twice.
func TestSharedRollbackWithAFailedResetStaysOutOfService(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	nodes := []string{"a", "b"}
	adir := t.TempDir()
	a := openWalletNode(t, rs.Addr, adir, persist.SharedConfig{Node: "a", Nodes: nodes})
	b := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	const u1 = 50
	if _, err := b.w.Apply(persist.Op{User: u1, ReqID: "seed", Postings: []persist.Posting{{User: u1, Delta: 100, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	snap := snapshotRedis(t, direct)
	if _, err := a.w.Apply(persist.Op{User: u1, ReqID: "spent", Postings: []persist.Posting{{User: u1, Delta: -80, Reason: persist.ReasonGift}}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to read a's count", func() bool { return persist.PeerSeen(b.w, "a") == 1 })
	a.close()
	persist.FailResets(b.w, 8) // ~8 watcher ticks of failed resets
	restoreRedis(t, direct, snap)
	waitFor(t, "b to notice the loss of a's ops", func() bool { return b.w.DataLosses() > 0 })
	for i, until := 0, time.Now().Add(2*time.Second); time.Now().Before(until); i++ {
		if b.w.Ready() {
			t.Fatalf("b serves the rolled-back generation again after a failed reset (%d ms after the detection)", i*5)
		}
		if _, err := b.w.Apply(persist.Op{User: u1, ReqID: fmt.Sprint("again-", i), Postings: []persist.Posting{{User: u1, Delta: -80, Reason: persist.ReasonGift}}}); err == nil {
			t.Fatal("the 80 coins a spent were spent again through b")
		}
		time.Sleep(5 * time.Millisecond)
	}
	a = openWalletNode(t, rs.Addr, adir, persist.SharedConfig{Node: "a", Nodes: nodes})
	waitFor(t, "the rebuild with a back", func() bool {
		return a.w.Ready() && b.w.Ready() && redisBalance(t, direct, u1) == 20
	})
	a.close()
	b.close()
	if c, d, _ := persisttest.CheckSharedConservation(t, rs.Addr, adir, b.dir); c != 100 || d != 80 {
		t.Fatalf("credits %d debits %d, want 100 and 80", c, d)
	}
}

// With Redis unreachable, every op leaves its intent on disk and its
// records in memory for the watcher (its outcome unknown): past
// MaxUnsettled they are refused before anything is written — as
// unavailable, nothing moved — so a long outage under load does not grow
// them without bound (it did: one per request, for as long as it lasted).
// Once Redis is back the watcher settles what waits, and ops run again.
func TestSharedUnsettledOpsAreBounded(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	st, w := persisttest.OpenSharedWallet(t, px.Addr, persist.SharedConfig{Node: "a", CallTimeout: 200 * time.Millisecond, MaxUnsettled: 3})
	op := func(req string) persist.Op {
		return persist.Op{User: 7, ReqID: req, Postings: []persist.Posting{{User: 7, Delta: 10, Reason: persist.ReasonDev}}}
	}
	if _, err := w.Apply(op("warm")); err != nil {
		t.Fatal(err)
	}
	px.LoseReply("EVALSHA", 3*time.Second) // the next script's reply lost; then Redis refuses connections
	doubt, refused := 0, 0
	for i := range 8 {
		_, err := w.Apply(op(fmt.Sprint("r", i)))
		switch {
		case errors.Is(err, persist.ErrWalletUnavailable):
			refused++
		case err != nil:
			doubt++
		default:
			t.Fatalf("op %d applied with Redis unreachable", i)
		}
	}
	if n := intents(t, st); doubt > 3 || n > 3 || refused < 5 {
		t.Fatalf("%d ops left in doubt, %d intents on disk, %d refused: want at most 3 waiting", doubt, n, refused)
	}
	waitFor(t, "the watcher to settle what waits once Redis is back", func() bool { return intents(t, st) == 0 })
	if _, err := w.Apply(op("after")); err != nil {
		t.Fatalf("an op once Redis is back: %v", err)
	}
}

func idemRows(t *testing.T, st *persist.Store) (reqs []string) {
	t.Helper()
	if err := st.Scan(persist.PrefixIdem, func(k, _ []byte) error {
		reqs = append(reqs, string(k[len(persist.PrefixIdem)+16:]))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return reqs
}

// Issue 11 item 9 (shared half): the idem/ rows the shared wallet writes in
// Pebble expire after the 25 h window, from the watcher, hour by hour (an
// injected clock) — except those an unresolved intent may still need to
// tell that its share is on disk.
func TestSharedIdemRowsExpire(t *testing.T) {
	rs := redistest.Start(t)
	t0 := time.Date(2026, 3, 1, 10, 30, 0, 0, time.UTC)
	var clock atomic.Int64
	clock.Store(t0.UnixNano())
	at := func(d time.Duration) { clock.Store(t0.Add(d).UnixNano()) }
	now := func() time.Time { return time.Unix(0, clock.Load()) }
	n := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Now: now})
	waitWalletsReady(t, n)
	const user = 50
	if _, err := n.w.Apply(persist.Op{User: user, ReqID: "r1", Postings: []persist.Posting{{User: user, Delta: 100, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	// r2, two hours later, stops after its ledger write, before the key is
	// marked done: its intent stays, and needs r2's idem row when resolved.
	at(2 * time.Hour)
	persist.SetCrashAt(n.w, func(p string) bool { return p == "final" })
	op2 := persist.Op{User: user, ReqID: "r2", Postings: []persist.Posting{{User: user, Delta: -10, Reason: persist.ReasonGift}}}
	if _, err := n.w.Apply(op2); !errors.Is(err, persist.ErrCrashed) {
		t.Fatal(err)
	}
	persist.SetCrashAt(n.w, nil)
	if rows := idemRows(t, n.store); len(rows) != 2 || intents(t, n.store) != 1 {
		t.Fatalf("idem rows %q, %d intents", rows, intents(t, n.store))
	}
	// 30 h after r1 (28 h after r2): r1's row goes; r2's is older than the
	// window too but stays while its intent does.
	at(30 * time.Hour)
	waitFor(t, "r1's idem row to expire", func() bool {
		rows := idemRows(t, n.store)
		return len(rows) == 1 && rows[0] == "r2"
	})
	if err := n.w.ResolveIntents(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rows, in := trades(t, n.store, user), intents(t, n.store); len(rows) != 2 || in != 0 {
		t.Fatalf("after resolving r2: %d trade rows (want 2: r2 written once), %d intents", len(rows), in)
	}
	// An hour later the watcher expires again: r2's row goes too.
	at(31 * time.Hour)
	waitFor(t, "r2's idem row to expire", func() bool { return len(idemRows(t, n.store)) == 0 })
	n.close()
	if c, d, _ := persisttest.CheckSharedConservation(t, rs.Addr, n.dir); c != 100 || d != 10 {
		t.Fatalf("credits %d debits %d", c, d)
	}
}

// An intent whose script ran is resolved however long it waited: here its
// node stopped after the script, and the idempotency key expired (its 25 h
// TTL, shortened) before the node came back. The intent is settled from
// le:applied:<node> — the ledger row written once, Redis and the ledger
// agree — not dropped while Redis keeps the debit.
func TestSharedIntentResolvedAfterIdemKeyExpired(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	dir := t.TempDir()
	n := openWalletNode(t, rs.Addr, dir, persist.SharedConfig{Node: "a"})
	waitWalletsReady(t, n)
	const user = 60
	if _, err := n.w.Apply(persist.Op{User: user, ReqID: "seed", Postings: []persist.Posting{{User: user, Delta: 100, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	persist.SetCrashAt(n.w, func(p string) bool { return p == "script" })
	op := persist.Op{User: user, ReqID: "old", Postings: []persist.Posting{{User: user, Delta: -25, Reason: persist.ReasonGift}}}
	if _, err := n.w.Apply(op); !errors.Is(err, persist.ErrCrashed) {
		t.Fatal(err)
	}
	n.close()
	idem := "le:idem:{60}:old"
	if err := direct.Do(context.Background(), direct.B().Pexpire().Key(idem).Milliseconds(1).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the idempotency key to expire", func() bool {
		k, err := direct.Do(context.Background(), direct.B().Exists().Key(idem).Build()).AsInt64()
		return err == nil && k == 0
	})
	n = openWalletNode(t, rs.Addr, dir, persist.SharedConfig{Node: "a"}) // resolves the intent
	waitWalletsReady(t, n)
	if in, rows := intents(t, n.store), trades(t, n.store, user); in != 0 || len(rows) != 2 || rows[1].Delta != -25 {
		t.Fatalf("after the restart: %d intents, ledger rows %+v (want the debit once)", in, rows)
	}
	if b := redisBalance(t, direct, user); b != 75 {
		t.Fatalf("balance %d, want 75", b)
	}
	n.close()
	if c, d, _ := persisttest.CheckSharedConservation(t, rs.Addr, dir); c != 100 || d != 25 {
		t.Fatalf("credits %d debits %d", c, d)
	}
}

// A user id of 15 digits or more (a snowflake id from an app's accounts)
// comes back exact in the shared wallet's trade list: the apply script
// wrote it as a Lua number (a double, printed with 14 digits), and the
// listing failed to decode "1.2345678901235e+17".
func TestSharedTradesOfABigUserID(t *testing.T) {
	rs := redistest.Start(t)
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: []string{"a"}})
	waitWalletsReady(t, a)
	const user = int64(123456789012345678) // > 2^53 too
	if _, err := a.w.Apply(persist.Op{User: user, ReqID: "big", Postings: []persist.Posting{{User: user, Delta: 7, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	trades, err := a.w.Trades(user, 0, 10)
	if err != nil || len(trades) != 1 || trades[0].User != user || trades[0].Delta != 7 {
		t.Fatalf("trades of user %d: %+v %v", user, trades, err)
	}
}

// A Redis rollback that keeps an op's script but loses its done mark (an
// AOF or a replica a few writes behind, at a quiet moment: the counts agree,
// nothing is rebuilt) left the op's idempotency key pending and its
// le:applied entry behind: every retry answered "in progress" until the key
// expired, a day later. The watcher now marks it done again from the entry
// (its intent is gone: the op was finalized here), and a retry replays.
func TestSharedDoneMarkLostToARollbackMended(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: []string{"a"}})
	waitWalletsReady(t, a)
	op := persist.Op{User: 50, ReqID: "r1", Postings: []persist.Posting{{User: 50, Delta: 9, Reason: persist.ReasonDev}}}
	first, err := a.w.Apply(op)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	key := "le:idem:{50}:r1"
	res, err := direct.Do(ctx, direct.B().Get().Key(key).Build()).ToString()
	if err != nil || strings.HasPrefix(res, "~") {
		t.Fatalf("the op's key %q %v, want its result, done", res, err)
	}
	// The rollback: the key pending again, the entry back (under an intent
	// number this node has no intent of).
	if err := direct.Do(ctx, direct.B().Set().Key(key).Value("~"+res).Keepttl().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if err := direct.Do(ctx, direct.B().Hset().Key("le:applied:a").FieldValue().FieldValue("999999", res+"#"+key).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		r, err := a.w.Apply(op)
		if err == nil {
			if !r.Replayed || r.TradeIDs[0] != first.TradeIDs[0] {
				t.Fatalf("retry: %+v, want a replay of %+v", r, first)
			}
			break
		}
		if !errors.Is(err, persist.ErrInProgress) || time.Now().After(deadline) {
			t.Fatalf("retry after the rollback: %v (want a replay once mended)", err)
		}
	}
	if n, err := direct.Do(ctx, direct.B().Hlen().Key("le:applied:a").Build()).AsInt64(); err != nil || n != 0 {
		t.Fatalf("le:applied:a has %d entries (%v), want none", n, err)
	}
}

// Balances of 15 digits and more come back exact, from Apply, a replay,
// the trade list and a restart: the apply script wrote its result with
// table.concat, which prints a Lua number with 14 significant digits
// ("1.0000000000001e+14"), so once a balance reached 1e14 Apply failed
// after the money moved in Redis — a plain error ("gift failed") for a
// debit that stood, nothing in the ledger, the key pending for 25 h — and
// the trade's JSON balance had the same flaw (its listing failed).
func TestSharedBalancesOfFifteenDigits(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: []string{"a"}})
	waitWalletsReady(t, a)
	const user = 40
	apply := func(req string, delta, want int64) persist.Result {
		t.Helper()
		r, err := a.w.Apply(persist.Op{User: user, ReqID: req, Postings: []persist.Posting{{User: user, Delta: delta, Reason: persist.ReasonDev}}})
		if err != nil || len(r.Balances) != 1 || r.Balances[0] != want {
			t.Fatalf("%s (%+d): %+v %v, want balance %d", req, delta, r, err, want)
		}
		return r
	}
	apply("c1", 99_999_999_999_990, 99_999_999_999_990)
	apply("c2", 20, 100_000_000_000_010)
	apply("c3", 123_456_789_012_345, 223_456_789_012_355)
	g := apply("g", -5, 223_456_789_012_350)
	if r := apply("g", -5, 223_456_789_012_350); !r.Replayed || r.TradeIDs[0] != g.TradeIDs[0] {
		t.Fatalf("retry: %+v, want the replay of %+v", r, g)
	}
	if b := redisBalance(t, direct, user); b != 223_456_789_012_350 {
		t.Fatalf("Redis balance %d", b)
	}
	list, err := a.w.Trades(user, 0, 10)
	if err != nil || len(list) != 4 {
		t.Fatalf("trades: %+v %v", list, err)
	}
	if tr := list[1]; tr.Delta != 123_456_789_012_345 || tr.Balance != 223_456_789_012_355 {
		t.Fatalf("trade c3 listed as %+v", tr)
	}
	rows := trades(t, a.store, user)
	if len(rows) != 4 || rows[3].Balance != 223_456_789_012_350 || intents(t, a.store) != 0 {
		t.Fatalf("ledger rows %+v, %d intents left", rows, intents(t, a.store))
	}
	// A restart (every intent resolved) opens.
	a.close()
	a = openWalletNode(t, rs.Addr, a.dir, persist.SharedConfig{Node: "a", Nodes: []string{"a"}})
	waitWalletsReady(t, a)
	a.close()
	if c, d, _ := persisttest.CheckSharedConservation(t, rs.Addr, a.dir); c != 223_456_789_012_355 || d != 5 {
		t.Fatalf("credits %d debits %d", c, d)
	}
}

// An op that would take a balance past MaxBalance (2^53 - 1, the largest
// integer a Lua number holds exactly) is refused by the script with nothing
// written (ErrBalanceLimit), and a retry is refused again; a balance at the
// bound is exact and takes debits.
func TestSharedBalanceAboveTheBoundRefused(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: []string{"a"}})
	waitWalletsReady(t, a)
	const user = 41
	op := func(req string, ps ...persist.Posting) persist.Op {
		return persist.Op{User: user, ReqID: req, Postings: ps}
	}
	dev := func(u, d int64) persist.Posting { return persist.Posting{User: u, Delta: d, Reason: persist.ReasonDev} }
	if _, err := a.w.Apply(op("c1", dev(user, persist.MaxBalance-1))); err != nil {
		t.Fatal(err)
	}
	if r, err := a.w.Apply(op("c2", dev(user, 1))); err != nil || r.Balances[0] != persist.MaxBalance {
		t.Fatalf("credit to the bound: %+v %v", r, err)
	}
	for i := 0; i < 2; i++ { // the retry too
		if r, err := a.w.Apply(op("over", dev(user, 1))); !errors.Is(err, persist.ErrBalanceLimit) {
			t.Fatalf("credit past the bound (try %d): %+v %v, want ErrBalanceLimit", i, r, err)
		}
	}
	// A delta past the bound itself, and an op whose other posting is fine:
	// nothing of either moves.
	for _, d := range []int64{persist.MaxBalance + 1, -persist.MaxBalance - 1} { // as the Pebble ledger
		if _, err := a.w.Apply(op(fmt.Sprint("huge", d), dev(user+1, d))); !errors.Is(err, persist.ErrBalanceLimit) {
			t.Fatalf("delta %d: %v", d, err)
		}
	}
	if _, err := a.w.Apply(op("pair", dev(user+1, 5), dev(user, 5))); !errors.Is(err, persist.ErrBalanceLimit) {
		t.Fatalf("op with a posting past the bound: %v", err)
	}
	if r, err := a.w.Apply(op("d", persist.Posting{User: user, Delta: -7, Reason: persist.ReasonGift})); err != nil || r.Balances[0] != persist.MaxBalance-7 {
		t.Fatalf("debit at the bound: %+v %v", r, err)
	}
	if b, b2 := redisBalance(t, direct, user), redisBalance(t, direct, user+1); b != persist.MaxBalance-7 || b2 != 0 {
		t.Fatalf("Redis balances %d and %d", b, b2)
	}
	if n := intents(t, a.store); n != 0 {
		t.Fatalf("%d intents left", n)
	}
	a.close()
	persisttest.CheckSharedConservation(t, rs.Addr, a.dir)
}

// A script's "ok" whose result this node cannot read (here the reply is
// mangled on the wire; before the script wrote numbers with %d, a balance
// of 1e14) means the money moved: Apply answers ErrInDoubt and leaves the
// op to the watcher, which settles it from Redis and tells the listeners —
// it answered that plain parse error, which callers tell as "failed",
// and nothing settled the op.
func TestSharedUnreadableResultIsInDoubt(t *testing.T) {
	rs := redistest.Start(t)
	px := redistest.StartProxy(t, rs.Addr)
	n := openWalletNode(t, px.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: []string{"a"}, CallTimeout: time.Second})
	waitWalletsReady(t, n)
	settled := make(chan persist.Settled, 1)
	n.w.OnSettled(func(st persist.Settled) { settled <- st })
	const user = 42
	op := persist.Op{User: user, ReqID: "c", Postings: []persist.Posting{{User: user, Delta: 77, Reason: persist.ReasonDev}}}
	px.MangleReply("|77|", "|7x|") // "<trade id>|<balance>|<at>"
	r, err := n.w.Apply(op)
	if px.Fired() != 1 {
		t.Fatalf("the fault was not injected (fired %d)", px.Fired())
	}
	if !errors.Is(err, persist.ErrInDoubt) {
		t.Fatalf("Apply with an unreadable result: %+v %v, want ErrInDoubt", r, err)
	}
	select {
	case st := <-settled:
		if !st.Ran || st.ReqID != "c" || st.Result.Balances[0] != 77 {
			t.Fatalf("settled %+v, want ran to 77", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher never settled the op")
	}
	// The request stays busy on this node until its listeners ran (the
	// watcher tells them, then lets it go): a retry meanwhile is answered
	// ErrInProgress, "retry with the same req_id", as a client would.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		r, err = n.w.Apply(op)
		if !errors.Is(err, persist.ErrInProgress) || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || !r.Replayed || r.Balances[0] != 77 {
		t.Fatalf("retry: %+v %v, want a replay to 77", r, err)
	}
	if rows := trades(t, n.store, user); len(rows) != 1 || intents(t, n.store) != 0 {
		t.Fatalf("ledger rows %+v", rows)
	}
	n.close()
	persisttest.CheckSharedConservation(t, rs.Addr, n.dir)
}

// A duplicate whose first request's stored result cannot be read (one a
// script before this fix wrote for a balance of 1e14) ran: it is answered
// ErrInProgress ("retry with the same req_id"), not a plain parse error
// that callers tell as "failed".
func TestSharedUnreadableStoredResultIsInProgress(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: []string{"a"}})
	waitWalletsReady(t, a)
	const user = 43
	ctx := context.Background()
	if err := direct.Do(ctx, direct.B().Set().Key(fmt.Sprintf("le:idem:{%d}:g", user)).Value("9|1.0000000000001e+14|1765000000000").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	_, err := a.w.Apply(persist.Op{User: user, ReqID: "g", Postings: []persist.Posting{{User: user, Delta: -5, Reason: persist.ReasonGift}}})
	if !errors.Is(err, persist.ErrInProgress) {
		t.Fatalf("duplicate of an unreadable result: %v, want ErrInProgress", err)
	}
	if b := redisBalance(t, direct, user); b != 0 || intents(t, a.store) != 0 {
		t.Fatalf("balance %d, %d intents: the duplicate moved something", b, intents(t, a.store))
	}
}

// Redis comes back from a snapshot taken while a generation was rebuilding
// (only node a had contributed then), after it had gone ready and money had
// moved: the generation is rebuilding again in Redis. A generation never
// goes back from ready, so the nodes that saw it ready take it for the
// rollback it is — a new generation, rebuilt from the ledgers — instead of
// waiting forever for contributions they remember having made (before:
// never ready again, every Apply 50000, until a node restarted).
func TestSharedRollbackToAMidRebuildSnapshotRebuilt(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	nodes := []string{"a", "b"}
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: nodes})
	doneMarks(t, direct)
	if a.w.Ready() {
		t.Fatal("ready with one of two nodes")
	}
	snap := snapshotRedis(t, direct) // rebuilding, a's contribution in
	b := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	credit := func(n *walletNode, req string, amount int64) {
		t.Helper()
		if _, err := n.w.Apply(persist.Op{User: 5, ReqID: req, Postings: []persist.Posting{{User: 5, Delta: amount, Reason: persist.ReasonDev}}}); err != nil {
			t.Fatal(err)
		}
	}
	credit(a, "c1", 10)
	credit(b, "c2", 7)
	restoreRedis(t, direct, snap)
	waitFor(t, "the wallet ready again", func() bool {
		st, err := direct.Do(context.Background(), direct.B().Hget().Key(persist.SharedMetaKey).Field("state").Build()).ToString()
		return err == nil && st == "ready" && a.w.Ready() && b.w.Ready()
	})
	if got, want := redisBalance(t, direct, 5), ledgerSum(t, 5, a.store, b.store); got != want || want != 17 {
		t.Fatalf("balance in Redis %d, ledgers %d, want 17", got, want)
	}
	credit(a, "c3", 1) // money moves again
	if got := redisBalance(t, direct, 5); got != 18 {
		t.Fatalf("balance %d after another credit, want 18", got)
	}
}

// A node's contribution to a rebuilding generation is lost (Redis, fsyncing
// its AOF once a second, crashed right after the node's last batch and its
// done mark): the node contributes again when it finds its mark missing —
// each batch once (its marker), so nothing is added twice — and the
// generation goes ready when the last node comes (before: a node took its
// own memory for the mark, and the rebuild waited forever).
func TestSharedLostContributionMadeAgain(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	nodes := []string{"a", "b"}
	dirB := t.TempDir()
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: nodes})
	b := openWalletNode(t, rs.Addr, dirB, persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	if _, err := a.w.Apply(persist.Op{User: 5, ReqID: "c1", Postings: []persist.Posting{{User: 5, Delta: 10, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	b.close()
	ctx := context.Background()
	if err := direct.Do(ctx, direct.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	doneKey := doneMarks(t, direct)
	// Lost: the done mark (the batches' markers and effects stay).
	if err := direct.Do(ctx, direct.B().Srem().Key(doneKey).Member("a").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	b = openWalletNode(t, rs.Addr, dirB, persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	if got := redisBalance(t, direct, 5); got != 10 {
		t.Fatalf("balance %d after the rebuild, want 10 (a's batches added once)", got)
	}
}

// While the wallet is rebuilt after a Redis loss, what Redis holds is only
// the shares of the nodes that contributed so far: the balance, the tallies
// and the trade list read then are not answers (a user's debit without the
// credit made on a node still down read -30) — ErrWalletUnavailable until
// the generation is ready. The rebuilt trade lists hold every node's recent
// trades again, as before the loss (they were empty: the rebuild did not
// contribute them), and a user with more trades than the list keeps gets
// the newest.
func TestSharedReadsWaitForTheRebuildAndTradesComeBack(t *testing.T) {
	rs := redistest.Start(t)
	direct := directClient(t, rs.Addr)
	nodes := []string{"a", "b"}
	a := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "a", Nodes: nodes})
	b := openWalletNode(t, rs.Addr, t.TempDir(), persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	const u, busy = 77, 78
	apply := func(n *walletNode, user int64, req string, delta int64) {
		t.Helper()
		op := persist.Op{User: user, ReqID: req, Postings: []persist.Posting{{User: user, Delta: delta, Reason: persist.ReasonDev}}}
		if delta < 0 {
			op.Postings[0].Reason = persist.ReasonGift
		}
		if _, err := n.w.Apply(op); err != nil {
			t.Fatal(err)
		}
	}
	apply(b, u, "c1", 100)
	apply(a, u, "d1", -30)
	for i := range 1005 { // more than the list keeps, over both nodes
		apply([]*walletNode{a, b}[i%2], busy, fmt.Sprintf("m%d", i), 1)
	}
	listed := func(user int64) []persist.Trade {
		t.Helper()
		var all []persist.Trade
		before := int64(0)
		for {
			page, err := a.w.Trades(user, before, 100)
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, page...)
			if len(page) < 100 {
				return all
			}
			before = page[len(page)-1].ID
		}
	}
	wantU, wantBusy := listed(u), listed(busy)
	if len(wantU) != 2 || len(wantBusy) != 1000 {
		t.Fatalf("listed %d and %d trades before the loss, want 2 and 1000", len(wantU), len(wantBusy))
	}
	b.close()
	if err := direct.Do(context.Background(), direct.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	doneMarks(t, direct)
	for i := range 2 { // right after the loss, and with a's share in
		if bal, err := a.w.Balance(u); !errors.Is(err, persist.ErrWalletUnavailable) {
			t.Fatalf("read %d: balance %d, %v while rebuilding; want ErrWalletUnavailable", i, bal, err)
		}
		if v, err := a.w.Tally("received", u); !errors.Is(err, persist.ErrWalletUnavailable) {
			t.Fatalf("read %d: tally %d, %v while rebuilding; want ErrWalletUnavailable", i, v, err)
		}
		if v, err := a.w.TallyFresh("received", u); !errors.Is(err, persist.ErrWalletUnavailable) {
			t.Fatalf("read %d: fresh tally %d, %v while rebuilding; want ErrWalletUnavailable", i, v, err)
		}
		if l, err := a.w.Trades(u, 0, 10); !errors.Is(err, persist.ErrWalletUnavailable) {
			t.Fatalf("read %d: %d trades, %v while rebuilding; want ErrWalletUnavailable", i, len(l), err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	b = openWalletNode(t, rs.Addr, b.dir, persist.SharedConfig{Node: "b", Nodes: nodes})
	waitWalletsReady(t, a, b)
	if bal, err := a.w.Balance(u); err != nil || bal != 70 {
		t.Fatalf("balance %d, %v after the rebuild; want 70", bal, err)
	}
	for user, want := range map[int64][]persist.Trade{u: wantU, busy: wantBusy} {
		if got := listed(user); !reflect.DeepEqual(got, want) {
			t.Fatalf("user %d: %d trades listed after the rebuild, want the %d listed before (first %+v, want %+v)",
				user, len(got), len(want), got[:min(1, len(got))], want[0])
		}
	}
}

// doneMarks waits until the one rebuilding generation has a set of done
// marks (a node has contributed to it) and returns its key.
func doneMarks(t *testing.T, direct rueidis.Client) string {
	t.Helper()
	var key string
	waitFor(t, "a contribution", func() bool {
		keys, err := direct.Do(context.Background(), direct.B().Keys().Pattern("le:contrib:*:done").Build()).AsStrSlice()
		if err != nil || len(keys) != 1 {
			return false
		}
		key = keys[0]
		return true
	})
	return key
}
