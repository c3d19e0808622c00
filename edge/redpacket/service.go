package redpacket

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/edge/account"
	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// Defaults of Config fields left zero.
const (
	DefaultMaxCount     = 100_000
	DefaultMaxTotal     = 1_000_000_000
	DefaultMaxPerAnchor = 10
	DefaultMinDuration  = time.Second
	DefaultMaxDuration  = 10 * time.Minute
	// poolTimeout bounds one pool call (Redis in redis-list mode).
	poolTimeout = 2 * time.Second
	// settleRetry is the wait before a settlement that failed is tried again.
	settleRetry = 5 * time.Second
)

// Config configures Service. Zero values mean the defaults named above.
type Config struct {
	Node string // this node's id (records, per-node split)
	// Pool holds running rains' packets (nil = NewMemoryPool()).
	Pool Pool
	// AnchorOf returns the anchor of an open room (ok false: not open; an
	// error: it could not be told — a create is 50000 "retry").
	AnchorOf func(room int64) (anchor int64, ok bool, err error)
	// InRoom reports whether user is in room (a session of the user joined
	// the room: on this node, or in a cluster on any live node). A grab
	// from anyone else is 10003; an error (the cluster's presence could not
	// be read) is 50000 "retry", nothing done.
	InRoom func(room, user int64) (bool, error)
	// Frozen tells whether a user's account is frozen (edge/account): a
	// frozen anchor prepares no rain (its debit) and a frozen viewer grabs
	// nothing (its credit): 20004, nothing moves. nil = none is.
	Frozen func(user int64) (bool, error)

	MaxCount    int           // packets per rain (0 = DefaultMaxCount, ≤ MaxCount)
	MaxTotal    int64         // coins per rain (0 = DefaultMaxTotal, ≤ MaxTotal)
	MinDuration time.Duration // 0 = DefaultMinDuration
	MaxDuration time.Duration // 0 = DefaultMaxDuration
	// MaxPerAnchor bounds the rains an anchor has not finished (WAIT,
	// PREPARED, RUNNING): one more create is 10409 (0 = DefaultMaxPerAnchor).
	MaxPerAnchor int
	// OnePerUser: a user gets at most one packet per rain (30002 after).
	OnePerUser bool
	// PrepareInterval and StartInterval rate-limit prepare and start per
	// anchor (0 = no limit); GrabInterval rate-limits grabs per user per
	// code (0 = no limit). A repeated prepare/start of a code that is already
	// prepared/started answers without counting.
	PrepareInterval, StartInterval, GrabInterval time.Duration
	// CreatesPerMinute bounds the rains an anchor creates (bursts of
	// CreateBurst; 0 = DefaultCreatesPerMinute, < 0 = no limit): a rain
	// cancelled in WAIT frees its slot of MaxPerAnchor at once, and every
	// rain leaves a durable record — a create/cancel loop was unbounded.
	CreatesPerMinute int
	// SharedCreates, if set, counts CreatesPerMinute on every node of a
	// cluster as well (limit.Shared: an anchor's rains may be created
	// through any node).
	SharedCreates *limit.Shared
	Now           func() time.Time // nil = time.Now
	// SharedPrepares and SharedStarts, if set, replace this node's prepare
	// and start limiters (one per PrepareInterval / StartInterval) with ones
	// every node shares (limit.Shared: an anchor's rains may live on
	// different nodes). Redis not answering: refused.
	SharedPrepares, SharedStarts *limit.Shared
	// SharedGrabs, if set, counts GrabInterval across the nodes too (a
	// cluster without OnePerUser: a rain's slices are on every node, and a
	// user joined through several grabbed on each at its own pace).
	SharedGrabs *limit.Shared
	// CodeTag, if ≥ 0, is put in every new code's first character (a
	// cluster: the node's worker id, so other nodes route the rain's
	// requests to it; CodeTag reads it back). Use -1 for none.
	CodeTag int
	// TagHeld, if set, reports whether this node holds CodeTag now (a
	// cluster: its worker lease). A rain is not created while it does not:
	// another node may hold the worker id, and every other node would send
	// the new rain's requests there.
	TagHeld func() bool
	// Peers, if set (a cluster with the memory pool), shards running rains
	// across the nodes whose viewers grab (shard.go): other nodes lease
	// slices of this node's rains and this node grabs from theirs (GrabVia).
	Peers Peers
	// Claim and Unclaim, if set, keep OnePerUser in places every node shares
	// (a sharded rain is grabbed on many nodes), each held by the grab
	// attempt (token) that took it. Claim true = the user had no place in
	// rain code, or had one held by one of prev (attempts of this node that
	// granted nothing for sure), and token holds it now (kept until after
	// until, a Unix ms time); false: another attempt holds it. Unclaim
	// gives the place back if token still holds it. gen names the shared
	// wallet generation the place was taken in (persist.Op.Gen): the grant
	// is pinned to it, so a grant whose place a Redis loss took with it
	// never lands in the rebuilt generation without its place ("" = not
	// pinned).
	Claim   func(ctx context.Context, code string, user int64, until int64, token string, prev []string) (ok bool, gen string, err error)
	Unclaim func(ctx context.Context, code string, user int64, token string) error
	// RoomRun and RoomDone, if set, keep "one running rain per room" in a
	// place every node shares (a room's rains may be owned by different
	// nodes): RoomRun true = code is now the room's running rain (until a
	// Unix ms time at the latest); RoomDone ends that, if code still holds it.
	RoomRun  func(ctx context.Context, room int64, code string, until int64) (bool, error)
	RoomDone func(ctx context.Context, room int64, code string) error
	// EndCheck is how long a sharded rain's pool stays empty, with no
	// holder asking for more, before the owner asks its holders itself
	// whether any packet is left (watchEnd; 0 = 1 s).
	EndCheck time.Duration
}

// Service runs red-packet rains on one node. Safe for concurrent use.
//
// Invariants:
//   - a packet (code, index) is granted at most once: the pool holds each
//     index at most once per process (split minus durable grants), and the
//     grant row and the grabber's credit are one ledger op, idempotent by
//     (grabber, "rp:<code>:<index>");
//   - a grab is answered ok only after its grant and credit are durable;
//   - Σ durable grants ≤ T, and settlement refunds exactly T − Σ durable
//     grants, once (ledger request "rp-end:<code>", which also writes the
//     FINISHED record), after every grab in flight has completed;
//   - at most one RUNNING rain per room; an anchor has at most MaxPerAnchor
//     rains not FINISHED.
//
// Locks: mu (the maps) before a rain's mu; neither is held across I/O or a
// wallet call. Grant callbacks run on a ledger committer and only take locks
// and queue pushes; settlement runs on its own goroutine (tracked in
// settles, waited for by Close).
type Service struct {
	cfg    Config
	store  *persist.Store
	wallet persist.Wallet
	router router.Router
	pool   Pool
	mem    *MemoryPool // pool, when it is a MemoryPool and Peers is set (sharded)
	log    *slog.Logger

	prepLimit, startLimit, grabLimit, createLimit *limit.Keyed
	tooManyRains                                  *proto.Error // createLimit's refusal (10429)

	// keepStop ends keepRooms (nil: no shared room check); keepDone is
	// closed when it has. Set once in New.
	keepStop, keepDone chan struct{}
	// quit is closed by Close (the sharded end watchers stop waiting).
	quit chan struct{}

	mu        sync.RWMutex
	closed    bool
	rains     map[string]*rain  // not FINISHED
	perAnchor map[int64]int     // rains not FINISHED per anchor
	running   map[int64]string  // room → its RUNNING rain
	prepared  map[int64]string  // room → its latest PREPARED rain
	shards    map[string]*shard // slices of other nodes' rains (sharded)
	settles   sync.WaitGroup

	// Shared one-per-user places (Config.Claim): tokenBase and tokens name
	// this process's grab attempts; lost holds, per (rain, user), the
	// attempts of this node that may hold the user's place and granted
	// nothing for sure (a claim's reply lost, a release not answered:
	// unclaim), each released by one loop per entry (releaseLoop) — the
	// user's next grab here takes the place back from any of them at once.
	// A token goes when its release is answered or the place is taken back,
	// the entry when it has none or the rain is over. placesMu is a leaf:
	// nothing else is locked under it.
	tokenBase string
	tokens    atomic.Uint64
	placesMu  sync.Mutex
	lost      map[placeKey]*lostPlace
}

// rain is one rain not FINISHED, in memory.
type rain struct {
	mu       sync.Mutex
	rec      record
	busy     bool // a prepare, start or cancel is in progress (see also rec.Pending)
	granted  int  // grants durable in this process's view
	amount   int64
	maxGrant int64
	inflight int                // grabs between Pop and their ledger outcome
	users    map[int64]struct{} // OnePerUser: users granted or grabbing
	timer    *time.Timer
	ending   bool // no more grabs; settles once inflight is 0
	settling bool
	// final: the rain's end is for good (its time is up, or a settlement
	// began); otherwise an ending found "the pool is empty" and is undone
	// when a packet goes back to it (reopen).
	final bool
	// cancelling: a cancel left pending (in doubt) is retried in the
	// background until it completes (goCancel), once per rain.
	cancelling bool
	// doubt are grant ops whose outcome the wallet could not tell (the
	// shared wallet's ErrInProgress: it may still land). Settlement applies
	// each again first (same request id: it lands once), so the refund never
	// counts a packet that is granted later. Bounded by the rain's count.
	doubt []persist.Op
	// taken marks the indexes this node has taken to grant (granted, being
	// granted or in doubt), with those durably granted when the pool was
	// loaded: a pool that yields an index again — a Redis list that a
	// restart rolled back to before its last pops — is caught here and
	// never granted twice. Set by loadPool before the rain runs; nil on a
	// node that only holds leased slices of it.
	taken  []atomic.Uint64
	ntaken int32 // the rain's count, the bound of taken's indexes

	// Sharded (Config.Peers), on the owner: the split, the nodes packets
	// were leased to, where each index is (0 here, else 1 + its holder),
	// the lease log's last sequence and the reclaim rounds.
	split      []int64
	holders    []*holder
	where      []uint16
	logSeq     uint32
	rounds     uint64    // reclaim rounds started
	answered   uint64    // lease answers built (with packets)
	reclaiming *roundRun // the round in progress
	lastRound  *roundRun // the last round that ended
	transit    int       // leases being answered whose packets are on their way
	endWatch   bool      // an end watcher runs (watchEnd)
	lastAsk    time.Time // a holder's last lease (watchEnd)
}

// New returns the service and restores the rains that were not finished
// from store: a RUNNING rain gets its pool back (the split minus its durable
// grants) and resumes, or is settled if its time is up or its pool is empty.
func New(store *persist.Store, w persist.Wallet, r router.Router, cfg Config, log *slog.Logger) (*Service, error) {
	if cfg.Pool == nil {
		cfg.Pool = NewMemoryPool()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxCount <= 0 || cfg.MaxCount > MaxCount {
		cfg.MaxCount = min(DefaultMaxCount, MaxCount)
	}
	if cfg.MaxTotal <= 0 || cfg.MaxTotal > MaxTotal {
		cfg.MaxTotal = DefaultMaxTotal
	}
	if cfg.MinDuration <= 0 {
		cfg.MinDuration = DefaultMinDuration
	}
	if cfg.MaxDuration <= 0 {
		cfg.MaxDuration = DefaultMaxDuration
	}
	if cfg.MaxPerAnchor <= 0 {
		cfg.MaxPerAnchor = DefaultMaxPerAnchor
	}
	if cfg.AnchorOf == nil {
		cfg.AnchorOf = func(int64) (int64, bool, error) { return 0, false, nil }
	}
	if cfg.InRoom == nil {
		cfg.InRoom = func(int64, int64) (bool, error) { return false, nil }
	}
	if log == nil {
		log = slog.Default()
	}
	s := &Service{cfg: cfg, store: store, wallet: w, router: r, pool: cfg.Pool, log: log.With("svc", "redpacket"),
		rains: map[string]*rain{}, perAnchor: map[int64]int{},
		running: map[int64]string{}, prepared: map[int64]string{}, shards: map[string]*shard{}, quit: make(chan struct{}),
		tokenBase: cfg.Node + ":" + strconv.FormatUint(rand.Uint64(), 36), lost: map[placeKey]*lostPlace{}}
	if m, ok := cfg.Pool.(*MemoryPool); ok && cfg.Peers != nil {
		s.mem = m
	}
	if cfg.Claim == nil || cfg.Unclaim == nil {
		s.cfg.Claim, s.cfg.Unclaim = nil, nil
	}
	if cfg.EndCheck <= 0 {
		s.cfg.EndCheck = time.Second
	}
	s.prepLimit = interval(cfg.PrepareInterval, cfg.Now)
	s.startLimit = interval(cfg.StartInterval, cfg.Now)
	s.grabLimit = interval(cfg.GrabInterval, cfg.Now)
	if cfg.CreatesPerMinute == 0 {
		s.cfg.CreatesPerMinute = DefaultCreatesPerMinute
	}
	s.createLimit = limit.New(s.cfg.CreatesPerMinute, time.Minute, CreateBurst, cfg.Now)
	s.tooManyRains = proto.Errorf(proto.CodeRateLimited, "at most %d red-packet rains created per minute", s.cfg.CreatesPerMinute)
	if n, ok := w.(persist.SettleNotifier); ok {
		// A grant or refund answered in doubt whose op the wallet's watcher
		// then finds ran: its 5570, which nothing else sends (a retry or
		// the settlement's re-apply is a replay then).
		n.OnSettled(s.onSettled)
	}
	if err := s.restore(); err != nil {
		return nil, err
	}
	if cfg.RoomRun != nil {
		s.keepStop, s.keepDone = make(chan struct{}), make(chan struct{})
		go s.keepRooms()
	}
	return s, nil
}

// DefaultCreatesPerMinute and CreateBurst: Config.CreatesPerMinute.
const (
	DefaultCreatesPerMinute = 10
	CreateBurst             = 5
)

// interval is a limiter of one event per d per key (nil: d ≤ 0, no limit).
// allow applies the prepare or start limit of anchor: the shared one in a
// cluster (one Redis round trip; prepare and start are rare), else this
// node's.
//
// nil: allowed (recorded); 10429: too soon; Redis not answering: 50000
// "retry" (before, 10429: an anchor told to wait who only had to retry).
func (s *Service) allow(kind string, anchor int64) *proto.Error {
	shared, local := s.cfg.SharedPrepares, s.prepLimit
	if kind == "start" {
		shared, local = s.cfg.SharedStarts, s.startLimit
	}
	if shared != nil {
		return shared.Check(uint64(anchor), proto.ErrRateLimited, s.log)
	}
	if !local.Allow(uint64(anchor)) {
		return proto.ErrRateLimited
	}
	return nil
}

func interval(d time.Duration, now func() time.Time) *limit.Keyed {
	if d <= 0 {
		return nil
	}
	return limit.New(1, d, 1, now)
}

// View is a rain as shown by GET /redpackets/{code} and the anchor endpoints.
type View struct {
	Code          string      `json:"code"`
	RoomID        int64       `json:"room_id"`
	AnchorID      int64       `json:"anchor_id"`
	State         string      `json:"state"`
	TotalAmount   int64       `json:"total_amount"`
	TotalCount    int         `json:"total_count"`
	DurationS     int64       `json:"duration_s"`
	GrantedCount  int         `json:"granted_count"`
	GrantedAmount int64       `json:"granted_amount"`
	MaxGrant      int64       `json:"max_grant"`
	Refunded      int64       `json:"refunded"`
	StartedAt     int64       `json:"started_at,omitempty"`
	EndsAt        int64       `json:"ends_at,omitempty"`
	FinishedAt    int64       `json:"finished_at,omitempty"`
	Cancelled     bool        `json:"cancelled,omitempty"` // ended by its anchor before it started
	Nodes         []NodeSplit `json:"nodes"`
}

// PublicView is a rain as GET /redpackets/{code} shows it to a user other
// than its anchor: what its pushes tell the room (5560 when it starts, 5561
// when it ends) — its stats (the total, the grants while it runs, the split
// across nodes) are its anchor's (PROTOCOL §4).
type PublicView struct {
	Code          string `json:"code"`
	RoomID        int64  `json:"room_id"`
	AnchorID      int64  `json:"anchor_id"`
	State         string `json:"state"`
	TotalCount    int    `json:"total_count"`
	DurationS     int64  `json:"duration_s"`
	StartedAt     int64  `json:"started_at,omitempty"`
	EndsAt        int64  `json:"ends_at,omitempty"`
	FinishedAt    int64  `json:"finished_at,omitempty"`
	Cancelled     bool   `json:"cancelled,omitempty"`
	GrantedCount  *int   `json:"granted_count,omitempty"` // once FINISHED, as 5561
	GrantedAmount *int64 `json:"granted_amount,omitempty"`
	Refunded      *int64 `json:"refunded,omitempty"`
}

// Public is v without its anchor's stats.
func (v View) Public() PublicView {
	p := PublicView{Code: v.Code, RoomID: v.RoomID, AnchorID: v.AnchorID, State: v.State, TotalCount: v.TotalCount,
		DurationS: v.DurationS, StartedAt: v.StartedAt, EndsAt: v.EndsAt, FinishedAt: v.FinishedAt, Cancelled: v.Cancelled}
	if v.State == StateFinished {
		p.GrantedCount, p.GrantedAmount, p.Refunded = &v.GrantedCount, &v.GrantedAmount, &v.Refunded
	}
	return p
}

// NodeSplit is one node's share of a rain's pool.
type NodeSplit struct {
	Node    string `json:"node"`
	Count   int    `json:"count"`   // packets the node was given
	Left    int    `json:"left"`    // not popped yet
	Granted int    `json:"granted"` // granted by the node
	Amount  int64  `json:"granted_amount"`
	Max     int64  `json:"-"`
}

// GrabReply is the d of a successful grab.
type GrabReply struct {
	Amount int64  `json:"amount"`
	Msg    string `json:"msg"`
}

// StartedPush is the d of biz 5560.
type StartedPush struct {
	Code       string `json:"code"`
	TotalCount int    `json:"total_count"`
	EndsAt     int64  `json:"ends_at"`
}

// FinishedPush is the d of biz 5561.
type FinishedPush struct {
	Code          string `json:"code"`
	GrantedCount  int    `json:"granted_count"`
	GrantedAmount int64  `json:"granted_amount"`
	Refunded      int64  `json:"refunded"` // extension: returned to the anchor
}

// CreditPush is the d of biz 5570.
type CreditPush struct {
	Balance int64  `json:"balance"`
	Delta   int64  `json:"delta"`
	Reason  string `json:"reason"`
}

var (
	errNotFound    = &proto.Error{Code: proto.CodeNotFound, Msg: "red packet rain not found"}
	errNotAnch     = &proto.Error{Code: proto.CodeForbidden, Msg: "only the room's anchor manages its red packets"}
	errGrabNone    = &proto.Error{Code: proto.CodeRedPacketNotFound, Msg: "red packet not found or not started"}
	errEmpty       = &proto.Error{Code: proto.CodeRedPacketEmpty, Msg: "红包已派发完毕 (red packets all gone)"}
	errTaken       = &proto.Error{Code: proto.CodeRedPacketTaken, Msg: "you already grabbed a red packet of this rain"}
	errNotInRm     = &proto.Error{Code: proto.CodeForbidden, Msg: "not in the red packet's room"}
	errInRmUnknown = proto.Errorf(proto.CodeInternal, "could not check the room's members, retry")
)

func (s *Service) view(r *rain) View {
	ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
	defer cancel()
	r.mu.Lock()
	rec, v := r.rec, View{GrantedCount: r.granted, GrantedAmount: r.amount, MaxGrant: r.maxGrant}
	ns := NodeSplit{Node: rec.Node, Granted: r.granted, Amount: r.amount}
	if rec.State == StateRunning {
		ns.Count = rec.Count
	}
	var others []NodeSplit
	for _, h := range r.holders {
		others = append(others, NodeSplit{Node: h.node, Count: h.out, Left: max(0, h.out-h.granted), Granted: h.granted, Amount: h.amount})
		ns.Count -= h.out
		v.GrantedCount += h.granted
		v.GrantedAmount += h.amount
		v.MaxGrant = max(v.MaxGrant, h.top)
	}
	r.mu.Unlock()
	v = viewOf(rec, v)
	if rec.State == StateFinished {
		// Settled while still in memory: the settlement's split (viewOf),
		// not one computed from live counters that no longer mean a split
		// (this overwrote it: the owner shown with Count −156, Granted 300).
		return v
	}
	if rec.State == StateRunning {
		ns.Left, _ = s.pool.Len(ctx, rec.Code)
	}
	v.Nodes = append([]NodeSplit{ns}, others...)
	return v
}

// viewOf fills v (whose granted totals are set for a rain not FINISHED) from rec.
func viewOf(rec record, v View) View {
	v.Code, v.RoomID, v.AnchorID, v.State = rec.Code, rec.Room, rec.Anchor, rec.State
	v.TotalAmount, v.TotalCount, v.DurationS = rec.Total, rec.Count, rec.DurationMS/1000
	v.StartedAt, v.EndsAt, v.FinishedAt, v.Cancelled = rec.StartedAt, rec.EndsAt, rec.FinishedAt, rec.Cancelled
	if rec.State == StateFinished {
		v.GrantedCount, v.GrantedAmount, v.MaxGrant, v.Refunded = rec.GrantedCount, rec.GrantedAmount, rec.MaxGrant, rec.Refunded
		v.Nodes = rec.Nodes
		if len(v.Nodes) == 0 {
			v.Nodes = []NodeSplit{{Node: rec.Node, Count: rec.Count, Granted: rec.GrantedCount, Amount: rec.GrantedAmount}}
		}
	}
	return v
}

// Owns reports whether code is a rain of this node not finished yet —
// whatever worker id its code carries (the node may hold another one since
// a restart).
func (s *Service) Owns(code string) bool { return s.get(code) != nil }

func (s *Service) get(code string) *rain {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.rains[code]
}

// loadRecord reads code's record from disk: FINISHED under rec/rpdone/,
// else the one in rec/rp/ (a rain not finished, or finished and not moved
// yet).
func (s *Service) loadRecord(code string) (record, error) {
	var rec record
	if !wellFormed(code) {
		return rec, errNotFound
	}
	b, err := s.store.Get(doneKey(code))
	if errors.Is(err, persist.ErrNotFound) {
		// Not moved yet: a crash right after it finished, or written by
		// an older version (restore moves it).
		b, err = s.store.Get(rainKey(code))
	}
	if errors.Is(err, persist.ErrNotFound) {
		return rec, errNotFound
	}
	if err != nil {
		return rec, err
	}
	err = proto.Unmarshal(b, &rec) // before rec is read: the order of a return's operands is not the spec's
	return rec, err
}

// Get returns the rain code (10004 if unknown).
func (s *Service) Get(code string) (View, error) {
	if r := s.get(code); r != nil {
		return s.view(r), nil
	}
	rec, err := s.loadRecord(code)
	if err != nil {
		return View{}, err
	}
	return viewOf(rec, View{}), nil
}

// Codes returns the room's RUNNING rain and its latest PREPARED one among
// the rains this node owns ("" = none). (In a cluster another node may own
// the room's running rain: Config.RoomRun names it cluster-wide.)
func (s *Service) Codes(room int64) (running, prepared string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.running[room], s.prepared[room]
}

// errTagNotHeld refuses a rain while this node does not hold its code tag.
var errTagNotHeld = proto.Errorf(proto.CodeInternal, "this node cannot make rain codes right now (its worker lease is not held), retry")

// Create makes a rain (WAIT) of total coins in count packets lasting
// duration in room, on behalf of anchor, who must be the room's anchor.
func (s *Service) Create(anchor, room, total int64, count int, duration time.Duration) (View, error) {
	if err := checkSize(total, count, s.cfg.MaxTotal, s.cfg.MaxCount); err != nil {
		return View{}, err
	}
	if duration < s.cfg.MinDuration || duration > s.cfg.MaxDuration {
		return View{}, proto.BadRequest("duration_s must be %d..%d", int64(s.cfg.MinDuration.Seconds()), int64(s.cfg.MaxDuration.Seconds()))
	}
	if a, ok, err := s.cfg.AnchorOf(room); err != nil {
		s.log.Warn("red packet create: room not read", "room", room, "err", err)
		return View{}, err // the rooms' own "retry"
	} else if !ok {
		return View{}, proto.Errorf(proto.CodeNotFound, "room not found or closed")
	} else if a != anchor {
		return View{}, errNotAnch
	}
	if s.cfg.TagHeld != nil && !s.cfg.TagHeld() {
		return View{}, errTagNotHeld
	}
	// Over max_per_anchor is refused before the cluster-wide rate is
	// counted (and checked again below, under the lock): a refused create
	// must not spend the anchor's next real one.
	s.mu.Lock()
	full := s.perAnchor[anchor] >= s.cfg.MaxPerAnchor
	s.mu.Unlock()
	if full {
		return View{}, proto.Errorf(proto.CodeConflict, "at most %d red-packet rains not finished per anchor", s.cfg.MaxPerAnchor)
	}
	if perr := s.cfg.SharedCreates.Check(uint64(anchor), s.tooManyRains, s.log); perr != nil {
		return View{}, perr
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return View{}, proto.ErrInternal
	}
	if s.perAnchor[anchor] >= s.cfg.MaxPerAnchor {
		s.mu.Unlock()
		return View{}, proto.Errorf(proto.CodeConflict, "at most %d red-packet rains not finished per anchor", s.cfg.MaxPerAnchor)
	}
	if !s.createLimit.Allow(uint64(anchor)) {
		s.mu.Unlock()
		return View{}, s.tooManyRains
	}
	s.perAnchor[anchor]++ // reserved
	s.mu.Unlock()
	code := newCode()
	if s.cfg.CodeTag >= 0 {
		code = newTaggedCode(s.cfg.CodeTag)
	}
	rec := record{Code: code, Node: s.cfg.Node, Room: room, Anchor: anchor, Total: total, Count: count,
		DurationMS: duration.Milliseconds(), State: StateWait, CreatedAt: s.cfg.Now().UnixMilli()}
	err := s.putRecord(rec)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.release(anchor)
		return View{}, err
	}
	r := &rain{rec: rec}
	s.rains[rec.Code] = r
	return viewOf(rec, View{Nodes: []NodeSplit{}}), nil
}

// release gives back an anchor's slot (s.mu held).
func (s *Service) release(anchor int64) {
	if s.perAnchor[anchor]--; s.perAnchor[anchor] <= 0 {
		delete(s.perAnchor, anchor)
	}
}

// managed returns rain code if anchor manages it (the answer to a finished
// or unknown code is fin or err).
func (s *Service) managed(anchor int64, code string) (r *rain, fin *View, err error) {
	r = s.get(code)
	if r == nil {
		rec, err := s.loadRecord(code)
		if err != nil {
			return nil, nil, err
		}
		if rec.Anchor != anchor {
			return nil, nil, errNotAnch
		}
		v := viewOf(rec, View{})
		return nil, &v, nil
	}
	r.mu.Lock()
	a := r.rec.Anchor
	r.mu.Unlock()
	if a != anchor {
		return nil, nil, errNotAnch
	}
	return r, nil, nil
}

// Prepare splits rain code and debits its anchor the total, in one durable
// ledger op (20001 when the balance is short). Preparing a rain that is
// already prepared (or further) answers its state and moves nothing.
func (s *Service) Prepare(anchor int64, code string) (View, error) {
	return s.prepare(anchor, code, true)
}

// prepare is Prepare; limited false skips the anchor's prepare rate limit
// (a cancel settling a prepare in doubt: not a new prepare).
func (s *Service) prepare(anchor int64, code string, limited bool) (View, error) {
	r, fin, err := s.managed(anchor, code)
	if fin != nil || err != nil {
		return deref(fin), err
	}
	r.mu.Lock()
	switch {
	case r.rec.State != StateWait:
		r.mu.Unlock()
		return s.view(r), nil
	case r.busy:
		r.mu.Unlock()
		return View{}, proto.Errorf(proto.CodeConflict, "a prepare of this rain is in progress")
	case r.rec.Pending == pendingCancel:
		r.mu.Unlock()
		return View{}, errCancelInDoubt
	}
	r.busy = true
	rec := r.rec
	r.mu.Unlock()
	if limited { // no lock held: a Redis round trip in a cluster
		if perr := s.allow("prepare", anchor); perr != nil {
			s.idle(r)
			return View{}, perr
		}
		if rec.Pending == "" { // a new prepare (one in doubt is settled whatever)
			if perr := s.frozen(anchor); perr != nil {
				s.idle(r)
				return View{}, perr
			}
		}
	}
	prepared := rec
	prepared.State, prepared.PreparedAt, prepared.Pending = StatePrepared, s.cfg.Now().UnixMilli(), ""
	split, err := Split(rec.Total, rec.Count, rand.New(rand.NewChaCha8(chachaSeed())))
	var b []byte
	if err == nil {
		b, err = proto.Marshal(prepared)
	}
	if err != nil {
		s.idle(r)
		return View{}, err
	}
	fresh := rec.Pending == ""
	if err := s.markPending(&rec, pendingPrepare); err != nil {
		s.idle(r)
		return View{}, err
	}
	landed := false
	if !fresh {
		// A retry of a prepare answered in doubt: if the wallet found since
		// that it ran (and wrote its split), it is adopted, never sent
		// again — its req id's idempotency record expires (a day), and
		// the op would then debit T a second time.
		landed, err = s.store.Has(splitKey(code))
	}
	var res persist.Result
	if err == nil && !landed {
		res, err = s.wallet.Apply(persist.Op{User: anchor, ReqID: prepareReqID(code, rec.PrepTry),
			Postings: []persist.Posting{{User: anchor, Delta: -rec.Total, Reason: persist.ReasonRedPacket, Ref: "redpacket " + code}},
			Static:   []persist.Record{storeRecord(rainKey(code), b), storeRecord(splitKey(code), encodeSplit(split))},
		})
	}
	if err == nil && (landed || res.Replayed) {
		// An earlier attempt landed: its record (and split) are on disk,
		// not this attempt's.
		prepared, err = s.loadRecord(code)
	}
	if err != nil {
		if errors.Is(err, persist.ErrInsufficient) {
			rec.PrepTry++ // the ledger remembers the refusal of that req id
			err = &proto.Error{Code: proto.CodeInsufficientBalance, Msg: "insufficient balance for the rain's total"}
		}
		s.opFailed(r, rec, err, fresh || proto.AsError(err).Code == proto.CodeInsufficientBalance)
		s.idle(r)
		return View{}, err
	}
	// The room's prepared rain is set in the same step that ends the
	// prepare: a start or cancel that sees the rain PREPARED and not busy
	// finds it there too (set after, it could land on a rain that the start
	// or cancel had already taken out of prepared: room info then showed a
	// finished rain).
	s.mu.Lock()
	r.mu.Lock()
	r.busy = false
	r.rec = prepared
	s.prepared[rec.Room] = code
	r.mu.Unlock()
	s.mu.Unlock()
	return s.view(r), nil
}

func deref(v *View) View {
	if v == nil {
		return View{}
	}
	return *v
}

func chachaSeed() (seed [32]byte) {
	cryptoRead(seed[:])
	return seed
}

// Start starts prepared rain code: its pool is loaded, its record becomes
// RUNNING (durably) and the room gets biz 5560. Starting a running or
// finished rain answers its state; another rain running in the room is 10409.
func (s *Service) Start(anchor int64, code string) (View, error) {
	r, fin, err := s.managed(anchor, code)
	if fin != nil || err != nil {
		return deref(fin), err
	}
	s.mu.Lock()
	r.mu.Lock()
	rec := r.rec
	var perr *proto.Error
	switch {
	case rec.State == StateRunning || rec.State == StateFinished:
		r.mu.Unlock()
		s.mu.Unlock()
		return s.view(r), nil
	case rec.State == StateWait:
		perr = proto.Errorf(proto.CodeConflict, "prepare the rain before starting it")
	case r.busy:
		perr = proto.Errorf(proto.CodeConflict, "a start of this rain is in progress")
	case rec.Pending == pendingCancel:
		perr = errCancelInDoubt
	case s.closed:
		perr = proto.ErrInternal
	case s.running[rec.Room] != "":
		perr = proto.Errorf(proto.CodeConflict, "another red-packet rain is running in this room")
	}
	if perr != nil {
		r.mu.Unlock()
		s.mu.Unlock()
		return View{}, perr
	}
	r.busy = true
	s.running[rec.Room] = code // reserved
	r.mu.Unlock()
	s.mu.Unlock()
	// The shared room check and the limit are asked with no lock held (in
	// a cluster each is a Redis round trip), and the limit only for a start
	// that would happen.
	perr = s.runInRoom(rec)
	release := false
	if perr == nil {
		if perr = s.allow("start", anchor); perr != nil {
			release = true
		}
	} else if perr != errRoomTaken {
		// Redis did not answer: the room's key may name this rain now
		// (its reply lost), which does not run — every other rain's start
		// in the room would be 10409 until the key lapsed (its end plus
		// roomKeep). Released where it still names this rain.
		release = true
	}
	if perr != nil {
		s.mu.Lock()
		r.mu.Lock()
		r.busy = false
		delete(s.running, rec.Room)
		r.mu.Unlock()
		s.mu.Unlock()
		if release {
			// Once it is no longer this node's running rain: roomDone's
			// retries stop when it is again (a later start of it), and
			// would stop at once if it still were.
			s.roomDone(rec)
		}
		return View{}, perr
	}

	now := s.cfg.Now()
	rec.State, rec.StartedAt = StateRunning, now.UnixMilli()
	rec.EndsAt = rec.StartedAt + rec.DurationMS
	err = s.loadPool(r, rec, nil)
	if err == nil {
		err = s.putRecord(rec)
	}
	s.mu.Lock()
	r.mu.Lock()
	r.busy = false
	if err != nil {
		delete(s.running, rec.Room)
		r.mu.Unlock()
		s.mu.Unlock()
		s.roomDone(rec)
		ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
		_ = s.pool.Drop(ctx, code)
		cancel()
		return View{}, err
	}
	r.rec = rec
	r.timer = time.AfterFunc(time.Duration(rec.DurationMS)*time.Millisecond, func() { s.end(r) })
	if s.prepared[rec.Room] == code {
		delete(s.prepared, rec.Room)
	}
	r.mu.Unlock()
	s.mu.Unlock()
	d, _ := proto.Marshal(StartedPush{Code: code, TotalCount: rec.Count, EndsAt: rec.EndsAt})
	if _, err := s.router.PublishRoom(rec.Room, proto.Push{Biz: proto.BizRainStarted, Room: rec.Room, Data: d, Ack: true}); err != nil {
		s.log.Warn("rain start not pushed", "code", code, "room", rec.Room, "err", err)
	}
	return s.view(r), nil
}

// Cancel ends rain code before it starts, on behalf of its anchor: a WAIT
// rain just ends; a PREPARED one gives the anchor back its total in the same
// ledger op that marks it FINISHED (the settlement op, idempotent by
// "rp-end:<code>"). A RUNNING rain ends by itself (10409); cancelling a rain
// that is already over answers its state. A WAIT rain whose prepare is in
// doubt (a debit that may still land) is settled first: the prepare is
// retried — the same request id, applied once — and the rain cancelled as
// what it then is (PREPARED: refunded; refused for the balance: WAIT); still
// in doubt, the cancel fails and changes nothing; prepared but its refund
// failed, the cancel answers 10409 (the rain is PREPARED: cancel it again).
func (s *Service) Cancel(anchor int64, code string) (View, error) {
	r, fin, err := s.managed(anchor, code)
	if fin != nil || err != nil {
		return deref(fin), err
	}
	r.mu.Lock()
	rec := r.rec
	switch {
	case r.busy:
		r.mu.Unlock()
		return View{}, proto.Errorf(proto.CodeConflict, "a prepare or start of this rain is in progress")
	case rec.Pending == pendingPrepare:
		r.mu.Unlock()
		v, err := s.prepare(anchor, code, false)
		if err != nil && proto.AsError(err).Code != proto.CodeInsufficientBalance {
			return View{}, err
		}
		out, err := s.Cancel(anchor, code) // settled: PREPARED, or WAIT after a refusal
		r.mu.Lock()
		prepared := r.rec.State == StatePrepared // not started meanwhile
		r.mu.Unlock()
		if err != nil && v.State == StatePrepared && prepared {
			// Not "nothing moved": the anchor is debited, the rain PREPARED.
			s.log.Warn("red packet prepared while its cancel settled the prepare; the cancel failed", "code", code, "err", err)
			return View{}, errPreparedWhileCancelling
		}
		return out, err
	case rec.State == StateRunning:
		r.mu.Unlock()
		return View{}, proto.Errorf(proto.CodeConflict, "a running rain cannot be cancelled: it ends at ends_at")
	case rec.State != StateWait && rec.State != StatePrepared:
		r.mu.Unlock()
		return s.view(r), nil
	}
	r.busy = true // no prepare or start meanwhile
	r.mu.Unlock()
	var out record
	if rec.State == StateWait {
		out = rec
		out.State, out.FinishedAt, out.Cancelled = StateFinished, s.cfg.Now().UnixMilli(), true
		var b []byte
		if b, err = proto.Marshal(out); err == nil {
			err = s.store.Apply(func(wb *persist.Batch) error { return moveDone(wb, code, b) })
		}
	} else {
		out, err = s.cancelPrepared(r, rec)
	}
	r.mu.Lock()
	r.busy = false
	if err != nil {
		// A refund that may still land (its op pending): completed in the
		// background, as a start does for one left by a crash — not left
		// for the anchor's next cancel or the node's next start (the
		// anchor's total debited meanwhile, the rain unstartable).
		retry := r.rec.Pending == pendingCancel && !r.cancelling
		r.cancelling = r.cancelling || retry
		r.mu.Unlock()
		if retry {
			s.retryCancel(anchor, code)
		}
		return View{}, err
	}
	r.rec = out
	r.mu.Unlock()
	s.roomDone(rec)
	s.mu.Lock()
	delete(s.rains, code)
	s.release(rec.Anchor)
	if s.prepared[rec.Room] == code {
		delete(s.prepared, rec.Room)
	}
	s.mu.Unlock()
	return viewOf(out, View{}), nil
}

var errCancelInDoubt = proto.Errorf(proto.CodeConflict, "the rain's cancel has not completed: cancel it again")

var errPreparedWhileCancelling = proto.Errorf(proto.CodeConflict,
	"the rain's prepare completed (its total debited) while the cancel settled it, and the refund did not: the rain is PREPARED; cancel it again")

// The wallet ops of a rain whose outcome may be pending (record.Pending).
const (
	pendingPrepare = "prepare"
	pendingCancel  = "cancel"
)

// idle ends r's prepare, start or cancel that changed nothing.
func (s *Service) idle(r *rain) {
	r.mu.Lock()
	r.busy = false
	r.mu.Unlock()
}

// cancelPrepared refunds a PREPARED rain's total and finishes it (Cancel;
// r is busy, and stays so: the caller ends it). The op is marked pending
// first, and stays so when its outcome may still be unknown.
func (s *Service) cancelPrepared(r *rain, rec record) (record, error) {
	fresh := rec.Pending == ""
	if err := s.markPending(&rec, pendingCancel); err != nil {
		return record{}, err
	}
	c := rec
	c.Cancelled = true
	out, err := s.settleOnce(c, nil) // nothing granted: refunds T
	if err != nil {
		s.opFailed(r, rec, err, fresh)
	}
	return out, err
}

// markPending records durably, before a wallet op of kind is sent for rec's
// rain, that its outcome is pending (rec.Pending; a retry of that same op
// finds it there already).
func (s *Service) markPending(rec *record, kind string) error {
	if rec.Pending == kind {
		return nil
	}
	rec.Pending = kind
	err := s.putRecord(*rec)
	if err != nil {
		rec.Pending = ""
	}
	return err
}

// opFailed sets r.rec to rec after its prepare or cancel op failed with
// err (r stays busy: the caller ends it). The op stays pending (rec.Pending,
// on disk already) when it may still land: err is in doubt, or this attempt
// was a retry (settled false) — a retry that moved nothing says nothing of
// the first attempt, which the shared wallet may still land. Otherwise the
// mark is cleared on disk (with the rest of rec: a raised PrepTry too).
func (s *Service) opFailed(r *rain, rec record, err error, settled bool) {
	if settled && !inDoubt(err) {
		rec.Pending = ""
		if merr := s.putRecord(rec); merr != nil {
			// Still pending on disk: a restart asks for the op's retry,
			// which the ledger answers as it did (nothing moved).
			s.log.Error("red packet record not written", "code", rec.Code, "err", merr)
		}
	}
	r.mu.Lock()
	r.rec = rec
	r.mu.Unlock()
}

// putRecord durably writes rec, a rain not FINISHED (rec/rp/).
func (s *Service) putRecord(rec record) error {
	b, err := proto.Marshal(rec)
	if err == nil {
		err = s.store.Put(rainKey(rec.Code), b)
	}
	return err
}

// inDoubt reports whether a wallet op that failed with err may still land:
// every failure but those that moved nothing ("unavailable", a closed
// ledger, an op never sent) and refusals (the balance, its upper bound, a
// protocol error such as a frozen account).
func inDoubt(err error) bool {
	var pe *proto.Error
	return !errors.Is(err, persist.ErrWalletUnavailable) && !errors.Is(err, persist.ErrInsufficient) &&
		!errors.Is(err, persist.ErrBalanceLimit) &&
		!errors.Is(err, persist.ErrClosed) && !errors.Is(err, errNotSent) && !errors.As(err, &pe)
}

// refusedOutright reports whether a wallet op that failed with err was
// refused as a new request: the balance, its upper bound, a rule of its
// Check (a frozen account) — not a failure that says "retry" (a proto error
// of code 50000, 10409 or 10429: a status that could not be read, a rate).
func refusedOutright(err error) bool {
	if errors.Is(err, persist.ErrInsufficient) || errors.Is(err, persist.ErrBalanceLimit) {
		return true
	}
	var pe *proto.Error
	return errors.As(err, &pe) && pe.Code != proto.CodeInternal && pe.Code != proto.CodeConflict && pe.Code != proto.CodeRateLimited
}

// frozen refuses (20004) a frozen user's prepare or grab (Config.Frozen);
// a status that cannot be read is an internal error (nothing moved).
func (s *Service) frozen(user int64) *proto.Error {
	err := account.Refuse(s.cfg.Frozen, user, "no coins move to or from it")
	if err == nil {
		return nil
	}
	var pe *proto.Error
	if errors.As(err, &pe) {
		return pe
	}
	s.log.Warn("red packet: account status not read", "user", user, "err", err)
	return proto.ErrInternal
}

// errNotSent wraps a failure before a wallet op was sent.
var errNotSent = errors.New("redpacket: op not sent")

// roomRefusal is nil when user is in room, else why the grab is refused:
// 10003, or 50000 "retry" when the room's members could not be read.
func (s *Service) roomRefusal(room, user int64) *proto.Error {
	in, err := s.cfg.InRoom(room, user)
	switch {
	case err != nil:
		// Debug: one line per grab while Redis is out would flood the
		// log (the router reports Redis's failures).
		s.log.Debug("red packet grab: room members not read", "room", room, "user", user, "err", err)
		return errInRmUnknown
	case !in:
		return errNotInRm
	}
	return nil
}

// runInRoom makes rec the running rain of its room where every node sees
// it (Config.RoomRun; nothing on a single node, where s.running is enough).
func (s *Service) runInRoom(rec record) *proto.Error {
	if s.cfg.RoomRun == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
	defer cancel()
	err := s.roomRun(ctx, rec)
	switch {
	case errors.Is(err, errRoomTaken):
		return errRoomTaken
	case err != nil:
		s.log.Error("red packet room check", "code", rec.Code, "err", err)
		return proto.ErrInternal
	}
	return nil
}

var errRoomTaken = proto.Errorf(proto.CodeConflict, "another red-packet rain is running in this room")

// roomRun is Config.RoomRun for rec, until 10 minutes after its end — or
// after now, for a rain still running past its end (its settlement waits
// for a holder): the room stays its own until it is FINISHED (errRoomTaken:
// another rain holds the room).
func (s *Service) roomRun(ctx context.Context, rec record) error {
	now := s.cfg.Now().UnixMilli()
	end := rec.EndsAt
	if end == 0 { // being started
		end = now + rec.DurationMS
	}
	ok, err := s.cfg.RoomRun(ctx, rec.Room, rec.Code, max(end, now)+int64(roomKeep/time.Millisecond))
	if err == nil && !ok {
		return errRoomTaken
	}
	return err
}

// roomKeep is how long a running rain's room claim outlives its end (or its
// last renewal, past the end).
const roomKeep = 10 * time.Minute

// roomRenew is how often the owner of a running rain writes it again as its
// room's running rain (roomRun): a Redis that lost the key (restarted empty,
// rolled back) has it again within about this, so another node can start a
// second rain in the room only within that window.
const roomRenew = time.Second

// keepRooms renews the room of every running rain of this node every
// roomRenew until Close (which cancels a renewal in progress). Failures are
// logged when they start and when they stop, a room held by another rain
// once per rain.
func (s *Service) keepRooms() {
	defer close(s.keepDone)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-s.keepStop; cancel() }()
	t := time.NewTicker(roomRenew)
	defer t.Stop()
	failing, taken := false, map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var recs []record
		s.mu.RLock()
		for _, code := range s.running {
			if r := s.rains[code]; r != nil {
				r.mu.Lock()
				if r.rec.State == StateRunning {
					recs = append(recs, r.rec)
				}
				r.mu.Unlock()
			}
		}
		s.mu.RUnlock()
		failed := false
		for _, rec := range recs {
			rctx, rcancel := context.WithTimeout(ctx, poolTimeout)
			err := s.roomRun(rctx, rec)
			rcancel()
			if ctx.Err() != nil {
				return
			}
			if r := s.get(rec.Code); r == nil || !r.running() {
				// Finished since the snapshot: its roomDone may have run
				// before this renewal, which must not outlive it (nor one
				// whose outcome is unknown).
				s.roomDone(rec)
				continue
			}
			switch {
			case errors.Is(err, errRoomTaken):
				if !taken[rec.Code] {
					taken[rec.Code] = true
					// The key was lost and another rain started in the room
					// meanwhile: both run to their end; nothing is undone.
					s.log.Error("red packet room held by another rain (its key was lost)", "code", rec.Code, "room", rec.Room)
				}
			case err != nil:
				failed = true
				if !failing {
					s.log.Error("red packet room renewal failing", "code", rec.Code, "err", err)
				}
			}
		}
		if failing && !failed {
			s.log.Info("red packet room renewal back")
		}
		failing = failed
		for code := range taken {
			if r := s.get(code); r == nil || !r.running() {
				delete(taken, code)
			}
		}
	}
}

// running reports whether r is RUNNING.
func (r *rain) running() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rec.State == StateRunning
}

// roomDone ends rec's claim on its room (runInRoom), where rec still holds
// it. A release Redis did not answer is retried in the background
// (releaseRetry apart, backing off to releaseRetryMax) until it is answered, the
// rain holds its room again on this node (a start retried), the key has
// lapsed by itself (roomKeep past the rain's end), or Close: only logged,
// the room stayed closed to every other rain until then (10409).
func (s *Service) roomDone(rec record) {
	if s.cfg.RoomDone == nil {
		return
	}
	err := s.roomDoneOnce(rec)
	if err == nil {
		return
	}
	s.log.Warn("red packet room release, retrying", "code", rec.Code, "err", err)
	end := rec.EndsAt
	if end == 0 { // a start that failed: the key was asked until now + duration
		end = s.cfg.Now().UnixMilli() + rec.DurationMS
	}
	lapse := time.UnixMilli(max(end, s.cfg.Now().UnixMilli()) + roomKeep.Milliseconds())
	s.spawn(func() {
		t := time.NewTimer(releaseRetry)
		defer t.Stop()
		for wait := releaseRetry; ; wait = min(2*wait, releaseRetryMax) {
			select {
			case <-s.quit:
				return
			case <-t.C:
			}
			s.mu.RLock()
			again := s.running[rec.Room] == rec.Code
			s.mu.RUnlock()
			if again || s.cfg.Now().After(lapse) {
				return
			}
			if err := s.roomDoneOnce(rec); err == nil {
				s.log.Info("red packet room released", "code", rec.Code)
				return
			}
			t.Reset(wait)
		}
	})
}

// roomDoneOnce is one Config.RoomDone call for rec.
func (s *Service) roomDoneOnce(rec record) error {
	ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
	defer cancel()
	return s.cfg.RoomDone(ctx, rec.Room, rec.Code)
}

// loadPool loads rec's split minus the granted indexes (and, sharded, minus
// those out with other nodes) into the pool.
func (s *Service) loadPool(r *rain, rec record, granted map[int32]bool) error {
	b, err := s.store.Get(splitKey(rec.Code))
	if err != nil {
		return err
	}
	split, err := decodeSplit(b, rec.Count)
	if err != nil {
		return err
	}
	left := make([]Packet, 0, len(split)-len(granted))
	r.taken, r.ntaken = make([]atomic.Uint64, (len(split)+63)/64), int32(len(split))
	for i := range granted {
		r.take(i)
	}
	for i, a := range split {
		if !granted[int32(i)] && (r.where == nil || r.where[i] == 0) {
			left = append(left, Packet{Index: int32(i), Amount: a})
		}
	}
	if s.mem != nil {
		r.split = split
		if r.where == nil {
			r.where = make([]uint16, len(split))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
	defer cancel()
	return s.pool.Load(ctx, rec.Code, left)
}

// take marks packet i of r as taken to grant; false if it was already (or
// is not an index of the rain).
func (r *rain) take(i int32) bool {
	if r.taken == nil {
		return true
	}
	if i < 0 || i >= r.ntaken {
		return false
	}
	bit := uint64(1) << (i % 64)
	return r.taken[i/64].Or(bit)&bit == 0
}

// untake clears i's mark: the packet goes back to the pool ungranted.
func (r *rain) untake(i int32) {
	if r.taken != nil && i >= 0 && i < r.ntaken {
		r.taken[i/64].And(^(uint64(1) << (i % 64)))
	}
}
