package persist

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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
	// ErrBalanceLimit (an ErrBadOp) refuses an op that would take a balance
	// above MaxBalance, or whose delta is beyond ±MaxBalance; nothing moved.
	// Answered 10001 (bad request: out of range).
	ErrBalanceLimit = fmt.Errorf("%w: a balance would exceed %d", ErrBadOp, MaxBalance)
)

// MaxBalance is the largest balance either wallet keeps: 2^53 - 1, the
// largest integer the shared wallet's Lua scripts (doubles) hold exactly —
// the same bound in single-node mode, whose balances a shared wallet's
// rebuild takes over, and far from int64's wrap-around.
const MaxBalance = 1<<53 - 1

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
	// Gen, if set, pins the op to a shared wallet generation (SharedWallet:
	// a state Redis holds since a rebuild, such as a red packet's
	// one-per-user place, taken in that generation): in any other it is
	// refused as ErrWalletUnavailable, nothing moved — it would land in a
	// generation rebuilt without that state. Set it only on an op's first
	// attempt (a retry of an op that may have run must replay its result).
	// The single-node Ledger has no generations and ignores it.
	Gen string
}

// Result is what Apply did (or, with Replayed, what the first Apply of this
// (user, req_id) did).
type Result struct {
	TradeIDs []int64 `json:"trade_ids"`
	Balances []int64 `json:"balances"` // per posting, after it
	At       int64   `json:"at"`
	Replayed bool    `json:"-"`

	loc idemLoc // where its idempotency record is (Ledger internal)
}

// idemLoc is where a request's durable idempotency record is: the unix hour
// it was written in (the high 24 bits) and the id of the group row holding it
// (idxg/<hour>/<group>, the low 40 bits), or group 0 for a row of its own
// (idem/<hour>/<user>/<req>). A group row's key carries the id as stored here
// (the counter modulo 2^40, never 0): unique within its hour, which is all a
// key needs since the hour is part of it.
type idemLoc uint64

const locGroupMask = 1<<40 - 1

func mkLoc(hour int32, group int64) idemLoc {
	return idemLoc(uint64(hour)<<40 | uint64(group)&locGroupMask)
}
func (l idemLoc) hour() int32  { return int32(l >> 40) }
func (l idemLoc) group() int64 { return int64(l & locGroupMask) }

// Wallet is the seam between the business and the money store: the Pebble
// Ledger in single-node mode; a Redis-shared implementation in cluster mode.
type Wallet interface {
	Apply(op Op) (Result, error)
	// ApplyAsync is Apply calling done (quick, non-blocking) with the outcome
	// instead of returning it.
	ApplyAsync(op Op, done func(Result, error))
	Balance(user int64) (int64, error)
	Trades(user int64, before int64, limit int) ([]Trade, error)
	Tally(name string, user int64) (int64, error)
}

var _ Wallet = (*Ledger)(nil)

const ledgerShards = 64

// Ledger is the single-node wallet: balances, trades and idempotency records
// in Pebble, with the balances it has touched and the identities of the
// requests it has completed mirrored in memory.
//
// Invariants:
//   - bal/<u> in Pebble == Σ Delta of trade/<u>/* (a batch writes both).
//   - the in-memory balance of u == durable balance + Σ deltas of ops that
//     reserved and are committing; a debit is reserved only if the
//     in-memory balance stays ≥ 0, so the durable balance never goes below 0.
//   - a user's in-memory balance is dropped only while no op of theirs is
//     committing (busy), i.e. when it equals the durable one, and only to
//     keep about LedgerConfig.Balances of them: the next op reads it from
//     Pebble again. A balance read from Pebble is kept only if no balance of
//     its shard was dropped meanwhile (it may predate an op that committed
//     and was dropped since).
//   - at most one Apply per (user, req_id) moves money: concurrent duplicates
//     wait for the first and get its result; later ones read it back. The
//     records of one group commit share one row (idxg/<hour>/<group>),
//     written in the same batch as the ops, and every record in a group row
//     younger than the TTL has its hash in memory with its location (loaded
//     at open, added at commit), so a new request costs no read while the
//     memory budget holds: only a hash hit is looked up. A request that finds
//     no room in memory writes its record to a spill row of its own
//     (idsp/<period>/<user>/<req>), and a miss in memory reads the spill
//     periods noted in disk: correctness never depends on the memory.
//   - Apply returns (ApplyAsync calls back) only after its batch is fsynced.
//     Ops are group-committed by the ledger's committers: every op queued
//     while a commit is in flight goes into the next batch, with one balance
//     and tally merge per account and batch.
//   - durable order follows reservation order: an op is queued under the
//     locks it reserved with, groups enter the WAL in queue order and a group
//     is acknowledged only once every earlier group is durable, so no crash
//     keeps a debit without the credit it was reserved against.
//
// Locks: one mutex per user shard, taken in ascending shard order, never held
// across I/O; the commit queue's mutex is taken last (an op is queued under
// its users' shard locks), never with a shard lock taken after it.
type Ledger struct {
	store   *Store
	now     func() time.Time
	idemTTL time.Duration
	seq     atomic.Int64 // trade ids
	groups  atomic.Int64 // idempotency group rows
	seed    maphash.Seed

	disk   atomic.Pointer[idemDisk]
	diskMu sync.Mutex // serialises changes of disk

	shards [ledgerShards]ledgerShard
	commit *committer
}

type ledgerShard struct {
	mu      sync.Mutex
	bal     map[int64]int64
	busy    map[int64]int32   // postings reserved and committing, per user (absent: none)
	credit  map[int64]int64   // the credits among them, summed (absent: none): not durable yet
	maxBal  int               // bal's bound: beyond it, balances not busy are dropped
	dropped uint64            // how many times balances were dropped (see Ledger)
	pending map[idemKey]*call // in flight, or recently finished (failures only)
	done    idemTable         // hash(user, req_id) → where its durable idempotency record is
}

type idemKey struct {
	user int64
	req  string
}

// call is one request in flight (or a remembered failure); duplicates that
// arrive meanwhile wait in waiters.
type call struct {
	hash     uint64
	reserved bool // holds a reservation in its shard's idemTable
	fin      bool
	res      Result
	err      error
	at       time.Time
	waiters  []func(Result, error)
}

// maxRememberedFailures bounds the in-memory failure results per shard.
const maxRememberedFailures = 4096

// LedgerConfig configures a Ledger. Zero values mean the defaults.
type LedgerConfig struct {
	Now func() time.Time // nil = time.Now
	// IdemMemoryBytes bounds the memory of the index of recent requests'
	// hashes (0 = DefaultIdemMemoryBytes): 16 B slots, at most 3/4 full, so
	// about IdemMemoryBytes/21 requests. Requests beyond it are checked on
	// disk (exactly once still holds, duplicate checks are slower).
	IdemMemoryBytes int64
	// Balances bounds how many users' balances are kept in memory (0 =
	// DefaultLedgerBalances): beyond it, those with no op committing are
	// dropped, and read from Pebble again by their next op.
	Balances int
}

// DefaultLedgerBalances is LedgerConfig.Balances' default: about 40 MiB of
// map entries. Beyond it, an op of a user whose balance was dropped costs
// one Pebble read more.
const DefaultLedgerBalances = 1 << 20

// NewLedger is OpenLedger with the default configuration and clock now.
func NewLedger(store *Store, now func() time.Time) (*Ledger, error) {
	return OpenLedger(store, LedgerConfig{Now: now})
}

// OpenLedger opens the ledger on store: it loads the trade-id high-water
// mark and the hashes of the idempotency records younger than the TTL (as
// many as the memory budget holds; the rest are found on disk), and starts
// the committers (stop them with Close).
func OpenLedger(store *Store, cfg LedgerConfig) (*Ledger, error) {
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	budget := cfg.IdemMemoryBytes
	if budget <= 0 {
		budget = DefaultIdemMemoryBytes
	}
	l := &Ledger{store: store, now: now, idemTTL: DefaultIdemTTL, seed: maphash.MakeSeed()}
	l.disk.Store(&idemDisk{})
	maxBal := cfg.Balances
	if maxBal <= 0 {
		maxBal = DefaultLedgerBalances
	}
	for i := range l.shards {
		l.shards[i].bal = map[int64]int64{}
		l.shards[i].busy = map[int64]int32{}
		l.shards[i].credit = map[int64]int64{}
		l.shards[i].maxBal = max(1, maxBal/ledgerShards)
		l.shards[i].pending = map[idemKey]*call{}
		l.shards[i].done = newIdemTable(budget / ledgerShards)
	}
	for _, s := range []struct {
		name string
		to   *atomic.Int64
	}{{"trade", &l.seq}, {"idxg", &l.groups}} {
		v, err := store.Get(SeqKey(s.name))
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, err
		}
		s.to.Store(DecodeInt64(v))
	}
	if err := l.loadIdem(); err != nil {
		return nil, err
	}
	l.commit = newCommitter(store, commitWorkers, &l.groups)
	return l, nil
}

// loadIdem fills the memory index with the records younger than the TTL and
// notes what it does not hold. Every record of a group row must be in
// memory (group rows cannot be point-read by request): one that finds no
// room (the budget was lowered) is copied to a spill row. Then per-request
// idem/ rows (an older ledger's) are loaded while there is room; from the
// first that finds none, every hour from its on is read on disk for a miss.
// Spill periods with rows are noted. So the scan is bounded by the budget.
func (l *Ledger) loadIdem() error {
	nowHour := unixHour(l.now().UnixMilli())
	from := unixHour(l.now().Add(-l.idemTTL).UnixMilli())
	var spill []row
	flush := func() error {
		if len(spill) == 0 {
			return nil
		}
		err := l.store.Apply(func(b *Batch) error {
			for _, r := range spill {
				if err := b.Set(r.k, r.v, nil); err != nil {
					return err
				}
			}
			return nil
		})
		spill = spill[:0]
		return err
	}
	err := l.store.ScanRange(Key(PrefixIdemG, uint64(from)), prefixEnd(PrefixIdemG), func(k, v []byte) (bool, error) {
		hour, group, ok := parseIdemGroupKey(k)
		if !ok {
			return true, nil
		}
		loc := mkLoc(hour, group)
		err := scanIdemGroup(v, func(user int64, reqB, res []byte) bool {
			req := string(reqB)
			if !l.shard(user).done.insert(l.idemHash(user, req), loc) {
				l.noteOnDisk(spillPeriod(hour), 0)
				spill = append(spill, row{idemSpillKey(spillPeriod(hour), user, req), bytes.Clone(res)})
			}
			return true
		})
		if err == nil && len(spill) >= 4096 {
			err = flush()
		}
		return true, err
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		return err
	}
	err = l.store.ScanRange(Key(PrefixIdem, uint64(from)), prefixEnd(PrefixIdem), func(k, _ []byte) (bool, error) {
		hour, user, req, ok := parseIdemKey(k)
		if !ok {
			return true, nil
		}
		if !l.shard(user).done.insert(l.idemHash(user, req), mkLoc(hour, 0)) {
			for h := hour; h <= max(hour, nowHour)+1; h++ {
				l.noteOnDisk(0, h)
			}
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	for p := spillPeriod(from); p <= spillPeriod(nowHour)+1; p++ {
		err := l.store.ScanRange(Key(PrefixIdemSpill, uint64(p)), Key(PrefixIdemSpill, uint64(p)+1), func(_, _ []byte) (bool, error) {
			l.noteOnDisk(p, 0)
			return false, nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// idemDisk lists where durable idempotency records are that the memory
// index does not hold: spill periods that may have rows (idsp/<period>/…)
// and hours of per-request idem/ rows not loaded at open. A request missing
// from memory is looked up there (one point read each, answered by the SST
// bloom filters when absent). Copy-on-write: read without a lock.
type idemDisk struct {
	periods []int32 // ascending
	hours   []int32 // ascending
}

// spillPeriodHours is the time span of one spill period: the rows of a
// period are deleted together once all its hours are past the TTL, and a
// miss in memory reads at most ⌈25/12⌉+1 = 4 periods.
const spillPeriodHours = 12

func spillPeriod(hour int32) int32 { return hour / spillPeriodHours }

// idemSpillKey is the key of a spilled idempotency record:
// idsp/<period>/<user>/<req>, its value the encoded Result.
func idemSpillKey(period int32, user int64, req string) []byte {
	return idemRecordKey(PrefixIdemSpill, period, user, req)
}

// idemRecordKey is <prefix><t>/<user>/<req>, the layout of both kinds of
// per-request idempotency record (t an hour or a spill period).
func idemRecordKey(prefix []byte, t int32, user int64, req string) []byte {
	k := make([]byte, 0, len(prefix)+16+len(req))
	k = append(k, prefix...)
	k = binary.BigEndian.AppendUint64(k, uint64(t))
	k = binary.BigEndian.AppendUint64(k, uint64(user))
	return append(k, req...)
}

// noteOnDisk records that spill period (if hour is 0) or idem/ hour hour
// may hold records not in memory.
func (l *Ledger) noteOnDisk(period, hour int32) {
	has := func(d *idemDisk) bool {
		if hour != 0 {
			_, ok := slices.BinarySearch(d.hours, hour)
			return ok
		}
		_, ok := slices.BinarySearch(d.periods, period)
		return ok
	}
	if has(l.disk.Load()) {
		return
	}
	l.diskMu.Lock()
	defer l.diskMu.Unlock()
	d := l.disk.Load()
	if has(d) {
		return
	}
	n := &idemDisk{periods: slices.Clone(d.periods), hours: slices.Clone(d.hours)}
	if hour != 0 {
		n.hours = append(n.hours, hour)
		slices.Sort(n.hours)
	} else {
		n.periods = append(n.periods, period)
		slices.Sort(n.periods)
	}
	l.disk.Store(n)
}

// readOnDisk looks (user, req) up where the memory index does not reach
// (see idemDisk), newest first.
func (l *Ledger) readOnDisk(user int64, req string) (Result, bool, error) {
	d := l.disk.Load()
	if len(d.periods) == 0 && len(d.hours) == 0 {
		return Result{}, false, nil
	}
	from := unixHour(l.now().Add(-l.idemTTL).UnixMilli())
	for i := len(d.periods) - 1; i >= 0 && d.periods[i] >= spillPeriod(from); i-- {
		v, err := l.store.Get(idemSpillKey(d.periods[i], user, req))
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return Result{}, false, err
		}
		res, err := decodeResult(v)
		return res, err == nil, err
	}
	for i := len(d.hours) - 1; i >= 0 && d.hours[i] >= from; i-- {
		res, found, err := l.readIdem(mkLoc(d.hours[i], 0), user, req)
		if err != nil || found {
			return res, found, err
		}
	}
	return Result{}, false, nil
}

// IdemMemoryBytes is the memory the index of recent requests' hashes holds
// now (never more than LedgerConfig.IdemMemoryBytes, but while an hour's
// entries are dropped or the index grows: then one shard's array is briefly
// there twice).
func (l *Ledger) IdemMemoryBytes() int64 {
	var n int64
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		n += sh.done.bytes()
		sh.mu.Unlock()
	}
	return n
}

// Collectors returns the ledger's Prometheus metrics: the group commit time
// (write + fsync) and the ops per group.
func (l *Ledger) Collectors() []prometheus.Collector {
	return []prometheus.Collector{l.commit.commitSeconds, l.commit.groupOps}
}

// Close waits for the ops being committed and stops the committers. Apply
// after Close fails with ErrClosed.
func (l *Ledger) Close() { l.commit.close() }

func unixHour(ms int64) int32 { return int32(ms / 3_600_000) }

func (l *Ledger) idemHash(user int64, req string) uint64 {
	return maphash.Comparable(l.seed, idemKey{user, req})
}

func (l *Ledger) shard(user int64) *ledgerShard { return &l.shards[uint64(user)%ledgerShards] }

// idemKeyBytes is the key of the idempotency record of (user, req) written
// in unix hour hour: idem/<hour>/<user>/<req>. The hour comes first so that
// expiry is one range deletion and loading the recent hashes one short scan;
// the hour of a record is kept with its hash in memory.
func idemKeyBytes(hour int32, user int64, req string) []byte {
	return idemRecordKey(PrefixIdem, hour, user, req)
}

// idemGroupKey is the key of group row group written in unix hour hour.
func idemGroupKey(hour int32, group int64) []byte {
	return Key2(PrefixIdemG, uint64(hour), uint64(group))
}

func parseIdemGroupKey(k []byte) (hour int32, group int64, ok bool) {
	rest := k[len(PrefixIdemG):]
	if len(rest) != 16 {
		return 0, 0, false
	}
	return int32(binary.BigEndian.Uint64(rest)), int64(binary.BigEndian.Uint64(rest[8:])), true
}

// readIdem reads the durable result of (user, req) at loc; found is false if
// there is none (a hash collision).
func (l *Ledger) readIdem(loc idemLoc, user int64, req string) (res Result, found bool, err error) {
	if loc.group() == 0 {
		v, err := l.store.Get(idemKeyBytes(loc.hour(), user, req))
		if errors.Is(err, ErrNotFound) {
			return Result{}, false, nil
		}
		if err != nil {
			return Result{}, false, err
		}
		res, err = decodeResult(v)
		return res, err == nil, err
	}
	// Read in place: a group row holds up to maxGroupOps records, and a
	// client may resend one req_id in a loop (a duplicate skips the rate
	// limits) — a copy of the row and a string per record each time cost
	// hundreds of KB per duplicate.
	var derr error
	err = l.store.View(idemGroupKey(loc.hour(), loc.group()), func(v []byte) error {
		return scanIdemGroup(v, func(u int64, q, r []byte) bool {
			if u == user && string(q) == req {
				res, derr = decodeResult(r)
				found = derr == nil
				return false
			}
			return true
		})
	})
	if errors.Is(err, ErrNotFound) {
		return Result{}, false, nil
	}
	if err == nil {
		err = derr // a record that does not decode is an error, never "absent"
	}
	return res, found, err
}

func parseIdemKey(k []byte) (hour int32, user int64, req string, ok bool) {
	rest := k[len(PrefixIdem):]
	if len(rest) < 16 {
		return 0, 0, "", false
	}
	return int32(binary.BigEndian.Uint64(rest)), int64(binary.BigEndian.Uint64(rest[8:])), string(rest[16:]), true
}

// Balance returns user's coin balance: what is durable, less the debits
// committing (they may still fail and be given back: shown spent meanwhile,
// never spendable twice), never a credit not yet durable (a crash would
// take it back after it was shown).
func (l *Ledger) Balance(user int64) (int64, error) {
	if b, ok := l.memBalance(user); ok {
		return b, nil
	}
	if hook := l.commit.crashAt; hook != nil {
		hook("balance", nil)
	}
	v, err := l.loadBalance(user)
	if err != nil {
		return 0, err
	}
	// Pebble shows a batch before its fsync: an op of the user that began
	// since the look above (the user loaded, its group in the log, not yet
	// synced) would be shown before it is durable. Such a user stays in
	// memory until its op is settled: answered from there. Not there, every
	// op that wrote what was read is on disk (a user leaves memory only
	// settled). Before, a credit could be shown that a crash took back.
	if b, ok := l.memBalance(user); ok {
		return b, nil
	}
	return v, nil
}

// memBalance is user's balance from memory, if the user is there: the
// credits still committing not shown (a debit may have reserved against one
// — it commits after it: durable 0, +100 and −100 committing shows 0).
func (l *Ledger) memBalance(user int64) (int64, bool) {
	sh := l.shard(user)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	b, ok := sh.bal[user]
	return max(0, b-sh.credit[user]), ok
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
	var (
		res Result
		err error
	)
	ch := make(chan struct{})
	l.ApplyAsync(op, func(r Result, e error) { res, err = r, e; close(ch) })
	<-ch
	return res, err
}

// ApplyAsync is Apply without the wait: done is called exactly once with the
// outcome, after the op is durable (or refused). It runs on the caller's
// goroutine when the outcome is known at once (bad op, insufficient balance,
// a remembered result) and on a ledger committer otherwise, so it must be
// quick and must not block. op.Check runs on the caller's goroutine.
func (l *Ledger) ApplyAsync(op Op, done func(Result, error)) {
	if len(op.Postings) == 0 && len(op.Tallies) == 0 {
		done(Result{}, ErrBadOp)
		return
	}
	if len(op.ReqID) > 160 {
		done(Result{}, fmt.Errorf("%w: req_id longer than 160 bytes", ErrBadOp))
		return
	}
	if op.ReqID == "" {
		l.checkAndCommit(op, false, done)
		return
	}
	c, first, locs := l.claim(op.User, op.ReqID, done)
	if !first {
		return // done is c's waiter, or was called with the remembered result
	}
	finish := func(r Result, err error) { l.finish(op, c, done, r, err) }
	for _, loc := range locs {
		// A hash hit: read the record (rarely a hash collision, then absent).
		r, found, err := l.readIdem(loc, op.User, op.ReqID)
		if err != nil {
			finish(Result{}, lookupFailed(err))
			return
		}
		if found {
			r.Replayed, r.loc = true, loc
			finish(r, nil)
			return
		}
	}
	// Not in memory: absent, unless it is where memory does not reach.
	r, found, err := l.readOnDisk(op.User, op.ReqID)
	if err != nil {
		finish(Result{}, lookupFailed(err))
		return
	}
	if found {
		// Pebble makes a batch readable before its fsync: after a failed
		// one, what is read here may not be durable (a group whose fsync
		// failed answered its ops in doubt) — "retry", never ok. A record
		// the memory index names was inserted only once durable.
		if err := l.commit.failed(); err != nil {
			finish(Result{}, err)
			return
		}
		r.Replayed = true
		finish(r, nil)
		return
	}
	// A new request: its record goes into a group row if memory has room
	// for its hash, else into a spill row of its own.
	sh := l.shard(op.User)
	sh.mu.Lock()
	c.reserved = sh.done.reserve()
	sh.mu.Unlock()
	l.checkAndCommit(op, !c.reserved, finish)
}

// lookupFailed is the answer to a request whose earlier record could not be
// read (a read error, a record that does not decode): the request may have
// run — its debit may be durable — so it is ErrInProgress ("retry with the
// same req_id"), never a failure the caller would tell as "nothing moved".
func lookupFailed(err error) error {
	return fmt.Errorf("%w: its earlier result could not be read: %v", ErrInProgress, err)
}

// checkAndCommit runs op.Check (a request that is not a duplicate), then
// reserves and commits.
func (l *Ledger) checkAndCommit(op Op, spill bool, done func(Result, error)) {
	// After a failed commit (the node must restart) a request may be the
	// retry of an op answered in doubt whose record no lookup finds (a
	// group row is indexed only once durable): "retry" — never its check's
	// or the balance's refusal, which says nothing moved while its first
	// attempt may be durable.
	if err := l.commit.store.Failed(); err != nil {
		done(Result{}, fmt.Errorf("%w (%w)", err, ErrInProgress))
		return
	}
	if op.Check != nil {
		if err := op.Check(); err != nil {
			done(Result{}, err)
			return
		}
	}
	l.reserveAndCommit(op, spill, done)
}

// claim registers (user, req) as in flight; first reports whether the caller
// owns it, locs where a durable record of it may be (the memory index's
// entries of its hash). Otherwise done either waits for the request in
// flight or is called here with a remembered result.
func (l *Ledger) claim(user int64, req string, done func(Result, error)) (c *call, first bool, locs []idemLoc) {
	sh := l.shard(user)
	k := idemKey{user, req}
	h := l.idemHash(user, req)
	sh.mu.Lock()
	if c, ok := sh.pending[k]; ok {
		switch {
		case !c.fin:
			c.waiters = append(c.waiters, done)
			sh.mu.Unlock()
			return c, false, nil
		case l.now().Sub(c.at) <= l.idemTTL:
			r, err := c.res, c.err
			sh.mu.Unlock()
			r.Replayed = true
			done(r, err)
			return c, false, nil
		}
		delete(sh.pending, k) // a failure older than the TTL: forgotten
	}
	c = &call{hash: h}
	sh.pending[k] = c
	sh.done.lookup(h, func(loc idemLoc) bool { locs = append(locs, loc); return true })
	sh.mu.Unlock()
	return c, true, locs
}

// finish publishes the result to done and to waiting duplicates. A success
// is durable (idem record), so it leaves memory but for its hash; failures
// moved nothing and are kept in a bounded memory window so duplicates get
// the same answer.
func (l *Ledger) finish(op Op, c *call, done func(Result, error), res Result, err error) {
	sh := l.shard(op.User)
	loc := res.loc
	res.loc = 0
	sh.mu.Lock()
	c.res, c.err, c.at, c.fin = res, err, l.now(), true
	waiters := c.waiters
	c.waiters = nil
	if c.reserved {
		c.reserved = false
		if err == nil && loc.group() != 0 {
			sh.done.insertReserved(c.hash, loc)
		} else {
			sh.done.release() // failed, or written to a spill row
		}
	}
	if err == nil || !errors.Is(err, ErrInsufficient) {
		delete(sh.pending, idemKey{op.User, op.ReqID})
	} else if len(sh.pending) > maxRememberedFailures {
		for k, old := range sh.pending {
			if old.fin {
				delete(sh.pending, k)
			}
			if len(sh.pending) <= maxRememberedFailures/2 {
				break
			}
		}
	}
	sh.mu.Unlock()
	done(res, err)
	res.Replayed = true
	for _, w := range waiters {
		w(res, err)
	}
}

// reserveAndCommit checks and reserves every posting in memory (atomically
// across the users involved), encodes the op's rows and queues them for the
// next group commit; done runs once they are durable. If the commit fails the
// reservation is undone and the ledger refuses every later op (the node must
// restart and reload from Pebble: after a failed fsync nothing in memory can
// be trusted).
func (l *Ledger) reserveAndCommit(op Op, spill bool, done func(Result, error)) {
	users := make([]int64, 0, len(op.Postings))
	for _, p := range op.Postings {
		if p.User <= 0 {
			done(Result{}, fmt.Errorf("%w: user %d", ErrBadOp, p.User))
			return
		}
		users = append(users, p.User)
	}
	at := l.now().UnixMilli()
	spill = spill && op.ReqID != ""
	if spill {
		l.noteOnDisk(spillPeriod(unixHour(at)), 0) // before any duplicate can look
	}
	// Load balances not yet in memory (I/O outside the locks); one dropped
	// meanwhile is loaded again.
	var locked []int
	for {
		if err := l.loadBalances(users); err != nil {
			done(Result{}, err)
			return
		}
		locked = l.lockUsers(users)
		if l.haveBalances(users) {
			break
		}
		l.unlock(locked)
	}
	res := Result{TradeIDs: make([]int64, len(op.Postings)), Balances: make([]int64, len(op.Postings)), At: at}
	// Check every posting against the running balance first, then apply.
	for i, p := range op.Postings {
		b := l.shard(p.User).bal[p.User]
		for j := 0; j < i; j++ {
			if op.Postings[j].User == p.User {
				b = res.Balances[j]
			}
		}
		if p.Delta > MaxBalance || p.Delta < -MaxBalance || p.Delta > 0 && b > MaxBalance-p.Delta {
			// int64 would wrap long before a credit is refused by anything
			// else (a balance of MaxInt64 plus 1 is negative).
			l.unlock(locked)
			done(Result{}, ErrBalanceLimit)
			return
		}
		b += p.Delta
		if b < 0 {
			l.unlock(locked)
			done(Result{}, ErrInsufficient)
			return
		}
		res.Balances[i] = b
	}
	for i, p := range op.Postings {
		sh := l.shard(p.User)
		sh.bal[p.User] += p.Delta
		sh.busy[p.User]++
		if p.Delta > 0 {
			sh.credit[p.User] += p.Delta
		}
		res.TradeIDs[i] = l.seq.Add(1)
	}
	// The op is queued before the locks are released: an op that reserves
	// against this one's credit (it needs one of these locks) is queued after
	// it, so it commits in the same group or a later one, never before
	// (groups become durable in queue order).
	var maxID int64
	if n := len(res.TradeIDs); n > 0 {
		maxID = res.TradeIDs[n-1]
	}
	e := &commitEntry{rows: opRows(op, res), postings: op.Postings, tallies: op.Tallies, maxID: maxID}
	switch {
	case spill:
		e.rows = append(e.rows, row{idemSpillKey(spillPeriod(unixHour(res.At)), op.User, op.ReqID), encodeResult(res)})
	case op.ReqID != "":
		e.idem = appendIdemEntry(nil, op.User, op.ReqID, encodeResult(res))
		e.hour = unixHour(res.At)
	}
	e.done = func(err error) {
		if err != nil {
			locked := l.lockUsers(users)
			for _, p := range op.Postings {
				l.shard(p.User).bal[p.User] -= p.Delta
				l.shard(p.User).settled(p.User, p.Delta)
			}
			l.unlock(locked)
			done(Result{}, err)
			return
		}
		for _, p := range op.Postings { // durable: memory == Pebble for them once none is busy
			sh := l.shard(p.User)
			sh.mu.Lock()
			sh.settled(p.User, p.Delta)
			sh.mu.Unlock()
		}
		res.loc = e.loc
		done(res, nil)
	}
	if err := l.commit.add(e); err != nil {
		for _, p := range op.Postings { // refused (closed or failed): nothing queued
			l.shard(p.User).bal[p.User] -= p.Delta
			l.shard(p.User).settled(p.User, p.Delta)
		}
		l.unlock(locked)
		done(Result{}, err)
		return
	}
	l.unlock(locked)
	if hook := l.commit.crashAt; hook != nil {
		hook("reserved", []*commitEntry{e})
	}
}

// loadBalances reads from Pebble the balances of users not in memory and
// keeps each unless a balance of its shard was dropped while it was read.
func (l *Ledger) loadBalances(users []int64) error {
	for _, u := range users {
		sh := l.shard(u)
		sh.mu.Lock()
		_, ok := sh.bal[u]
		dropped := sh.dropped
		sh.mu.Unlock()
		if ok {
			continue
		}
		b, err := l.loadBalance(u)
		if err != nil {
			return err
		}
		if hook := l.commit.crashAt; hook != nil {
			hook("loaded", nil)
		}
		sh.mu.Lock()
		if _, ok := sh.bal[u]; !ok && sh.dropped == dropped {
			sh.keepBalance(u, b)
		}
		sh.mu.Unlock()
	}
	return nil
}

// haveBalances reports whether every user's balance is in memory (their
// shards locked).
func (l *Ledger) haveBalances(users []int64) bool {
	for _, u := range users {
		if _, ok := l.shard(u).bal[u]; !ok {
			return false
		}
	}
	return true
}

// keepBalance adds u's balance b, read from Pebble, to memory; at the bound
// it first drops the balances of users with no op committing, down to 3/4
// of it (a map sweep, once per quarter of the bound added). Busy balances
// cannot go: the sweep waits until a quarter of the bound can — with every
// balance busy, each load swept the whole map for nothing (loads quadratic
// in the ops in flight) and counted a drop, which made every balance read
// meanwhile be read again. The map then holds at most the busy balances and
// a quarter of the bound more. With sh.mu.
func (sh *ledgerShard) keepBalance(u, b int64) {
	if len(sh.bal) >= sh.maxBal && len(sh.bal)-len(sh.busy) >= max(1, sh.maxBal/4) {
		n := len(sh.bal)
		for v := range sh.bal {
			if len(sh.bal) <= sh.maxBal*3/4 {
				break
			}
			if sh.busy[v] == 0 {
				delete(sh.bal, v)
			}
		}
		if len(sh.bal) < n {
			sh.dropped++
		}
	}
	sh.bal[u] = b
}

// settled counts one posting of u's, of delta, as no longer committing.
// With sh.mu.
func (sh *ledgerShard) settled(u, delta int64) {
	if sh.busy[u]--; sh.busy[u] <= 0 {
		delete(sh.busy, u)
	}
	if delta > 0 {
		if sh.credit[u] -= delta; sh.credit[u] <= 0 {
			delete(sh.credit, u)
		}
	}
}

// row is one key/value an op writes (Set).
type row struct{ k, v []byte }

// opRows encodes the rows of an applied op: trade rows and the business
// records. The idempotency record, balances, tallies and the trade-id
// high-water mark are added by the caller.
func opRows(op Op, res Result) []row {
	rows := make([]row, 0, len(op.Postings)+len(op.Static)+2)
	for i, p := range op.Postings {
		t := Trade{ID: res.TradeIDs[i], User: p.User, Delta: p.Delta, Reason: p.Reason, Ref: p.Ref,
			Balance: res.Balances[i], At: res.At}
		if p.User == op.User {
			t.ReqID = op.ReqID
		}
		rows = append(rows, row{Key2(PrefixTrade, uint64(p.User), uint64(t.ID)), encodeTrade(t)})
	}
	for _, r := range op.Static {
		rows = append(rows, row{r.Key, r.Value})
	}
	if op.Records != nil {
		for _, r := range op.Records(res.TradeIDs) {
			rows = append(rows, row{r.Key, r.Value})
		}
	}
	return rows
}

// writeOp adds the durable share of one applied op to b: its rows, its own
// idempotency row and one merge per posting (balance), tally and the
// trade-id high-water mark. The shared wallet writes each op this way; the
// Ledger's committer writes the same rows but one idempotency row and one
// merge per account per batch.
func writeOp(b *Batch, op Op, res Result) error {
	rows := opRows(op, res)
	if op.ReqID != "" {
		rows = append(rows, row{idemKeyBytes(unixHour(res.At), op.User, op.ReqID), encodeResult(res)})
	}
	for _, r := range rows {
		if err := b.Set(r.k, r.v, nil); err != nil {
			return err
		}
	}
	for _, p := range op.Postings {
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
		return b.Merge(SeqKey("trade"), EncodeInt64(res.TradeIDs[n-1]), nil)
	}
	return nil
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

// Tally returns the value of tally name for user, once what it read of
// Pebble is durable (a crash would take back a sum shown before its fsync).
func (l *Ledger) Tally(name string, user int64) (int64, error) {
	v, err := l.store.Get(TallyKey(name, user))
	if errors.Is(err, ErrNotFound) {
		v, err = nil, nil
	}
	if err != nil {
		return 0, err
	}
	if err := l.commit.durable(); err != nil {
		return 0, err
	}
	return DecodeInt64(v), nil
}

// TallyDropper is a wallet that can drop a tally no op adds to any more (a
// PK contest's, once its final scores are recorded).
type TallyDropper interface {
	DropTally(name string, user int64) error
}

var _ TallyDropper = (*Ledger)(nil)

// DropTally deletes tally name of user. An op still adding to it after
// this (none should) starts it again from its own delta.
func (l *Ledger) DropTally(name string, user int64) error {
	return l.store.Delete(TallyKey(name, user))
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
		t, err := decodeTrade(v)
		if err != nil {
			return false, err
		}
		out = append(out, t)
		return len(out) < limit, nil
	})
	if err != nil {
		return nil, err
	}
	// Listed once durable: a crash would take back a trade listed before
	// its group's fsync.
	if err := l.commit.durable(); err != nil {
		return nil, err
	}
	return out, nil
}

// ExpireIdem deletes the idempotency records of the hours before cutoff's
// (one range deletion per row kind; records of cutoff's own hour stay until
// the next call) and their hashes in memory, and returns how many it deleted.
func (l *Ledger) ExpireIdem(cutoff time.Time) (int, error) {
	hour := uint64(unixHour(cutoff.UnixMilli()))
	n := 0
	err := l.store.ScanRange(PrefixIdem, Key(PrefixIdem, hour), func(_, _ []byte) (bool, error) { n++; return true, nil })
	if err != nil {
		return 0, err
	}
	err = l.store.ScanRange(PrefixIdemG, Key(PrefixIdemG, hour), func(_, v []byte) (bool, error) {
		return true, scanIdemGroup(v, func(int64, []byte, []byte) bool { n++; return true })
	})
	if err != nil {
		return 0, err
	}
	spillEnd := Key(PrefixIdemSpill, uint64(spillPeriod(int32(hour)))) // whole periods only
	err = l.store.ScanRange(PrefixIdemSpill, spillEnd, func(_, _ []byte) (bool, error) { n++; return true, nil })
	if err != nil || n == 0 {
		return 0, err
	}
	err = l.store.Apply(func(b *Batch) error {
		if err := b.DeleteRange(PrefixIdem, Key(PrefixIdem, hour), nil); err != nil {
			return err
		}
		if err := b.DeleteRange(PrefixIdemSpill, spillEnd, nil); err != nil {
			return err
		}
		return b.DeleteRange(PrefixIdemG, Key(PrefixIdemG, hour), nil)
	})
	if err != nil {
		return 0, err
	}
	l.forgetBefore(int32(hour))
	return n, nil
}

// forgetBefore drops the in-memory hashes of records from hours before hour
// and the notes of expired places on disk (their records are gone from
// Pebble).
func (l *Ledger) forgetBefore(hour int32) {
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		sh.done.removeBefore(hour)
		sh.mu.Unlock()
	}
	l.diskMu.Lock()
	d := l.disk.Load()
	n := &idemDisk{}
	for _, p := range d.periods {
		if p >= spillPeriod(hour) {
			n.periods = append(n.periods, p)
		}
	}
	for _, h := range d.hours {
		if h >= hour {
			n.hours = append(n.hours, h)
		}
	}
	l.disk.Store(n)
	l.diskMu.Unlock()
}

// Audit checks conservation over the whole ledger: for every user, the
// durable balance equals the sum of its trades and is never negative. It
// returns Σ credits, Σ debits (as a positive number) and Σ balances.
func (l *Ledger) Audit() (credits, debits, balances int64, err error) {
	sums := map[int64]int64{}
	err = l.store.Scan(PrefixTrade, func(_, v []byte) error {
		t, err := decodeTrade(v)
		if err != nil {
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
