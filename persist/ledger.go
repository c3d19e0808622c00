package persist

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bytedance/sonic"
)

// Trade reasons.
const (
	ReasonRecharge  = "recharge"
	ReasonGift      = "gift"
	ReasonRedPacket = "redpacket"
	ReasonRefund    = "refund"
	ReasonDev       = "dev"
)

// DefaultIdemTTL is how long a (user, req_id) keeps its first result.
const DefaultIdemTTL = 25 * time.Hour

// Errors of Ledger.Apply.
var (
	ErrInsufficient = errors.New("persist: insufficient balance")
	ErrBadOp        = errors.New("persist: bad ledger op")
)

// Trade is one append-only ledger row: a coin movement of one user.
type Trade struct {
	ID      int64  `json:"trade_id"`
	User    int64  `json:"user_id"`
	Delta   int64  `json:"delta"`
	Reason  string `json:"reason"`
	Ref     string `json:"ref,omitempty"`
	ReqID   string `json:"req_id,omitempty"`
	Balance int64  `json:"balance"` // after this trade
	At      int64  `json:"at"`      // unix ms
}

// Posting is one coin movement of an Op.
type Posting struct {
	User   int64
	Delta  int64 // < 0 debits; a debit never takes the balance below 0
	Reason string
	Ref    string
}

// Tally adds Delta to a non-coin counter tally/<Name>/<User> (e.g. "recv",
// the value of gifts a user received).
type Tally struct {
	Name  string
	User  int64
	Delta int64
}

// Record is an extra durable row written atomically with the op.
type Record struct {
	Key   []byte `json:"k"`
	Value []byte `json:"v"`
}

// Op is one atomic ledger operation: every posting, tally and record commits
// together or not at all, durably, exactly once per (User, ReqID).
type Op struct {
	User     int64  // idempotency scope
	ReqID    string // "" = not idempotent
	Postings []Posting
	Tallies  []Tally
	Records  func(tradeIDs []int64) []Record // built once trade ids are known
	// Static are records known up front (e.g. an order's new state). In
	// shared mode they travel in the intent, so crash recovery writes them too.
	Static []Record
	// Check, if set, runs once for a request that is not a duplicate, before
	// anything is reserved (e.g. a rate limit); its error is returned as is
	// and is not remembered as the request's result.
	Check func() error
}

// Result is what Apply did (or, with Replayed, what the first Apply of this
// (user, req_id) did).
type Result struct {
	TradeIDs []int64 `json:"trade_ids"`
	Balances []int64 `json:"balances"` // per posting, after it
	At       int64   `json:"at"`
	Replayed bool    `json:"-"`
}

// Wallet is the seam between the business and the money store: the Pebble
// Ledger in single-node mode; a Redis-shared implementation in cluster mode.
type Wallet interface {
	Apply(op Op) (Result, error)
	Balance(user int64) (int64, error)
	Trades(user int64, before int64, limit int) ([]Trade, error)
	Tally(name string, user int64) (int64, error)
}

var _ Wallet = (*Ledger)(nil)

const ledgerShards = 64

// Ledger is the single-node wallet: balances, trades and idempotency records
// in Pebble, with an in-memory mirror of the balances it has touched.
//
// Invariants:
//   - bal/<u> in Pebble == Σ Delta of trade/<u>/* (a batch writes both).
//   - the in-memory balance of u == durable balance + Σ deltas of ops that
//     reserved and are committing; a debit is reserved only if the
//     in-memory balance stays ≥ 0, so the durable balance never goes below 0.
//   - at most one Apply per (user, req_id) moves money: concurrent duplicates
//     wait for the first and get its result; later ones read it back.
//   - Apply returns only after its batch is fsynced (group-committed).
//
// Locks: one mutex per user shard, taken in ascending shard order, never held
// across I/O.
type Ledger struct {
	store   *Store
	now     func() time.Time
	idemTTL time.Duration
	seq     atomic.Int64

	shards [ledgerShards]ledgerShard
}

type ledgerShard struct {
	mu      sync.Mutex
	bal     map[int64]int64
	pending map[idemKey]*call // in flight, or recently finished (failures only)
}

type idemKey struct {
	user int64
	req  string
}

type call struct {
	done chan struct{}
	res  Result
	err  error
	at   time.Time
}

// maxRememberedFailures bounds the in-memory failure results per shard.
const maxRememberedFailures = 4096

// NewLedger opens the ledger on store.
func NewLedger(store *Store, now func() time.Time) (*Ledger, error) {
	if now == nil {
		now = time.Now
	}
	l := &Ledger{store: store, now: now, idemTTL: DefaultIdemTTL}
	for i := range l.shards {
		l.shards[i].bal = map[int64]int64{}
		l.shards[i].pending = map[idemKey]*call{}
	}
	v, err := store.Get(SeqKey("trade"))
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	l.seq.Store(DecodeInt64(v))
	return l, nil
}

func (l *Ledger) shard(user int64) *ledgerShard { return &l.shards[uint64(user)%ledgerShards] }

func idemKeyBytes(user int64, req string) []byte {
	k := make([]byte, 0, len(PrefixIdem)+8+len(req))
	k = append(k, PrefixIdem...)
	k = binary.BigEndian.AppendUint64(k, uint64(user))
	return append(k, req...)
}

// Balance returns user's coin balance.
func (l *Ledger) Balance(user int64) (int64, error) {
	sh := l.shard(user)
	sh.mu.Lock()
	b, ok := sh.bal[user]
	sh.mu.Unlock()
	if ok {
		return b, nil
	}
	return l.loadBalance(user)
}

func (l *Ledger) loadBalance(user int64) (int64, error) {
	v, err := l.store.Get(Key(PrefixBal, uint64(user)))
	if errors.Is(err, ErrNotFound) {
		return 0, nil
	}
	return DecodeInt64(v), err
}

// Apply performs op exactly once per (op.User, op.ReqID) and returns after it
// is durable. A debit that would take a balance below 0 fails with
// ErrInsufficient and moves nothing.
func (l *Ledger) Apply(op Op) (Result, error) {
	if len(op.Postings) == 0 && len(op.Tallies) == 0 {
		return Result{}, ErrBadOp
	}
	if len(op.ReqID) > 160 {
		return Result{}, fmt.Errorf("%w: req_id longer than 160 bytes", ErrBadOp)
	}
	var c *call
	if op.ReqID != "" {
		var first bool
		c, first = l.claim(op.User, op.ReqID)
		if !first {
			<-c.done
			r := c.res
			r.Replayed = true
			return r, c.err
		}
		// Nobody else can run this request now; was it done before (durably)?
		if v, err := l.store.Get(idemKeyBytes(op.User, op.ReqID)); err == nil {
			var r Result
			if err := sonic.Unmarshal(v, &r); err != nil {
				return l.finish(op, c, Result{}, err)
			}
			r.Replayed = true
			return l.finish(op, c, r, nil)
		} else if !errors.Is(err, ErrNotFound) {
			return l.finish(op, c, Result{}, err)
		}
	}
	var res Result
	var err error
	if op.Check != nil {
		err = op.Check()
	}
	if err == nil {
		res, err = l.reserveAndCommit(op)
	}
	if c == nil {
		return res, err
	}
	return l.finish(op, c, res, err)
}

// claim registers (user, req) as in flight; first reports whether the caller
// owns it (else it waits on the returned call).
func (l *Ledger) claim(user int64, req string) (*call, bool) {
	sh := l.shard(user)
	k := idemKey{user, req}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if c, ok := sh.pending[k]; ok {
		if c.err != nil && l.now().Sub(c.at) > l.idemTTL {
			delete(sh.pending, k)
		} else {
			return c, false
		}
	}
	c := &call{done: make(chan struct{})}
	sh.pending[k] = c
	return c, true
}

// finish publishes the result to waiting duplicates. Successes are durable
// (idem record), so they leave memory; failures moved nothing and are kept in
// a bounded memory window so duplicates get the same answer.
func (l *Ledger) finish(op Op, c *call, res Result, err error) (Result, error) {
	sh := l.shard(op.User)
	sh.mu.Lock()
	c.res, c.err, c.at = res, err, l.now()
	close(c.done)
	if err == nil || !errors.Is(err, ErrInsufficient) {
		delete(sh.pending, idemKey{op.User, op.ReqID})
	} else if len(sh.pending) > maxRememberedFailures {
		for k, old := range sh.pending {
			if isDone(old) {
				delete(sh.pending, k)
			}
			if len(sh.pending) <= maxRememberedFailures/2 {
				break
			}
		}
	}
	sh.mu.Unlock()
	return res, err
}

func isDone(c *call) bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// reserveAndCommit checks and reserves every posting in memory (atomically
// across the users involved), then commits the batch durably; on a commit
// error the reservation is undone.
func (l *Ledger) reserveAndCommit(op Op) (Result, error) {
	users := make([]int64, 0, len(op.Postings))
	for _, p := range op.Postings {
		if p.User <= 0 {
			return Result{}, fmt.Errorf("%w: user %d", ErrBadOp, p.User)
		}
		users = append(users, p.User)
	}
	// Load balances not yet in memory (I/O outside the locks).
	for _, u := range users {
		sh := l.shard(u)
		sh.mu.Lock()
		_, ok := sh.bal[u]
		sh.mu.Unlock()
		if ok {
			continue
		}
		b, err := l.loadBalance(u)
		if err != nil {
			return Result{}, err
		}
		sh.mu.Lock()
		if _, ok := sh.bal[u]; !ok {
			sh.bal[u] = b
		}
		sh.mu.Unlock()
	}
	locked := l.lockUsers(users)
	res := Result{TradeIDs: make([]int64, len(op.Postings)), Balances: make([]int64, len(op.Postings)), At: l.now().UnixMilli()}
	// Check every posting against the running balance first, then apply.
	after := map[int64]int64{}
	for i, p := range op.Postings {
		b, ok := after[p.User]
		if !ok {
			b = l.shard(p.User).bal[p.User]
		}
		b += p.Delta
		if b < 0 {
			l.unlock(locked)
			return Result{}, ErrInsufficient
		}
		after[p.User] = b
		res.Balances[i] = b
	}
	for i, p := range op.Postings {
		l.shard(p.User).bal[p.User] += p.Delta
		res.TradeIDs[i] = l.seq.Add(1)
	}
	l.unlock(locked)

	err := l.store.Apply(func(b *Batch) error { return writeOp(b, op, res) })
	if err != nil {
		locked = l.lockUsers(users)
		for _, p := range op.Postings {
			l.shard(p.User).bal[p.User] -= p.Delta
		}
		l.unlock(locked)
		return Result{}, err
	}
	return res, nil
}

// writeOp adds the durable share of an applied op to b: trade rows, balance
// and tally merges, the trade-id high-water mark, the business records and
// the idempotency record (with its expiry index). Both wallets use it.
func writeOp(b *Batch, op Op, res Result) error {
	for i, p := range op.Postings {
		t := Trade{ID: res.TradeIDs[i], User: p.User, Delta: p.Delta, Reason: p.Reason, Ref: p.Ref,
			Balance: res.Balances[i], At: res.At}
		if p.User == op.User {
			t.ReqID = op.ReqID
		}
		v, err := sonic.Marshal(t)
		if err != nil {
			return err
		}
		if err := b.Set(Key2(PrefixTrade, uint64(p.User), uint64(t.ID)), v, nil); err != nil {
			return err
		}
		if err := b.Merge(Key(PrefixBal, uint64(p.User)), EncodeInt64(p.Delta), nil); err != nil {
			return err
		}
	}
	for _, t := range op.Tallies {
		if err := b.Merge(TallyKey(t.Name, t.User), EncodeInt64(t.Delta), nil); err != nil {
			return err
		}
	}
	if n := len(res.TradeIDs); n > 0 {
		if err := b.Merge(SeqKey("trade"), EncodeInt64(res.TradeIDs[n-1]), nil); err != nil {
			return err
		}
	}
	for _, r := range op.Static {
		if err := b.Set(r.Key, r.Value, nil); err != nil {
			return err
		}
	}
	if op.Records != nil {
		for _, r := range op.Records(res.TradeIDs) {
			if err := b.Set(r.Key, r.Value, nil); err != nil {
				return err
			}
		}
	}
	if op.ReqID == "" {
		return nil
	}
	v, err := sonic.Marshal(res)
	if err != nil {
		return err
	}
	if err := b.Set(idemKeyBytes(op.User, op.ReqID), v, nil); err != nil {
		return err
	}
	x := Key2(PrefixIdemX, uint64(res.At), uint64(op.User))
	return b.Set(append(x, op.ReqID...), nil, nil)
}

func (l *Ledger) lockUsers(users []int64) []int {
	idx := make([]int, 0, len(users))
	for _, u := range users {
		idx = append(idx, int(uint64(u)%ledgerShards))
	}
	sort.Ints(idx)
	out := idx[:0]
	for i, s := range idx {
		if i == 0 || s != idx[i-1] {
			out = append(out, s)
		}
	}
	for _, s := range out {
		l.shards[s].mu.Lock()
	}
	return out
}

func (l *Ledger) unlock(idx []int) {
	for i := len(idx) - 1; i >= 0; i-- {
		l.shards[idx[i]].mu.Unlock()
	}
}

// TallyKey is the key of tally name for user.
func TallyKey(name string, user int64) []byte {
	k := make([]byte, 0, len(PrefixTally)+len(name)+9)
	k = append(k, PrefixTally...)
	k = append(k, name...)
	k = append(k, '/')
	return binary.BigEndian.AppendUint64(k, uint64(user))
}

// Tally returns the value of tally name for user.
func (l *Ledger) Tally(name string, user int64) (int64, error) {
	v, err := l.store.Get(TallyKey(name, user))
	if errors.Is(err, ErrNotFound) {
		return 0, nil
	}
	return DecodeInt64(v), err
}

// Trades returns user's trades newest first, with ids below before (0 = from
// the newest), at most limit.
func (l *Ledger) Trades(user int64, before int64, limit int) ([]Trade, error) {
	lower := Key2(PrefixTrade, uint64(user), 0)
	upper := Key2(PrefixTrade, uint64(user), uint64(before))
	if before <= 0 {
		upper = Key(PrefixTrade, uint64(user)+1)
	}
	var out []Trade
	err := l.store.ScanReverse(lower, upper, func(_, v []byte) (bool, error) {
		var t Trade
		if err := sonic.Unmarshal(v, &t); err != nil {
			return false, err
		}
		out = append(out, t)
		return len(out) < limit, nil
	})
	return out, err
}

// ExpireIdem deletes idempotency records written before cutoff and returns
// how many it deleted.
func (l *Ledger) ExpireIdem(cutoff time.Time) (int, error) {
	upper := Key(PrefixIdemX, uint64(cutoff.UnixMilli()))
	var keys [][]byte
	err := l.store.ScanRange(PrefixIdemX, upper, func(k, _ []byte) (bool, error) {
		keys = append(keys, append([]byte(nil), k...))
		return len(keys) < 10000, nil
	})
	if err != nil || len(keys) == 0 {
		return 0, err
	}
	return len(keys), l.store.Apply(func(b *Batch) error {
		for _, k := range keys {
			rest := k[len(PrefixIdemX)+8:] // user(8) + req
			user := int64(binary.BigEndian.Uint64(rest[:8]))
			if err := b.Delete(idemKeyBytes(user, string(rest[8:])), nil); err != nil {
				return err
			}
			if err := b.Delete(k, nil); err != nil {
				return err
			}
		}
		return nil
	})
}

// Audit checks conservation over the whole ledger: for every user, the
// durable balance equals the sum of its trades and is never negative. It
// returns Σ credits, Σ debits (as a positive number) and Σ balances.
func (l *Ledger) Audit() (credits, debits, balances int64, err error) {
	sums := map[int64]int64{}
	err = l.store.Scan(PrefixTrade, func(_, v []byte) error {
		var t Trade
		if err := sonic.Unmarshal(v, &t); err != nil {
			return err
		}
		if t.Delta > 0 {
			credits += t.Delta
		} else {
			debits -= t.Delta
		}
		sums[t.User] += t.Delta
		return nil
	})
	if err != nil {
		return
	}
	seen := map[int64]bool{}
	err = l.store.Scan(PrefixBal, func(k, v []byte) error {
		u := int64(KeyID(k))
		b := DecodeInt64(v)
		seen[u] = true
		if b < 0 {
			return fmt.Errorf("persist: audit: user %d balance %d < 0", u, b)
		}
		if b != sums[u] {
			return fmt.Errorf("persist: audit: user %d balance %d != Σ trades %d", u, b, sums[u])
		}
		balances += b
		return nil
	})
	if err != nil {
		return
	}
	for u, s := range sums {
		if !seen[u] && s != 0 {
			return credits, debits, balances, fmt.Errorf("persist: audit: user %d has trades Σ %d but no balance", u, s)
		}
	}
	if credits-debits != balances {
		err = fmt.Errorf("persist: audit: credits %d - debits %d != balances %d", credits, debits, balances)
	}
	return
}
