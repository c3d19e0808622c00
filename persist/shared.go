package persist

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bytedance/sonic"
	"github.com/redis/rueidis"
)

// SharedWallet keeps balances in Redis, shared by every node, and each node's
// share of the ledger in its own Pebble. Protocol of one Apply (docs/wallet.md):
//
//  1. intent/<seq> {op} is written to Pebble and fsynced;
//  2. one Lua script in Redis checks the generation, this node's applied-op
//     count (shared_audit.go), the idempotency key and every balance, then
//     moves them, allocates trade ids, records the result under the
//     idempotency key and under the intent number in le:applied:<node>,
//     counts the op in le:node:<node> and appends the trades to the user's
//     recent list — atomically, no lock, no retry;
//  3. the trades, this node's balance contributions (bal/<u>, merge-add), the
//     tallies, the business records and the idempotency record are written to
//     Pebble, in one fsynced batch;
//  4. Apply returns; the idempotency key, stored *pending* by the script, is
//     marked done and the intent deleted.
//
// A duplicate (same user and req_id, on any node) is answered from the key
// only once it is done: while it is pending the op is not yet durable
// anywhere, so the duplicate waits for it (up to dupWait, then
// ErrInProgress) — no ok is ever given before the ledger row is on disk.
// Before step 1 a new request claims its key (claimMark): a duplicate
// through another node meanwhile waits for the claim to become a result,
// and is never checked (op.Check) as new while the first may still land.
//
// A crash between 1 and 4 leaves an intent; at start (and whenever Redis
// failed mid-call) the intent is resolved by reading its entry in
// le:applied:<node> (no expiry, removed when the op is settled): present =
// the script ran, finish step 3 from the stored result (if not done already)
// and mark it done; absent = it did not (or was settled already), drop the
// intent. If Redis cannot tell (unreachable), the outcome is unknown: the
// intent stays, Apply answers ErrInProgress and the watcher settles it.
// Every op carries a req_id (an internal one when the caller gave none).
//
// Redis restarted empty (the generation key le:meta is gone): the wallet is
// rebuilt from the ledgers. A new generation starts in state "rebuilding";
// every node listed in Nodes adds its Pebble contributions (balances, tallies,
// idempotency records, trade-id high-water mark) exactly once per generation;
// the last one flips the state to "ready". Until then every Apply fails with
// ErrWalletUnavailable — never a debit against a partial balance. Redis
// rolled back (an older snapshot, a lagging replica: le:meta still there) is
// detected by the applied-op counts and rebuilt the same way
// (shared_audit.go).
type SharedWallet struct {
	// extraKeys: SharedConfig.ContributedPrefixes (deleted at a reset).
	extraKeys []string
	store     *Store
	rdb       rueidis.Client
	node      string
	nodes     []string
	log       *slog.Logger
	now       func() time.Time
	ttl       time.Duration

	gen      atomic.Pointer[string]
	intentNo atomic.Uint64
	claimNo  atomic.Uint64
	rebuild  sync.Mutex
	// applying is held shared by each Apply (from reading the generation
	// until its ledger share is written or handed to the watcher) and by
	// the watcher's settling of intents; a contribution takes it once,
	// exclusively, after the generation was cleared: the ledger it reads
	// then has every op whose script ran before, and none can follow.
	applying sync.RWMutex
	// contributed is the generation this node has contributed to (under rebuild).
	contributed string
	// lastReady is the generation the OnReady listeners last ran for
	// (under rebuild).
	lastReady string
	// extra adds more of this node's state to a rebuild (SharedConfig.Contribute).
	extra   func(since time.Time, add func(op ...string) error) error
	stop    chan struct{}
	stopped sync.WaitGroup
	// bgMu guards closing (and stop's making): background's Add never
	// races Close's Wait.
	bgMu    sync.Mutex
	closing bool

	// dupWait bounds how long a duplicate waits for a pending first request.
	dupWait time.Duration
	// callTimeout bounds the Redis calls of one Apply.
	callTimeout time.Duration
	// asyncSlots holds one token per ApplyAsync running.
	asyncSlots chan struct{}
	// unsettled are intents whose outcome Apply could not settle — the
	// script's reply was lost, or the ledger write or done mark failed after
	// it ran; the watcher settles them (as a restart would).
	unsettledMu sync.Mutex
	unsettled   map[uint64]unsettledOp
	// nUnsettled counts the intents left to the watcher (in unsettled, or
	// being retried); maxUnsettled bounds it.
	nUnsettled   atomic.Int64
	maxUnsettled int64
	// busy are the requests (user, req_id) this node is applying, or whose
	// outcome is unsettled (under unsettledMu): a duplicate meanwhile waits
	// for the first to be answered (up to dupWait) and then replays it, or
	// is answered ErrInProgress while its outcome is unsettled — never
	// refused by its Check as if the first could not land (a script whose
	// reply was lost may still run late).
	busy map[busyKey]*busyReq
	// settleFns are the OnSettled listeners, readyFns the OnReady ones
	// (under unsettledMu).
	settleFns []func(Settled)
	readyFns  []func()
	// atOpen are the owed/ rows found at this start (ops that ran and were
	// never answered ok, their listeners not told); TellSettledAtOpen
	// tells them once.
	atOpen []owedAtOpen

	// The applied-op watermark and the audit (shared_audit.go).
	counts        nodeCounters
	auditMismatch atomic.Bool  // the last audit found Redis behind this node's ledger
	audits        atomic.Int64 // audits run (every repairEvery-th one also runs repairDone)
	// peersSeen is the highest applied-op count of each other node this
	// node has read in Redis in generation peersGen (written by the watcher
	// only; peersMu for readers).
	peersMu    sync.Mutex
	peersGen   string
	peersSeen  map[string]int64
	dataLosses atomic.Int64 // Redis data losses detected by this node
	resetting  atomic.Bool  // a reset after a detected loss is running
	// condemned is the last generation this node found rolled back: it is
	// never made ready again here (ensureGeneration resets it instead), so
	// a reset that failed does not put the rolled-back balances back into
	// service until the next audit.
	condemned  atomic.Pointer[string]
	lastExpire time.Time // of idem/ rows (watcher goroutine only)
	// failResets, in tests, makes the next resets fail as a Redis timeout
	// would.
	failResets atomic.Int32

	// crashAt, in tests, stops Apply dead at a named point ("intent",
	// "script", "final") as if the process had been killed there, or
	// injects a fault where it returns true at "reply" (the script ran, its
	// reply is lost) and "mark" (marking the key done fails).
	crashAt func(point string) bool
}

var _ Wallet = (*SharedWallet)(nil)

// ErrWalletUnavailable means the shared wallet cannot move money right now
// (Redis unreachable or being rebuilt); nothing moved; retry later. The
// ledger answers it to a read that could not be shown durable in time.
var ErrWalletUnavailable = errors.New("persist: shared wallet unavailable")

// ErrInProgress means an earlier request with the same req_id is still being
// made durable (or its node went down in the middle and has not come back):
// its outcome is not known yet; retry with the same req_id. Either wallet
// also answers it to a duplicate whose earlier result it could not read.
var ErrInProgress = errors.New("persist: a request with this req_id is still in progress")

// ErrInDoubt is ErrInProgress (errors.Is matches both) for this call's own
// op: it may have moved money, and its outcome is settled later (a retry
// with the same req_id answers it). A plain ErrInProgress may be a
// duplicate's answer while another call applies the op.
var ErrInDoubt = fmt.Errorf("%w: this request's outcome is not known yet", ErrInProgress)

// defaultDupWait is how long a duplicate waits for the first request's node
// to make it durable (normally a few ms: one fsync).
const defaultDupWait = 3 * time.Second

// defaultCallTimeout bounds the Redis calls of one Apply.
const defaultCallTimeout = 5 * time.Second

// pendingMark prefixes an idempotency value whose op is not yet durable in
// its node's ledger.
const pendingMark = "~"

// claimMark prefixes an idempotency value that is a claim: a node is
// applying a new request with that req_id (it checked the request's rules
// and its script has not run yet). The script runs only while its own claim
// holds the key, so a duplicate through another node meanwhile waits for
// the first instead of being checked as new — its refusal ("not in the
// room") would tell the client nothing moved while the first's debit lands.
const claimMark = "^"

// minClaimTTL bounds how long a claim outlives a node that died holding it
// (duplicates are answered ErrInProgress meanwhile); it is at least 3 × the
// wallet's CallTimeout, which bounds the calls from the claim to the script.
// A claim that expired before its script ran makes the script refuse
// ("claim"): nothing moves.
const minClaimTTL = 15 * time.Second

// claimScript: KEYS[1] an idempotency key; ARGV the claim, its TTL in ms.
// Returns the key's value (a result, pending or done, or another claim), or
// nil: claimed now. (SET NX GET does this in one command, from Redis 7.0.)
var claimScript = rueidis.NewLuaScript(luaScript("claim"))

// DefaultMaxUnsettled is SharedConfig.MaxUnsettled's default: ops whose
// outcome a node waits to learn (an op holds its postings and records, ~1
// KB, and an intent row); past it new ops are refused as unavailable.
const DefaultMaxUnsettled = 4096

// SharedConfig configures a SharedWallet.
type SharedConfig struct {
	Node  string   // this node's id
	Nodes []string // every node whose ledger holds wallet trades (rebuild waits for all)
	Log   *slog.Logger
	// Now is the clock (zero: time.Now): trade times, idempotency windows.
	Now func() time.Time
	// CallTimeout bounds the Redis calls of one Apply (zero: 5 s); an
	// outcome still unknown then is settled by the watcher (ErrInProgress).
	CallTimeout time.Duration
	// MaxUnsettled bounds the ops whose outcome this node waits to learn
	// (zero: DefaultMaxUnsettled); see SharedWallet.Apply.
	MaxUnsettled int
	// Contribute, if set, adds more of this node's durable state to a
	// rebuilding generation, after its ledger, through add (ops as in
	// contribScript; "hset" for a hash field), in batches numbered apart from
	// the ledger's. It runs each time this node contributes, and must add the
	// same ops every time for the same disk (batches are applied once each,
	// by number): the state it reads must not change while the generation is
	// not ready — e.g. the cluster's coupons (edge/ticket), refused while it
	// rebuilds. Keys it adds under le:* must have one of ContributedPrefixes
	// (a reset after a detected loss deletes them, so it rebuilds them
	// too); keys outside le:* survive a reset, so ops on them must give the
	// same state when added again. since is when the generation
	// began (by the clock of the node that began it; zero if unknown): the
	// same on every attempt, so a cut-off derived from it keeps the ops the
	// same.
	Contribute func(since time.Time, add func(op ...string) error) error
	// ContributedPrefixes are the prefixes (each "le:…") of the keys
	// Contribute writes under le:*, deleted with the wallet's own at a reset.
	ContributedPrefixes []string
}

// SharedMetaKey is the shared wallet's generation hash in Redis (fields gen
// and state): other shared state rebuilt with the wallet (SharedConfig.
// Contribute) is usable only while its state is "ready".
const SharedMetaKey = "le:meta"

// Redis keys. Hash tags keep one user's keys in one slot.
const (
	keyMeta     = SharedMetaKey
	keySeqTrade = "le:seq:trade"
	keyContrib  = "le:contrib:" // + gen
	recentMax   = 1000          // trades kept per user in Redis for listing
)

func balKey(u int64) string { return "le:bal:{" + strconv.FormatInt(u, 10) + "}" }
func tallyRKey(n string, u int64) string {
	return "le:tally:" + n + ":{" + strconv.FormatInt(u, 10) + "}"
}
func idemRKey(u int64, req string) string {
	return "le:idem:{" + strconv.FormatInt(u, 10) + "}:" + req
}
func recentKey(u int64) string { return "le:trades:{" + strconv.FormatInt(u, 10) + "}" }

var prefixIntent = []byte("intent/")

// prefixOwed: owed/<intent no> → owedOp, the ops whose share a resolve wrote
// (their Apply had not answered ok): what the OnSettled listeners are owed,
// kept until they were told — across restarts (TellSettledAtOpen).
var prefixOwed = []byte("owed/")

// owedOp is an owed/ row.
type owedOp struct {
	User     int64     `json:"user"`
	ReqID    string    `json:"req_id"`
	Postings []Posting `json:"postings"`
	Result   Result    `json:"result"`
}

// NewSharedWallet opens the shared wallet: it resolves leftover intents and,
// if Redis has no generation, starts or joins a rebuild.
func NewSharedWallet(store *Store, rdb rueidis.Client, cfg SharedConfig) (*SharedWallet, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if len(cfg.Nodes) == 0 {
		cfg.Nodes = []string{cfg.Node}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = defaultCallTimeout
	}
	if cfg.MaxUnsettled <= 0 {
		cfg.MaxUnsettled = DefaultMaxUnsettled
	}
	w := &SharedWallet{maxUnsettled: int64(cfg.MaxUnsettled), store: store, rdb: rdb, node: cfg.Node, nodes: cfg.Nodes, log: cfg.Log,
		now: cfg.Now, ttl: DefaultIdemTTL, dupWait: defaultDupWait, callTimeout: cfg.CallTimeout, extra: cfg.Contribute, extraKeys: cfg.ContributedPrefixes,
		unsettled: map[uint64]unsettledOp{}, busy: map[busyKey]*busyReq{}, asyncSlots: make(chan struct{}, maxAsyncApplies)}
	// Intent numbers are never reused (le:applied:<node> is keyed by them):
	// the highest ever used is kept in seq/intent.
	var maxIntent uint64
	_ = store.Scan(prefixIntent, func(k, _ []byte) error { maxIntent = max(maxIntent, KeyID(k)); return nil })
	if v, err := store.Get(seqIntent); err == nil {
		maxIntent = max(maxIntent, uint64(DecodeInt64(v)))
	}
	w.intentNo.Store(maxIntent)
	if err := w.counts.load(store); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.ensureGeneration(ctx); err != nil {
		return nil, err
	}
	if err := w.ResolveIntents(ctx); err != nil {
		return nil, err
	}
	w.bgMu.Lock()
	w.stop = make(chan struct{})
	w.bgMu.Unlock()
	w.stopped.Add(1)
	go w.watch()
	return w, nil
}

// errCrashed is what Apply returns at a test crash point; errReplyLost and
// errMarkFailed are the faults of the test points "reply" and "mark".
var (
	errCrashed    = errors.New("persist: simulated crash")
	errReplyLost  = errors.New("persist: simulated lost reply")
	errMarkFailed = errors.New("persist: simulated failure marking the key done")
)

// rebuildUntilStopped is onGenerationLost on the watcher's goroutine, for
// at most a minute, cut short by Close.
func (w *SharedWallet) rebuildUntilStopped() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-w.stop:
			cancel()
		case <-done:
		}
	}()
	w.onGenerationLost(ctx)
}

// watch notices a lost generation (Redis restarted empty) even when this node
// is idle, so that it contributes to the rebuild the other nodes wait for.
func (w *SharedWallet) watch() {
	defer w.stopped.Done()
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-w.stop:
			return
		case <-t.C:
			w.retryUnsettled()
			w.maybeExpireIdem()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			vals, err := w.rdb.Do(ctx, w.rdb.B().Hmget().Key(keyMeta).Field("gen", "state").Build()).ToArray()
			if err != nil || len(vals) != 2 {
				cancel()
				continue
			}
			gen, _ := vals[0].ToString()
			state, _ := vals[1].ToString()
			cur := w.gen.Load()
			if state != "ready" || cur == nil || *cur != gen {
				cancel()
				w.rebuildUntilStopped()
				continue
			}
			w.audit(ctx, gen)
			cancel()
		}
	}
}

// Close stops the background watcher (the store and client belong to the caller).
func (w *SharedWallet) Close() {
	w.bgMu.Lock()
	stop, was := w.stop, w.closing
	w.closing = true
	w.bgMu.Unlock()
	if stop != nil && !was {
		close(stop)
		w.stopped.Wait()
	}
}

// background runs fn on a goroutine Close waits for, with a context of
// timeout that Close cancels — not once Close has begun (or before the
// watcher started: then untracked, as at the start).
func (w *SharedWallet) background(timeout time.Duration, fn func(ctx context.Context)) {
	w.bgMu.Lock()
	if w.closing {
		w.bgMu.Unlock()
		return
	}
	stop := w.stop
	if stop != nil {
		w.stopped.Add(1)
	}
	w.bgMu.Unlock()
	go func() {
		if stop != nil {
			defer w.stopped.Done()
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		if stop != nil {
			go func() {
				select {
				case <-stop:
					cancel()
				case <-ctx.Done():
				}
			}()
		}
		fn(ctx)
	}()
}

type intent struct {
	User  int64  `json:"user"`
	ReqID string `json:"req_id"`
	Gen   string `json:"gen"`
	// At is the op's time (unix ms), the trades' and the result's: its
	// idem/ row is at this hour (0 in intents written before it was kept).
	At       int64     `json:"at,omitempty"`
	Postings []Posting `json:"postings"`
	Tallies  []Tally   `json:"tallies"`
	Static   []Record  `json:"static,omitempty"`
	// Claim is the idempotency key's value while this op is new and not
	// run (claimMark…); the script requires it there. Empty: no claim (an
	// internal req_id, or an intent written before claims).
	Claim string `json:"claim,omitempty"`
	// ClaimMaybe: the claim's reply was lost — the key may hold it or
	// nothing, and the script runs either way (as before claims).
	ClaimMaybe bool `json:"claim_maybe,omitempty"`
}

// applyScript: see the SharedWallet doc. KEYS: meta, seq, idem, recent list
// of the op's user, then n balance keys, then m tally keys, then this node's
// counters (le:node:<node>) and applied results (le:applied:<node>). ARGV:
// gen, n, m, ttl ms, now ms, user, req_id, then n × (delta, reason, ref),
// then m deltas, then the node's durable applied count, the intent number,
// the op's Σ deltas and its claim ("" for none; else the key must hold it;
// "?" + claim: it may hold it, or nothing).
// Replies: {"ok", result} | {"dup", result} | {"poor"}
// | {"big"} (a balance would pass MaxBalance: ErrBalanceLimit)
// | {"gen", gen, state}
// | {"lost", count} (Redis has fewer of this node's ops than its ledger)
// | {"claim"} (the op's claim is gone: expired, or released by a resolve)
// | {"fenced"} (a resolve of this node's intent of this number or a later
// one concluded by now that its script had not run: see fenceScript).
// A key holding another request's claim (this op's own expired, and a retry
// claimed it since) is a "dup" too: the caller waits for that one.
// result = "id1,id2|bal1,bal2|at" (every number written with %d).
// Besides the idempotency key (25 h), the result is kept under the intent
// number in le:applied:<node> with no expiry until the node has settled it
// (doneScript), so an intent is resolved however long it waits.
var applyScript = rueidis.NewLuaScript(luaScript("apply", "RECENT_DROP_FROM", strconv.Itoa(recentMax+1), "PENDING_MARK", pendingMark,
	"MAX_BALANCE", strconv.FormatInt(MaxBalance, 10)))

// fenceScript raises this node's fence (le:node:<node>, KEYS[1], field
// fence) to intent number ARGV[1]: from then on no script of an intent
// numbered at or below it runs (applyScript answers "fenced", nothing
// moved). A resolve raises it before it reads whether the intent's script
// ran, so a script still on its way — its request delayed, not only its
// reply lost: a connection Redis had not read yet when the call timed out —
// cannot land after "not run" was concluded, whether or not the op holds a
// claim. Lower intents still in flight are refused with it ("unavailable,
// nothing moved": their clients retry); resolves happen only when Redis
// misbehaved or at a restart. The fence lives as long as the generation
// (a new one refuses every older script by its generation).
var fenceScript = rueidis.NewLuaScript(luaScript("fence"))

// doneScript settles an applied op in Redis once its node's share is
// durable: it forgets the op's entry in le:applied:<node> (KEYS[2], field
// ARGV[2]) and marks its idempotency key (KEYS[1]; ARGV[1] its result) done
// if it is still pending with that result; otherwise (done already, or gone
// with Redis or its TTL) it leaves the key.
var doneScript = rueidis.NewLuaScript(luaScript("done", "PENDING_MARK", pendingMark))

// splitPending tells a stored idempotency value's result and whether it is
// still pending; a claim is pending with no result yet.
func splitPending(v string) (res string, pending bool) {
	if strings.HasPrefix(v, claimMark) {
		return "", true
	}
	if r, ok := strings.CutPrefix(v, pendingMark); ok {
		return r, true
	}
	return v, false
}

func parseResult(s string) (Result, error) {
	parts := strings.Split(s, "|")
	if len(parts) != 3 {
		return Result{}, fmt.Errorf("persist: bad shared result %q", s)
	}
	var r Result
	// An op without postings (only tallies and records, e.g. a red-packet
	// settlement with nothing to refund) has empty lists: "||at".
	for _, x := range strings.Split(parts[0], ",") {
		if x == "" && parts[0] == "" {
			break
		}
		id, err := strconv.ParseInt(x, 10, 64)
		if err != nil {
			return r, err
		}
		r.TradeIDs = append(r.TradeIDs, id)
	}
	for _, x := range strings.Split(parts[1], ",") {
		if x == "" && parts[1] == "" {
			break
		}
		b, err := strconv.ParseInt(x, 10, 64)
		if err != nil {
			return r, err
		}
		r.Balances = append(r.Balances, b)
	}
	at, err := strconv.ParseInt(parts[2], 10, 64)
	r.At = at
	return r, err
}

// maxAsyncApplies bounds the goroutines running ApplyAsync calls node-wide:
// each waits on Redis and an fsync, so this many in flight is far more than
// the wallet needs for its throughput, and it keeps a burst from many
// connections from becoming an unbounded pile of goroutines.
const maxAsyncApplies = 1024

// ApplyAsync implements Wallet: Apply on its own goroutine, at most
// maxAsyncApplies at once node-wide; beyond that the caller (a connection's
// reader) waits for a slot — backpressure on that connection, nothing
// dropped.
func (w *SharedWallet) ApplyAsync(op Op, done func(Result, error)) {
	w.asyncSlots <- struct{}{}
	go func() {
		defer func() { <-w.asyncSlots }()
		done(w.Apply(op))
	}()
}

// Apply implements Wallet (see the type's doc for the protocol).
func (w *SharedWallet) Apply(op Op) (Result, error) {
	if len(op.Postings) == 0 && len(op.Tallies) == 0 {
		return Result{}, ErrBadOp
	}
	for _, p := range op.Postings {
		if p.User <= 0 {
			return Result{}, fmt.Errorf("%w: user %d", ErrBadOp, p.User)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), w.callTimeout)
	defer cancel()
	// A contribution clears the generation, then waits here for the
	// Applies under way (up to their Redis calls' timeout): an Apply that
	// came meanwhile would queue behind that barrier only to find no
	// generation. TryRLock fails only while the barrier waits: it answers
	// at once, as with the generation cleared.
	if !w.applying.TryRLock() {
		return Result{}, ErrWalletUnavailable
	}
	defer w.applying.RUnlock()
	gen := w.gen.Load()
	if gen == nil || *gen == "" || op.Gen != "" && op.Gen != *gen {
		return Result{}, ErrWalletUnavailable
	}
	if w.nUnsettled.Load() >= w.maxUnsettled {
		// Redis has been unreachable for long under load: every op left
		// its intent and its records here for the watcher. Refused before
		// anything is written (nothing moved), so memory and the intents
		// on disk stay bounded until the watcher settles what is waiting.
		return Result{}, ErrWalletUnavailable
	}
	in := intent{User: op.User, ReqID: op.ReqID, Gen: *gen, At: w.now().UnixMilli(),
		Postings: op.Postings, Tallies: op.Tallies, Static: op.Static}
	if in.ReqID == "" {
		in.ReqID = "auto:" + w.node + ":" + strconv.FormatUint(w.intentNo.Load()+1, 10) + ":" + strconv.FormatInt(w.now().UnixNano(), 36)
	}
	// One request (user, req_id) at a time on this node, the first until
	// its outcome is settled.
	release := false // in.Claim is to be released on return
	if op.ReqID != "" {
		bk := busyKey{op.User, op.ReqID}
		mine := w.claim(ctx, bk)
		if mine == nil {
			return Result{}, ErrInProgress
		}
		defer w.release(bk, mine)
		// Claim the req_id in Redis (claimScript, one round trip): a request
		// that ran before, or runs now on another node, is answered from its
		// key — once done, without an intent — and never checked as new.
		claim := claimMark + w.node + ":" + strconv.FormatUint(w.claimNo.Add(1), 36) + ":" + strconv.FormatUint(rand.Uint64(), 36)
		v, err := claimScript.Exec(ctx, w.rdb, []string{idemRKey(op.User, in.ReqID)},
			[]string{claim, strconv.FormatInt(w.claimTTL().Milliseconds(), 10)}).ToString()
		if w.crashAt != nil && w.crashAt("claimreply") {
			err = errReplyLost // the claim script ran; its reply is lost
		}
		if err == nil {
			return w.replay(ctx, in, v)
		}
		// Redis nil: claimed. Any other error: Redis could not say whether
		// this is a duplicate of a request that ran (on another node, or
		// before a restart), nor whether the claim was taken (its reply may
		// be lost): the op runs with the claim optional (its script answers
		// "dup" if the key holds anything else by then), unless its Check
		// refuses it. Until the script has run, a failure leaves the key to
		// the next attempt: the claim is released (a late script refuses).
		in.Claim, in.ClaimMaybe = claim, !rueidis.IsRedisNil(err)
		release = true
		defer func() {
			if release {
				w.releaseClaim(in)
			}
		}()
	}
	if op.Check != nil {
		if err := op.Check(); err != nil {
			if in.ClaimMaybe {
				// Its refusal ("not in the room", say) would tell the client
				// that nothing moved when it may have.
				return Result{}, ErrInProgress
			}
			return Result{}, err
		}
	}
	no := w.intentNo.Add(1)
	ikey := Key(prefixIntent, no)
	iv, err := sonic.Marshal(in)
	if err != nil {
		return Result{}, err
	}
	if err := w.store.Apply(func(b *Batch) error {
		if err := b.Set(ikey, iv, nil); err != nil {
			return err
		}
		return b.Merge(seqIntent, EncodeInt64(int64(no)), nil)
	}); err != nil {
		return Result{}, err
	}
	if w.crashAt != nil && w.crashAt("intent") {
		release = false // killed: nothing released
		return Result{}, errCrashed
	}
	status, payload, err := w.runScript(ctx, no, in)
	if w.crashAt != nil && w.crashAt("script") {
		release = false
		return Result{}, errCrashed
	}
	if w.crashAt != nil && err == nil && w.crashAt("reply") {
		err = errReplyLost
	}
	if status == "ok" || status == "dup" || err != nil {
		release = false // the key holds a result, or resolve releases it
	}
	switch {
	case err != nil:
		// Unknown outcome (the script may have run and only its reply been
		// lost): resolve from Redis now; if Redis cannot tell within this
		// call, the watcher settles the intent later with a fresh context,
		// and the caller is told to retry with the same req_id — never
		// "unavailable, nothing moved", which may be false.
		r, out, rerr := w.resolve(ctx, no, in, op.Records)
		switch {
		case rerr == nil && out == outcomeDone:
			// Answered ok: the caller sends what it owes — so the owed row
			// goes durably first (a crash that kept it would tell the op at
			// the next start too: its effects twice). A rare path (a reply
			// lost and found at once): one fsync.
			if err := w.store.Delete(Key(prefixOwed, no)); err != nil {
				w.log.Warn("shared wallet: owed row not deleted (told again at the next start)", "intent", no, "err", err)
			}
			return r, nil
		case rerr == nil && out == outcomeNotRun:
			return Result{}, ErrWalletUnavailable
		case rerr == nil && out == outcomeElsewhere:
			// Its retry replays the first request's result.
			return Result{}, fmt.Errorf("%w: a request with this req_id ran before", ErrInProgress)
		}
		w.log.Error("shared wallet: outcome unknown, the watcher will settle it", "intent", no, "err", err, "resolve_err", rerr)
		w.leaveToWatcher(unsettledOp{no: no, in: in, records: op.Records, doubt: true})
		return Result{}, ErrInDoubt
	case status == "gen":
		_ = w.store.Apply(func(b *Batch) error { return b.Delete(ikey, nil) })
		w.background(time.Minute, w.onGenerationLost)
		return Result{}, ErrWalletUnavailable
	case status == "lost":
		// Redis has fewer of this node's ops than its ledger: it lost data
		// (an older snapshot, a lagging replica). Rebuild; nothing moved.
		_ = w.store.Apply(func(b *Batch) error { return b.Delete(ikey, nil) })
		w.dataLost(in.Gen, "apply: Redis applied count "+payload+" behind the ledger")
		return Result{}, ErrWalletUnavailable
	case status == "poor":
		_ = w.store.Apply(func(b *Batch) error { return b.Delete(ikey, nil) })
		return Result{}, ErrInsufficient
	case status == "big":
		_ = w.store.Apply(func(b *Batch) error { return b.Delete(ikey, nil) })
		return Result{}, ErrBalanceLimit
	case status == "claim" || status == "fenced":
		// The claim expired before the script ran (this Apply stalled for
		// claimTTL), or a resolve of a later intent fenced this one off:
		// nothing moved; the next attempt claims again.
		_ = w.store.Apply(func(b *Batch) error { return b.Delete(ikey, nil) })
		return Result{}, ErrWalletUnavailable
	case status == "dup":
		_ = w.store.Apply(func(b *Batch) error { return b.Delete(ikey, nil) })
		return w.replay(ctx, in, payload)
	}
	r, err := parseResult(payload)
	if err != nil {
		// The money moved in Redis: a reply this node cannot read is an
		// unknown outcome (the watcher's resolve reads it again from
		// le:applied), never "failed".
		w.log.Error("shared wallet: unreadable result after the script ran, the watcher will settle it", "intent", no, "result", payload, "err", err)
		w.leaveToWatcher(unsettledOp{no: no, in: in, records: op.Records, doubt: true})
		return Result{}, ErrInDoubt
	}
	if err := w.finalize(no, in, r, op.Records, false); err != nil {
		// The money moved in Redis but this node's share is not on disk:
		// the outcome is settled later (by the watcher or a restart), so the
		// caller is told to retry with the same req_id, never "failed".
		w.log.Error("shared wallet: ledger write failed after the script ran, will retry", "intent", no, "err", err)
		w.leaveToWatcher(unsettledOp{no: no, in: in, records: op.Records, doubt: true})
		return Result{}, ErrInDoubt
	}
	if w.crashAt != nil && w.crashAt("final") {
		return Result{}, errCrashed
	}
	if err := w.markDone(ctx, no, in, payload); err != nil {
		// Durable already: the caller gets its ok; the watcher retries.
		w.log.Warn("shared wallet: marking a request done failed, will retry", "intent", no, "err", err)
		w.leaveToWatcher(unsettledOp{no: no, in: in})
	}
	return r, nil
}

// replay answers a duplicate from the stored value v of its idempotency key,
// once that is done: a pending one is waited for (the first request's node
// is between its script and its fsync), and so is a claim (its node is
// checking or applying it), up to dupWait.
func (w *SharedWallet) replay(ctx context.Context, in intent, v string) (Result, error) {
	res, pending := splitPending(v)
	if pending {
		key := idemRKey(in.User, in.ReqID)
		deadline := time.Now().Add(w.dupWait)
		for wait := time.Millisecond; pending; wait = min(2*wait, 50*time.Millisecond) {
			if time.Now().After(deadline) {
				return Result{}, ErrInProgress
			}
			select {
			case <-ctx.Done():
				return Result{}, ErrInProgress
			case <-time.After(wait):
			}
			v, err := w.rdb.Do(ctx, w.rdb.B().Get().Key(key).Build()).ToString()
			if err != nil {
				// Gone with Redis (a rebuild follows), a claim released (the
				// first was refused: the next attempt runs as new), or Redis
				// unreachable: the first request's outcome is not known here
				// (and may be a debit, so not "unavailable, nothing moved").
				return Result{}, ErrInProgress
			}
			res, pending = splitPending(v)
		}
	}
	r, err := parseResult(res)
	if err != nil {
		// The first request ran (its key holds a result): "failed" would be
		// false. Its outcome is not known here; a retry reads it again.
		w.log.Error("shared wallet: a duplicate's stored result is unreadable", "user", in.User, "req_id", in.ReqID, "result", res, "err", err)
		return Result{}, ErrInProgress
	}
	r.Replayed = true
	return r, nil
}

// claimArg is in's claim as the script takes it.
func (in *intent) claimArg() string {
	if in.ClaimMaybe && in.Claim != "" {
		return "?" + in.Claim
	}
	return in.Claim
}

// claimTTL is how long this wallet's claims live (minClaimTTL, or longer
// with a long CallTimeout).
func (w *SharedWallet) claimTTL() time.Duration { return max(minClaimTTL, 3*w.callTimeout) }

// releaseClaimScript deletes an idempotency key (KEYS[1]) that still holds
// the claim ARGV[1].
var releaseClaimScript = rueidis.NewLuaScript(luaScript("release_claim"))

// releaseClaim gives up in's claim (its script did not run, and will not: it
// requires the claim). Best effort: a claim not released expires.
func (w *SharedWallet) releaseClaim(in intent) {
	ctx, cancel := context.WithTimeout(context.Background(), w.callTimeout)
	defer cancel()
	if err := releaseClaimScript.Exec(ctx, w.rdb, []string{idemRKey(in.User, in.ReqID)}, []string{in.Claim}).Error(); err != nil {
		w.log.Warn("shared wallet: releasing a claim failed; it expires", "user", in.User, "req_id", in.ReqID, "err", err)
	}
}

// markDone is step 4: the idempotency key is marked done (duplicates may now
// be answered) and the intent deleted — without an fsync: if the delete is
// lost, the restart resolves the intent again and finds it done.
func (w *SharedWallet) markDone(ctx context.Context, no uint64, in intent, res string) error {
	if err := doneScript.Exec(ctx, w.rdb, []string{idemRKey(in.User, in.ReqID), appliedRKey(w.node)},
		[]string{res, strconv.FormatUint(no, 10)}).Error(); err != nil {
		return err
	}
	return w.store.DeleteNoSync(Key(prefixIntent, no))
}

// unsettledOp is intent no left to the watcher, with the business records
// of its op (nil when they are written already).
type unsettledOp struct {
	no      uint64
	in      intent
	records func([]int64) []Record
	// doubt: its Apply answered ErrInDoubt (not ok): the OnSettled
	// listeners are told its outcome.
	doubt bool
}

// leaveToWatcher leaves Apply's intent u, whose outcome it could not
// settle, to the watcher, counted against maxUnsettled.
func (w *SharedWallet) leaveToWatcher(u unsettledOp) {
	w.nUnsettled.Add(1)
	w.unsettle(u)
}

// unsettle (re)queues u for the watcher (retryUnsettled puts back those it
// could not settle yet: already counted).
func (w *SharedWallet) unsettle(u unsettledOp) {
	w.unsettledMu.Lock()
	w.unsettled[u.no] = u
	if b := w.busy[busyKey{u.in.User, u.in.ReqID}]; b != nil {
		b.unsettled = true // kept busy until settled
	}
	w.unsettledMu.Unlock()
}

// Settled is the outcome of an op its Apply answered ErrInDoubt, once the
// watcher knows it: it ran (Result is its result, as a replay gives it) or
// it did not (nothing moved; a retry with its req_id runs as new).
type Settled struct {
	User     int64
	ReqID    string
	Postings []Posting // the op's
	Ran      bool
	Result   Result
	// AtOpen: told at a start (TellSettledAtOpen) — the op was on its way
	// when a process before this one stopped (answered in doubt, or not
	// answered at all), a resolve found it ran, and its listeners were
	// never told, so nothing was sent for it. Always Ran. Its business
	// rebuilds what it owes from Postings (nothing of it is in memory).
	AtOpen bool
}

// SettleNotifier is a Wallet that tells, once it knows, the outcome of the
// ops it answered ErrInDoubt: a business sends then what it owes for one
// that ran (a gift's effects, a credit's push) without waiting for a retry
// that may never come.
type SettleNotifier interface {
	// OnSettled adds fn, called on a goroutine of the wallet's watcher, once
	// per such op settled while this process runs, and once per op that
	// ran but was settled only when the wallet opened (Settled.AtOpen; told
	// when the node calls TellSettledAtOpen, once every business listens).
	OnSettled(fn func(Settled))
}

var _ SettleNotifier = (*SharedWallet)(nil)

// OnSettled implements SettleNotifier.
func (w *SharedWallet) OnSettled(fn func(Settled)) {
	w.unsettledMu.Lock()
	w.settleFns = append(w.settleFns, fn)
	w.unsettledMu.Unlock()
}

// TellSettledAtOpen tells the OnSettled listeners, on a goroutine, the ops
// owed to them when the wallet opened (Settled.AtOpen), once, and then
// forgets them (until then they stay owed across restarts): a node calls
// it when its businesses listen and can send (rooms, PK contests restored),
// before it serves requests (a retry racing the listeners replays the op
// and sends nothing itself).
func (w *SharedWallet) TellSettledAtOpen() {
	w.unsettledMu.Lock()
	told, fns := w.atOpen, w.settleFns
	w.atOpen = nil
	w.unsettledMu.Unlock()
	if len(told) == 0 {
		return
	}
	w.log.Info("shared wallet: telling the ops settled at start", "count", len(told))
	w.stopped.Add(1)
	go func() {
		defer w.stopped.Done()
		for _, o := range told {
			tell(fns, o.st)
			w.forgetOwed(o.no)
		}
	}()
}

// tell runs every OnSettled listener fns for st.
func tell(fns []func(Settled), st Settled) {
	for _, fn := range fns {
		fn(st)
	}
}

// busyKey is a request of Apply: (user, req_id).
type busyKey struct {
	user  int64
	reqID string
}

// busyReq is a busy request: done is closed once its Apply returned;
// unsettled: its outcome was left to the watcher.
type busyReq struct {
	done      chan struct{}
	unsettled bool
	returned  bool // done is closed
}

func (b *busyReq) finish() {
	if !b.returned {
		b.returned = true
		close(b.done)
	}
}

// claim marks a request busy. A duplicate waits for the first's Apply to
// return (then claims it in turn, and is answered from Redis as one); false:
// nil: the first's outcome is unsettled, or it did not return within
// dupWait (or ctx ended).
func (w *SharedWallet) claim(ctx context.Context, k busyKey) *busyReq {
	var timeout <-chan time.Time
	for {
		w.unsettledMu.Lock()
		b := w.busy[k]
		if b == nil {
			b = &busyReq{done: make(chan struct{})}
			w.busy[k] = b
			w.unsettledMu.Unlock()
			return b
		}
		unsettled := b.unsettled
		w.unsettledMu.Unlock()
		if unsettled {
			return nil
		}
		if timeout == nil {
			t := time.NewTimer(w.dupWait)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-b.done:
		case <-timeout:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

// release ends Apply's claim of k, unless its intent was left unsettled:
// then the watcher releases it once settled (settled).
func (w *SharedWallet) release(k busyKey, b *busyReq) {
	w.unsettledMu.Lock()
	defer w.unsettledMu.Unlock()
	b.finish()
	if w.busy[k] == b && !b.unsettled {
		delete(w.busy, k)
	}
}

// settled releases the claim of an intent the watcher settled.
func (w *SharedWallet) settled(in intent) {
	w.unsettledMu.Lock()
	k := busyKey{in.User, in.ReqID}
	if b := w.busy[k]; b != nil && b.unsettled {
		b.finish() // settled before its Apply returned: its duplicates replay it
		delete(w.busy, k)
	}
	w.unsettledMu.Unlock()
}

// retryUnsettled settles what Apply could not (from the watcher).
func (w *SharedWallet) retryUnsettled() {
	w.unsettledMu.Lock()
	todo := w.unsettled
	w.unsettled = map[uint64]unsettledOp{}
	w.unsettledMu.Unlock()
	if len(todo) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var told []Settled
	var done []unsettledOp
	w.applying.RLock() // a contribution does not read the ledger meanwhile
	for no, u := range todo {
		switch r, out, err := w.resolve(ctx, no, u.in, u.records); {
		case err != nil || out == outcomeUnknown:
			w.unsettle(u)
		default:
			w.log.Info("shared wallet: intent settled", "intent", no, "ran", out == outcomeDone)
			w.nUnsettled.Add(-1)
			done = append(done, u)
			if u.doubt {
				told = append(told, u.in.settled(out == outcomeDone, r, false))
			}
		}
	}
	w.applying.RUnlock()
	w.unsettledMu.Lock()
	fns := w.settleFns
	w.unsettledMu.Unlock()
	finish := func() {
		for _, u := range done {
			w.forgetOwed(u.no) // told (or nobody listens)
			w.settled(u.in)
		}
	}
	if len(told) == 0 || len(fns) == 0 {
		finish()
		return
	}
	// The listeners (pushes: Redis calls in a cluster) run off the
	// watcher's goroutine; the requests stay busy until they ran, so a
	// retry on this node starts only after its earlier attempt was told.
	w.stopped.Add(1)
	go func() {
		defer w.stopped.Done()
		for _, st := range told {
			tell(fns, st)
		}
		finish()
	}()
}

func (w *SharedWallet) runScript(ctx context.Context, no uint64, in intent) (status, payload string, err error) {
	keys := []string{keyMeta, keySeqTrade, idemRKey(in.User, in.ReqID), recentKey(in.User)}
	args := []string{in.Gen, strconv.Itoa(len(in.Postings)), strconv.Itoa(len(in.Tallies)),
		strconv.FormatInt(w.ttl.Milliseconds(), 10), strconv.FormatInt(in.At, 10),
		strconv.FormatInt(in.User, 10), in.ReqID}
	for _, p := range in.Postings {
		keys = append(keys, balKey(p.User))
		args = append(args, strconv.FormatInt(p.Delta, 10), p.Reason, p.Ref)
	}
	for _, t := range in.Tallies {
		keys = append(keys, tallyRKey(t.Name, t.User))
		args = append(args, strconv.FormatInt(t.Delta, 10))
	}
	applied, _ := w.counts.get()
	keys = append(keys, nodeRKey(w.node), appliedRKey(w.node))
	args = append(args, strconv.FormatInt(applied, 10), strconv.FormatUint(no, 10), strconv.FormatInt(in.delta(), 10), in.claimArg())
	arr, err := applyScript.Exec(ctx, w.rdb, keys, args).ToArray()
	if err != nil {
		return "", "", err
	}
	if len(arr) == 0 {
		return "", "", errors.New("persist: empty script reply")
	}
	status, _ = arr[0].ToString()
	if len(arr) > 1 {
		if payload, err = arr[1].ToString(); err != nil {
			var n int64
			n, err = arr[1].AsInt64()
			payload = strconv.FormatInt(n, 10)
		}
	}
	return status, payload, nil
}

// finalize is step 3: the node's durable share of the op (the intent stays
// until the key is marked done). owed: written by a resolve, not by the
// op's Apply on its way to answering ok — its owed/ row goes with it.
func (w *SharedWallet) finalize(no uint64, in intent, r Result, records func([]int64) []Record, owed bool) error {
	op := Op{User: in.User, ReqID: in.ReqID, Postings: in.Postings, Tallies: in.Tallies, Static: in.Static, Records: records}
	var ov []byte
	if owed {
		var err error
		if ov, err = sonic.Marshal(owedOp{User: in.User, ReqID: in.ReqID, Postings: in.Postings, Result: r}); err != nil {
			return err
		}
	}
	if err := w.store.Apply(func(b *Batch) error {
		if err := writeOp(b, op, r); err != nil {
			return err
		}
		if owed {
			if err := b.Set(Key(prefixOwed, no), ov, nil); err != nil {
				return err
			}
		}
		return writeCounters(b, in)
	}); err != nil {
		return err
	}
	w.counts.add(in.delta())
	return nil
}

// Outcomes of resolving an intent.
type outcome int

const (
	outcomeUnknown outcome = iota // Redis could not tell; the intent stays
	outcomeDone                   // the script ran; the node's share is durable and the key done
	outcomeNotRun                 // the script did not run (or its effect is gone with Redis); intent dropped
	// outcomeElsewhere: as outcomeNotRun, but the req_id's key holds
	// another request's result (the script answered "dup", its reply
	// lost): the req_id did move money — "retry", never "nothing moved".
	outcomeElsewhere
)

// resolve settles intent no from Redis.
func (w *SharedWallet) resolve(ctx context.Context, no uint64, in intent, records func([]int64) []Record) (Result, outcome, error) {
	drop := func() (Result, outcome, error) {
		// Nothing in Redis says the script ran — but an op whose share is
		// in this node's ledger did run: its done mark removed its
		// le:applied entry (the mark's reply was lost), or Redis lost the
		// generation after the share was contributed to the rebuild.
		r, out := Result{}, outcomeNotRun
		switch rec, ok, err := w.shareOnDisk(in); {
		case err != nil:
			return Result{}, outcomeUnknown, err
		case ok:
			r, out = rec, outcomeDone
		}
		if err := w.store.Apply(func(b *Batch) error { return b.Delete(Key(prefixIntent, no), nil) }); err != nil {
			return Result{}, outcomeUnknown, err
		}
		return r, out, nil
	}
	meta, err := w.rdb.Do(ctx, w.rdb.B().Hget().Key(keyMeta).Field("gen").Build()).ToString()
	if err != nil && !rueidis.IsRedisNil(err) {
		return Result{}, outcomeUnknown, err
	}
	if meta != in.Gen {
		// Redis lost the generation the script ran against: whatever it did
		// is gone from Redis, and the caller was never told ok. Drop it.
		return drop()
	}
	// Fence the intent off first: a script still on its way then refuses,
	// so "not run" below stays true.
	if err := fenceScript.Exec(ctx, w.rdb, []string{nodeRKey(w.node)}, []string{strconv.FormatUint(no, 10)}).Error(); err != nil {
		return Result{}, outcomeUnknown, err
	}
	if in.Claim != "" {
		// Release the op's claim, so that a retry runs as new at once
		// rather than waiting for the claim to expire. A script that ran
		// has replaced the claim already.
		if err := releaseClaimScript.Exec(ctx, w.rdb, []string{idemRKey(in.User, in.ReqID)}, []string{in.Claim}).Error(); err != nil {
			return Result{}, outcomeUnknown, err
		}
	}
	// The op's entry in le:applied:<node> (no expiry) says whether its
	// script ran, however long ago (the idempotency key expires after 25 h,
	// and may be another node's request with the same req_id). No entry:
	// the script did not run, or answered "dup", or the op was settled
	// already (its share is on disk and the key done) — nothing to do but
	// drop the intent. Intents written before the entries existed (no At)
	// are resolved from the idempotency key, as they were then.
	res, err := w.rdb.Do(ctx, w.rdb.B().Hget().Key(appliedRKey(w.node)).Field(strconv.FormatUint(no, 10)).Build()).ToString()
	res, _, _ = strings.Cut(res, "#") // "#<its idempotency key>" (entries written before have none)
	if rueidis.IsRedisNil(err) && in.At != 0 {
		v, gerr := w.rdb.Do(ctx, w.rdb.B().Get().Key(idemRKey(in.User, in.ReqID)).Build()).ToString()
		if gerr != nil && !rueidis.IsRedisNil(gerr) {
			return Result{}, outcomeUnknown, gerr
		}
		r, out, err := drop()
		if err == nil && out == outcomeNotRun && gerr == nil && !strings.HasPrefix(v, claimMark) {
			out = outcomeElsewhere
		}
		return r, out, err
	}
	if rueidis.IsRedisNil(err) {
		var v string
		v, err = w.rdb.Do(ctx, w.rdb.B().Get().Key(idemRKey(in.User, in.ReqID)).Build()).ToString()
		if rueidis.IsRedisNil(err) || strings.HasPrefix(v, claimMark) {
			return drop() // no result: not run (a claim is a newer request's)
		}
		res, _ = splitPending(v)
	}
	if err != nil {
		return Result{}, outcomeUnknown, err
	}
	r, err := parseResult(res)
	if err != nil {
		return r, outcomeUnknown, err
	}
	// Finalized by us already? (idem record present locally)
	switch _, err := w.store.Get(idemKeyBytes(unixHour(r.At), in.User, in.ReqID)); {
	case errors.Is(err, ErrNotFound):
		if err := w.finalize(no, in, r, records, true); err != nil {
			return r, outcomeUnknown, err
		}
	case err != nil:
		return r, outcomeUnknown, err
	}
	if w.crashAt != nil && w.crashAt("mark") {
		return r, outcomeUnknown, errMarkFailed
	}
	if err := w.markDone(ctx, no, in, res); err != nil {
		return r, outcomeUnknown, err
	}
	return r, outcomeDone, nil
}

// shareOnDisk reports whether intent in's own op has its share in this
// node's ledger (written by its Apply or an earlier resolve), and its result: its idempotency record at the op's hour,
// made at the op's time — a duplicate's intent (its script answered "dup",
// or never ran) finds the first request's record, made at another time.
// Intents written before At was kept are never found.
func (w *SharedWallet) shareOnDisk(in intent) (Result, bool, error) {
	if in.At == 0 {
		return Result{}, false, nil
	}
	v, err := w.store.Get(idemKeyBytes(unixHour(in.At), in.User, in.ReqID))
	if errors.Is(err, ErrNotFound) {
		return Result{}, false, nil
	}
	if err != nil {
		return Result{}, false, err
	}
	rec, err := decodeResult(v)
	if err != nil || rec.At != in.At {
		return Result{}, false, err
	}
	return rec, true, nil
}

// settled is the Settled told for intent in (r: its result if it ran).
func (in intent) settled(ran bool, r Result, atOpen bool) Settled {
	r.Replayed = true
	return Settled{User: in.User, ReqID: in.ReqID, Postings: in.Postings, Ran: ran, Result: r, AtOpen: atOpen}
}

// ResolveIntents settles every intent left by a crash, and keeps for
// TellSettledAtOpen the owed/ rows: ops a resolve found ran (now or before
// this start) whose Apply never answered ok and whose listeners were never
// told.
func (w *SharedWallet) ResolveIntents(ctx context.Context) error {
	w.applying.RLock() // a contribution does not read the ledger meanwhile
	defer w.applying.RUnlock()
	type pend struct {
		no uint64
		in intent
	}
	var ps []pend
	err := w.store.Scan(prefixIntent, func(k, v []byte) error {
		var in intent
		if err := sonic.Unmarshal(v, &in); err != nil {
			return err
		}
		ps = append(ps, pend{KeyID(k), in})
		return nil
	})
	if err != nil {
		return err
	}
	for _, p := range ps {
		if _, out, err := w.resolve(ctx, p.no, p.in, nil); err != nil || out == outcomeUnknown {
			return fmt.Errorf("persist: intent %d unresolved: %v", p.no, err)
		}
	}
	if len(ps) > 0 {
		w.log.Info("shared wallet: intents resolved", "count", len(ps))
	}
	// What the listeners are owed: the ops a resolve settled as run — now
	// or in a process before this one, whose listeners were never told.
	return w.store.Scan(prefixOwed, func(k, v []byte) error {
		var o owedOp
		if err := sonic.Unmarshal(v, &o); err != nil {
			return fmt.Errorf("persist: owed op %x: %w", k, err)
		}
		in := intent{User: o.User, ReqID: o.ReqID, Postings: o.Postings}
		w.atOpen = append(w.atOpen, owedAtOpen{no: KeyID(k), st: in.settled(true, o.Result, true)})
		return nil
	})
}

// owedAtOpen is an owed/ row found at the start.
type owedAtOpen struct {
	no uint64
	st Settled
}

// forgetOwed deletes intent no's owed/ row, if any: its listeners were
// told, or its Apply answered ok. Without an fsync: a row that comes back
// is told again (at most once per lost delete).
func (w *SharedWallet) forgetOwed(no uint64) {
	if err := w.store.DeleteNoSync(Key(prefixOwed, no)); err != nil {
		w.log.Warn("shared wallet: owed row not deleted (told again at the next start)", "intent", no, "err", err)
	}
}

// Balance implements Wallet: read through rueidis client-side caching (Redis
// invalidates the cached value when it changes). Like every read of the
// wallet's state (readReady), ErrWalletUnavailable while it is not ready.
func (w *SharedWallet) Balance(user int64) (int64, error) {
	return w.readReady(balKey(user), true)
}

// Tally returns a tally (client-side cached).
func (w *SharedWallet) Tally(name string, user int64) (int64, error) {
	return w.readReady(tallyRKey(name, user), true)
}

// readReady reads the integer at key (0 when absent), through the
// client-side cache when cached, and the generation's state after it: a
// value read while the wallet is not ready is no answer — being rebuilt
// from the nodes' ledgers, Redis holds the shares of the nodes that
// contributed so far (a user's debits without the credit made on a node
// still down: a negative balance); emptied, every value reads 0 until a
// node notices — so ErrWalletUnavailable (retry). The state is read after
// the value: a loss between the two reads shows in the state.
func (w *SharedWallet) readReady(key string, cached bool) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var r []rueidis.RedisResult
	if cached {
		r = w.rdb.DoMultiCache(ctx,
			rueidis.CT(w.rdb.B().Get().Key(key).Cache(), time.Minute),
			rueidis.CT(w.rdb.B().Hget().Key(keyMeta).Field("state").Cache(), time.Minute))
	} else {
		r = w.rdb.DoMulti(ctx, w.rdb.B().Get().Key(key).Build(), w.rdb.B().Hget().Key(keyMeta).Field("state").Build())
	}
	if err := readyState(r[1]); err != nil {
		return 0, err
	}
	v, err := r[0].AsInt64()
	if rueidis.IsRedisNil(err) {
		return 0, nil
	}
	return v, err
}

// readyState is nil when the generation's state read in r is ready.
func readyState(r rueidis.RedisResult) error {
	state, err := r.ToString()
	if err != nil && !rueidis.IsRedisNil(err) {
		return err
	}
	if state != "ready" {
		return ErrWalletUnavailable
	}
	return nil
}

var _ TallyDropper = (*SharedWallet)(nil)

// dropWait is how long DropTally waits for the wallet to be ready and not
// rebuilding.
const dropWait = 2 * time.Second

// DropTally deletes tally name of user in Redis and this node's share of it
// on its disk (what a rebuild of Redis would add back). Every node that
// added to it drops its own share.
func (w *SharedWallet) DropTally(name string, user int64) error {
	// Not while a generation rebuilds (its contribution scans this disk in
	// numbered batches: a row deleted between two attempts would shift the
	// rows after it out of a batch already applied). The watcher holds the
	// lock briefly every 200 ms too: tried again for up to dropWait, then
	// the tally is kept (harmless).
	for deadline := time.Now().Add(dropWait); ; time.Sleep(50 * time.Millisecond) {
		if w.rebuild.TryLock() {
			if w.Ready() {
				break
			}
			w.rebuild.Unlock()
		}
		if time.Now().After(deadline) {
			return errors.New("persist: tally not dropped: the shared wallet is being rebuilt or not ready")
		}
	}
	defer w.rebuild.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := w.rdb.Do(ctx, w.rdb.B().Del().Key(tallyRKey(name, user)).Build()).Error(); err != nil {
		return err
	}
	return w.store.Delete(TallyKey(name, user))
}

// TallyFresh is Tally read from Redis itself, not the client-side cache
// (whose invalidation may lag a write by another node): for a reading that
// decides, such as a PK contest's final scores.
func (w *SharedWallet) TallyFresh(name string, user int64) (int64, error) {
	return w.readReady(tallyRKey(name, user), false)
}

// Trades implements Wallet from the user's recent trades in Redis (the last
// 1,000, from every node), newest first, ids below before.
func (w *SharedWallet) Trades(user int64, before int64, limit int) ([]Trade, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	maxScore := "+inf"
	if before > 0 {
		maxScore = "(" + strconv.FormatInt(before, 10)
	}
	r := w.rdb.DoMulti(ctx, w.rdb.B().Zrange().Key(recentKey(user)).Min(maxScore).Max("-inf").
		Byscore().Rev().Limit(0, int64(limit)).Build(),
		w.rdb.B().Hget().Key(keyMeta).Field("state").Build())
	if err := readyState(r[1]); err != nil {
		return nil, err // being rebuilt: the list would be partial (readReady)
	}
	vals, err := r[0].AsStrSlice()
	if err != nil {
		return nil, err
	}
	out := make([]Trade, 0, len(vals))
	for _, v := range vals {
		var t Trade
		if err := sonic.UnmarshalString(v, &t); err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, nil
}

func formatResult(r Result) string {
	var b strings.Builder
	for i, id := range r.TradeIDs {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(id, 10))
	}
	b.WriteByte('|')
	for i, x := range r.Balances {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(x, 10))
	}
	b.WriteByte('|')
	b.WriteString(strconv.FormatInt(r.At, 10))
	return b.String()
}

// AuditShared checks conservation of a shared wallet over every node's
// ledger: per user, Σ trades in all stores equals balance(user) (the shared
// balance) and is never negative; Σ credits − Σ debits = Σ balances.
func AuditShared(balance func(user int64) (int64, error), stores ...*Store) (credits, debits, balances int64, err error) {
	sums := map[int64]int64{}
	for _, st := range stores {
		err = st.Scan(PrefixTrade, func(_, v []byte) error {
			tr, err := decodeTrade(v)
			if err != nil {
				return err
			}
			if tr.Delta > 0 {
				credits += tr.Delta
			} else {
				debits -= tr.Delta
			}
			sums[tr.User] += tr.Delta
			return nil
		})
		if err != nil {
			return
		}
	}
	for u, s := range sums {
		b, berr := balance(u)
		if berr != nil {
			return credits, debits, balances, berr
		}
		if b != s || b < 0 {
			return credits, debits, balances, fmt.Errorf("persist: audit: user %d shared balance %d, ledgers say %d", u, b, s)
		}
		balances += b
	}
	if credits-debits != balances {
		err = fmt.Errorf("persist: audit: credits %d - debits %d != balances %d", credits, debits, balances)
	}
	return
}

// RedisBalance reads a user's shared balance straight from Redis (no cache),
// for audits.
func RedisBalance(rdb rueidis.Client, user int64) (int64, error) {
	b, err := rdb.Do(context.Background(), rdb.B().Get().Key(balKey(user)).Build()).AsInt64()
	if rueidis.IsRedisNil(err) {
		return 0, nil
	}
	return b, err
}
