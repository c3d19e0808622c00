package persist

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bytedance/sonic"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/rueidis"
)

// Detecting partial Redis data loss, and expiring the shared wallet's local
// idempotency rows.
//
// The generation in le:meta only tells that Redis restarted empty. Redis can
// also come back from an older RDB/AOF snapshot, or a failover can promote a
// lagging replica: le:meta is still there, but balances are rolled back
// (spent coins return, acknowledged credits vanish). To notice, every node
// counts the ops it applied, twice:
//
//   - in Redis, le:node:<node> {n, sum}: incremented by the apply script
//     itself, atomically with the op (n ops, Σ of their deltas);
//   - in its Pebble, wm/applied and wm/sum (merge-add): written in the same
//     fsynced batch as the op's ledger share.
//
// An op's script runs before its share is written, so in a healthy Redis
// n(Redis) ≥ n(ledger) always, and when they are equal the same ops are in
// both (those on disk are a subset of those that ran), so the sums are
// equal too. Redis with fewer ops than the ledger — or, at equal counts, a
// different sum — has lost data. The apply script checks it before every op
// (it is given the node's durable count, and answers "lost"), and the
// watcher audits it every tick (liveedge_wallet_audit_mismatch). Either way
// the node resets the generation (resetScript: the wallet's keys are
// deleted, a new generation starts rebuilding) and every node contributes
// its ledger, counts included, as after an empty restart.
//
// Every node also watches the other nodes' counts in Redis: within a
// generation a node's n only grows (scripts add to it; only a new
// generation starts it again), so n below what this node read there before
// is a loss too — one that took a node's ops while that node is down (it
// would otherwise go unseen until it came back: its acknowledged credits
// gone from the balances, its debits spendable again). The rebuild that
// follows waits for every node, the dead one included.
//
// Limits: a node knows another's count as of its last audit (every 200 ms)
// and only since it started; a loss of the ops a dead node applied after
// every live node's last look at its count is seen only when it comes back.
// Ops applied between the snapshot and the loss on other nodes are restored
// by the rebuild like every other.

// Redis keys of a node's counters and of its applied, not yet settled
// results (field: intent number).
func nodeRKey(node string) string    { return "le:node:" + node }
func appliedRKey(node string) string { return "le:applied:" + node }

// Pebble keys: the applied-op count and Σ deltas (merge-add; not under seq/,
// whose merge keeps the maximum) and the highest intent number ever used
// (seq/, maximum).
var (
	wmApplied = []byte("wm/applied")
	wmSum     = []byte("wm/sum")
	seqIntent = SeqKey("intent")
)

// nodeCounters mirrors wm/applied and wm/sum in memory; it is raised after
// the batch that raised them is durable, so it is never ahead of the disk.
type nodeCounters struct {
	mu     sync.Mutex
	n, sum int64
}

func (c *nodeCounters) load(st *Store) error {
	var n, sum int64
	v, err := st.Get(wmApplied)
	switch {
	case err == nil:
		n = DecodeInt64(v)
	case err != ErrNotFound:
		return err
	}
	v, err = st.Get(wmSum)
	switch {
	case err == nil:
		sum = DecodeInt64(v)
	case err != ErrNotFound:
		return err
	}
	c.mu.Lock()
	c.n, c.sum = n, sum
	c.mu.Unlock()
	return nil
}

func (c *nodeCounters) get() (n, sum int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n, c.sum
}

func (c *nodeCounters) add(delta int64) {
	c.mu.Lock()
	c.n++
	c.sum += delta
	c.mu.Unlock()
}

// delta is the op's Σ posting deltas.
func (in intent) delta() int64 {
	var d int64
	for _, p := range in.Postings {
		d += p.Delta
	}
	return d
}

// writeCounters adds one applied op to the node's durable counters (in the
// batch of its ledger share).
func writeCounters(b *Batch, in intent) error {
	if err := b.Merge(wmApplied, EncodeInt64(1), nil); err != nil {
		return err
	}
	return b.Merge(wmSum, EncodeInt64(in.delta()), nil)
}

// audit compares this node's counters in Redis with its ledger's (generation
// gen, ready). Called by the watcher; a mismatch resets the generation.
func (w *SharedWallet) audit(ctx context.Context, gen string) {
	// The ledger's first, then Redis's: an op finishing in between can only
	// raise Redis's count above the one read here (its script ran first).
	n, sum := w.counts.get()
	vals, err := w.rdb.Do(ctx, w.rdb.B().Hmget().Key(nodeRKey(w.node)).Field("n", "sum").Build()).ToArray()
	if err != nil || len(vals) != 2 {
		return
	}
	rn, _ := vals[0].AsInt64() // absent = 0
	rsum, _ := vals[1].AsInt64()
	switch {
	case rn < n:
		w.dataLost(gen, "audit: Redis has "+strconv.FormatInt(rn, 10)+" of this node's ops, its ledger "+strconv.FormatInt(n, 10))
	case rn == n && rsum != sum:
		w.dataLost(gen, "audit: Redis sums this node's ops to "+strconv.FormatInt(rsum, 10)+", its ledger to "+strconv.FormatInt(sum, 10))
	default:
		if why := w.auditPeers(ctx, gen); why != "" {
			w.dataLost(gen, why)
			return
		}
		w.auditMismatch.Store(false)
		if w.audits.Add(1)%repairEvery == 0 {
			w.repairDone(ctx)
		}
	}
}

// repairEvery: one audit in so many (200 ms apart) looks for done marks a
// rollback lost (repairDone).
const repairEvery = 25

// repairDone mends what a Redis rollback can leave when it keeps an op's
// script but loses its done mark (an AOF or a replica a few writes behind,
// at a quiet moment: the counts still agree, so no rebuild): the op's
// entry in le:applied:<node> and its idempotency key still pending — every
// retry of the op would answer "in progress" until the key expires, a day
// later. An entry whose intent this node no longer has was finalized here
// (the intent goes only after its share is durable and the done script
// ran): its done script runs again, checked against the op's idempotency
// row on this disk.
func (w *SharedWallet) repairDone(ctx context.Context) {
	entries, err := w.rdb.Do(ctx, w.rdb.B().Hgetall().Key(appliedRKey(w.node)).Build()).AsStrMap()
	if err != nil {
		return
	}
	for field, v := range entries {
		res, key, ok := strings.Cut(v, "#")
		no, err := strconv.ParseUint(field, 10, 64)
		if !ok || err != nil {
			continue // written before entries named their key
		}
		if has, err := w.store.Has(Key(prefixIntent, no)); has || err != nil {
			continue // in flight (or unreadable): its own path marks it done
		}
		user, req, ok := parseIdemRKey(key)
		r, perr := parseResult(res)
		if !ok || perr != nil {
			continue
		}
		if has, _ := w.store.Has(idemKeyBytes(unixHour(r.At), user, req)); !has {
			continue // not finalized here: left alone
		}
		if err := doneScript.Exec(ctx, w.rdb, []string{key, appliedRKey(w.node)}, []string{res, field}).Error(); err != nil {
			return
		}
		w.log.Warn("shared wallet: an op's done mark was lost (a Redis rollback?), marked again", "user", user, "req_id", req)
	}
}

// parseIdemRKey is idemRKey's inverse.
func parseIdemRKey(k string) (user int64, req string, ok bool) {
	rest, ok := strings.CutPrefix(k, "le:idem:{")
	if !ok {
		return 0, "", false
	}
	u, req, ok := strings.Cut(rest, "}:")
	if !ok {
		return 0, "", false
	}
	user, err := strconv.ParseInt(u, 10, 64)
	return user, req, err == nil
}

// auditPeers reads the other nodes' applied-op counts in Redis and compares
// each with the highest this node read in generation gen: one below it is a
// loss (the reason is returned; "" = none seen).
func (w *SharedWallet) auditPeers(ctx context.Context, gen string) string {
	peers := make([]string, 0, len(w.nodes))
	for _, p := range w.nodes {
		if p != w.node {
			peers = append(peers, p)
		}
	}
	if len(peers) == 0 {
		return ""
	}
	cmds := make(rueidis.Commands, len(peers))
	for i, p := range peers {
		cmds[i] = w.rdb.B().Hget().Key(nodeRKey(p)).Field("n").Build()
	}
	res := w.rdb.DoMulti(ctx, cmds...)
	w.peersMu.Lock()
	defer w.peersMu.Unlock()
	if w.peersGen != gen {
		w.peersGen, w.peersSeen = gen, make(map[string]int64, len(peers))
	}
	for i, p := range peers {
		n, err := res[i].AsInt64()
		if rueidis.IsRedisNil(err) {
			n, err = 0, nil
		}
		if err != nil {
			continue // not known this time
		}
		if seen := w.peersSeen[p]; n < seen {
			return "audit: Redis has " + strconv.FormatInt(n, 10) + " of node " + p + "'s ops, this node read " + strconv.FormatInt(seen, 10) + " there before"
		}
		w.peersSeen[p] = n
	}
	return ""
}

// AuditMismatch reports whether this node's last audit found Redis behind
// its ledger (until the rebuild that follows is done).
func (w *SharedWallet) AuditMismatch() bool { return w.auditMismatch.Load() }

// DataLosses counts the Redis data losses this node has detected.
func (w *SharedWallet) DataLosses() int64 { return w.dataLosses.Load() }

// resetScript starts a new generation in place of ARGV[1] (if that is still
// the current one; otherwise another node did already): it deletes the
// wallet's keys and those its contributors rebuild (le:* keys with one of
// the prefixes ARGV[4…], in one SCAN pass), so that the rebuild's sums start
// from zero, and writes le:meta anew in state rebuilding — leaving every
// other le:* key as it is (rooms, their offsets and history, presence, PK
// contests, offline pushes, red-packet pools, rates: each handles a rolled
// back Redis itself; deleting them turned a rollback into a total loss).
// ARGV: expected gen, new gen, number of nodes, the prefixes. It runs as one
// script, so no Apply sees a half-deleted wallet; it takes time proportional
// to the le:* keys (a recovery, rare).
var resetScript = rueidis.NewLuaScript(luaScript("reset"))

// walletPrefixes are the prefixes of the wallet's own keys in Redis (all
// rebuilt from the ledgers; le:meta and le:seq:trade are reset by name).
var walletPrefixes = []string{"le:bal:", "le:tally:", "le:idem:", "le:trades:", "le:node:", "le:applied:", "le:contrib:"}

// dataLost handles a detected loss in generation gen: log, count, reset the
// generation (once, whichever node gets there first) and rebuild. Apply is
// unavailable meanwhile.
func (w *SharedWallet) dataLost(gen, why string) {
	w.auditMismatch.Store(true)
	w.condemned.Store(&gen)
	if !w.resetting.CompareAndSwap(false, true) {
		return
	}
	if cur := w.gen.Load(); cur != nil && *cur == gen {
		w.gen.CompareAndSwap(cur, nil) // no Apply against the rolled-back data
	}
	w.dataLosses.Add(1) // counted once no Apply can start against it
	w.log.Error("shared wallet: Redis lost data, rebuilding from the ledgers", "generation", gen, "why", why)
	w.background(2*time.Minute, func(ctx context.Context) {
		defer w.resetting.Store(false)
		rctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if err := w.resetGen(rctx, gen); err != nil {
			w.log.Error("shared wallet: reset after data loss", "err", err)
			return // the watcher tries again (ensureGeneration: gen is condemned)
		}
		w.onGenerationLost(ctx)
	})
}

// resetGen resets generation gen (found rolled back) to a new one in state
// rebuilding, unless another node did already.
func (w *SharedWallet) resetGen(ctx context.Context, gen string) error {
	if w.failResets.Load() > 0 && w.failResets.Add(-1) >= 0 {
		return errors.New("persist: reset failed (test)")
	}
	args := append([]string{gen, w.newGen(), strconv.Itoa(len(w.nodes))}, walletPrefixes...)
	return resetScript.Exec(ctx, w.rdb, []string{keyMeta, keySeqTrade}, append(args, w.extraKeys...)).Error()
}

// expireEvery is how often the watcher expires idem/ rows.
const expireEvery = time.Hour

// maybeExpireIdem runs ExpireIdem when expireEvery has passed (watcher).
func (w *SharedWallet) maybeExpireIdem() {
	// Not while a generation rebuilds (held through a contribution): the
	// rows this node contributes must not change between its attempts.
	if !w.rebuild.TryLock() {
		return
	}
	defer w.rebuild.Unlock()
	if !w.Ready() {
		return
	}
	now := w.now()
	if !w.lastExpire.IsZero() && now.Sub(w.lastExpire) < expireEvery {
		return
	}
	w.lastExpire = now
	if err := w.expireIdem(); err != nil {
		w.log.Error("shared wallet: idempotency expiry", "err", err)
	}
}

// ExpireIdem deletes this node's idem/ rows older than the idempotency TTL
// (whole hours before the cutoff's, one range deletion), as the Ledger does;
// Redis expires its keys itself. Rows an unresolved intent may still need
// (to tell that its share is on disk already) are kept: the cutoff never
// passes the hour of the oldest intent. Not while a generation rebuilds (the
// rows a contribution reads must not change between its attempts).
func (w *SharedWallet) ExpireIdem() error {
	if !w.rebuild.TryLock() {
		return nil
	}
	defer w.rebuild.Unlock()
	if !w.Ready() {
		return nil
	}
	return w.expireIdem()
}

// expireIdem is ExpireIdem with w.rebuild held and the generation ready:
// one intent scan and one range deletion (no count: the rebuild waits).
func (w *SharedWallet) expireIdem() error {
	hour := unixHour(w.now().Add(-w.ttl).UnixMilli())
	err := w.store.Scan(prefixIntent, func(_, v []byte) error {
		var in struct {
			At int64 `json:"at"`
		}
		if err := sonic.Unmarshal(v, &in); err != nil {
			return err
		}
		hour = min(hour, unixHour(in.At)) // an intent without At: keep every row
		return nil
	})
	if err != nil || hour <= 0 {
		return err
	}
	return w.store.Apply(func(b *Batch) error { return b.DeleteRange(PrefixIdem, Key(PrefixIdem, uint64(hour)), nil) })
}

// Collectors are the shared wallet's Prometheus metrics (the caller adds the
// node label): liveedge_wallet_audit_mismatch (1 while this node's audit
// finds Redis behind its ledger, until the rebuild is done),
// liveedge_wallet_data_losses_total and liveedge_wallet_unsettled_intents
// (intents whose outcome the watcher is still settling).
func (w *SharedWallet) Collectors() []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "liveedge", Name: "wallet_audit_mismatch",
			Help: "1 while Redis has fewer of this node's wallet ops than its ledger (a rebuild follows)."},
			func() float64 {
				if w.AuditMismatch() {
					return 1
				}
				return 0
			}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "liveedge", Name: "wallet_data_losses_total",
			Help: "Redis data losses (rolled-back wallet state) detected by this node."},
			func() float64 { return float64(w.DataLosses()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "liveedge", Name: "wallet_unsettled_intents",
			Help: "Wallet ops whose outcome the watcher is still settling."},
			func() float64 {
				w.unsettledMu.Lock()
				defer w.unsettledMu.Unlock()
				return float64(len(w.unsettled))
			}),
	}
}
