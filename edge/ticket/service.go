package ticket

import (
	"encoding/binary"
	"errors"
	"github.com/liveedge/liveedge/edge/account"
	"github.com/liveedge/liveedge/edge/keylock"
	"github.com/liveedge/liveedge/edge/limit"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// Config configures Service. Zero values take the defaults named.
type Config struct {
	PayTimeout  time.Duration // unpaid orders close after this (0 = DefaultPayTimeout)
	MaxPrograms int           // programs kept (0 = DefaultMaxPrograms); one more → 10001
	MaxSeats    int           // seats of one program (0 = DefaultMaxSeats); more → 10001
	SweepEvery  time.Duration // how often expired orders are looked for (0 = min(PayTimeout/4, 1 s))
	// AskBudget bounds one sweep's asking the provider to close its due
	// orders before it closes them (0 = DefaultAskBudget): past it, the
	// sweep's other due orders close without asking, their pay orders
	// closed at the provider by the pay centre's reconciler after the close
	// (rec/payunasked). A slow provider that still answers would hold every
	// due order's seats for orders/closeWorkers × its latency (10,000 at
	// 2 s: 21 min).
	AskBudget time.Duration
	// OrdersPerMinute bounds the orders a user places (on this node; a
	// replay of a req_id is free): more → 10429 (0 = no bound). Cancelled
	// orders free their seats (per_user_max), not their records.
	OrdersPerMinute int
	// SharedPlaces, if set, counts OrdersPerMinute on every node of a
	// cluster as well (limit.Shared: a user's orders may go through any
	// node).
	SharedPlaces *limit.Shared
	Now          func() time.Time
	Log          *slog.Logger
	// NextProgramID, if set, allocates the program id after last, the
	// highest this node has (a cluster: ids that carry the node's worker id,
	// unique across nodes); nil = last + 1.
	NextProgramID func(last int64) (int64, error)
	// Coupons keeps the coupons (nil = this node's Pebble, PebbleCoupons; a
	// cluster: SharedCoupons in Redis, usable through every node).
	Coupons CouponStore
	// ReqBinding, in a cluster, makes a (user, req_id) name one program on
	// every node (nil: a single node, whose disk sees every order).
	ReqBinding ReqBinding
	// Frozen tells whether a user's account is frozen (edge/account): a
	// frozen user places no order (20004; a replay of a req_id still
	// answers its order). nil = none is.
	Frozen func(user int64) (bool, error)

	// Hook, in tests only (nil in production), is called at the saga's
	// named points: "fail:<step>" before a step (an error fails the step)
	// and "crash:<point>" between steps (a crash test kills the process
	// there). See saga.go for the names.
	Hook func(point string) error
}

// Defaults of Config.
const (
	DefaultPayTimeout  = 15 * time.Minute
	DefaultMaxPrograms = 1000
	DefaultMaxSeats    = 20000
	// DefaultAskBudget: seconds next to the pay timeout's minutes, and at
	// a provider's usual 50-200 ms an answer, hundreds of due orders asked
	// (closeWorkers at a time) — all of an ordinary sweep's.
	DefaultAskBudget = 3 * time.Second
)

// Payments is what the ticket service needs from the pay centre
// (*pay.Service): gene-method order ids and provider payments of its
// orders, whose paid events come back through Service.Paid.
type Payments interface {
	NewOrderID(user int64) (int64, error)
	OrderIDsAbove(id int64)
	CreateBizOrder(r pay.BizOrderReq, extra ...persist.Record) (pay.Order, error)
	CloseBizOrder(id int64, why string) error
	CloseBizOrderAtProvider(id int64, why string) error
	AskBeforeClose(id int64) (closable, answered bool)
	Get(id int64) (pay.Order, error)
}

var _ Payments = (*pay.Service)(nil)

// Service sells tickets. See doc.go for what it owns and its promises.
type Service struct {
	cfg    Config
	store  *persist.Store
	wallet persist.Wallet
	pay    Payments
	router router.Router
	inv    Inventory

	createMu sync.Mutex         // serialises program creation (held across its write; progMu never is)
	progMu   sync.RWMutex       // guards programs and lastProg
	programs map[int64]*program // bounded by MaxPrograms
	lastProg int64

	guards [guardShards]guardShard // the repeat guard, sharded by user

	orders keylock.Map[int64] // one lock per order id: every transition of an order under it
	cstore CouponStore

	pendMu  sync.Mutex
	pending map[int64]int64 // PENDING_PAY order → expires at (unix ms); bounded by seats
	stuck   map[int64]bool  // PLACING orders whose saga stopped on a storage error: resumed by the sweep
	doubt   map[int64]doubt // stuck orders whose debit the wallet could neither confirm nor deny
	owed    map[int64]bool  // closed orders still holding their coupon (a give-back failed): retried by the sweep

	m          *metrics
	placeLimit *limit.Keyed // OrdersPerMinute per user (nil = off)
	tooMany    *proto.Error // its refusal (10429)

	stop chan struct{}
	wg   sync.WaitGroup
}

// program is a program's definition and its buyers' held seats.
type program struct {
	def    ProgramDef
	prices map[int]int64

	mu   sync.Mutex
	held map[int64]int // user → seats locked or sold by their orders (bounded by the seats)
}

// guardShards is the number of repeat-guard shards (by user): orders of
// different users rarely share a guard lock.
const guardShards = 64

// guardShard holds the orders being placed by its users.
type guardShard struct {
	mu      sync.Mutex
	placing map[userProgram]struct{} // (user, program) with an order being placed
	reqs    map[userReq]struct{}     // (user, req_id) being placed
}

type userProgram struct{ user, program int64 }
type userReq struct {
	user int64
	req  string
}

var (
	prefixProgram  = recPrefix("tprog/")
	prefixOrder    = recPrefix("torder/")
	prefixOrderReq = recPrefix("torderreq/")
	prefixCoupon   = recPrefix("tcoupon/")
)

func recPrefix(s string) []byte { return append(append([]byte{}, persist.PrefixRec...), s...) }

func programKey(id int64) []byte { return persist.Key(prefixProgram, uint64(id)) }
func orderKey(id int64) []byte   { return persist.Key(prefixOrder, uint64(id)) }
func orderReqKey(user int64, req string) []byte {
	k := make([]byte, 0, len(prefixOrderReq)+8+len(req)) // one allocation: built twice per order
	k = append(k, prefixOrderReq...)
	k = binary.BigEndian.AppendUint64(k, uint64(user))
	return append(k, req...)
}
func couponKey(id string) []byte { return append(append([]byte{}, prefixCoupon...), id...) }

// New builds the service from what store holds: programs, seats (from the
// orders), timeouts; every saga a crash interrupted is completed or
// compensated before New returns (see saga.go: recover).
func New(store *persist.Store, w persist.Wallet, p Payments, r router.Router, cfg Config) (*Service, error) {
	if cfg.PayTimeout <= 0 {
		cfg.PayTimeout = DefaultPayTimeout
	}
	if cfg.MaxPrograms <= 0 {
		cfg.MaxPrograms = DefaultMaxPrograms
	}
	if cfg.MaxSeats <= 0 {
		cfg.MaxSeats = DefaultMaxSeats
	}
	if cfg.SweepEvery <= 0 {
		cfg.SweepEvery = min(cfg.PayTimeout/4, time.Second)
	}
	if cfg.AskBudget <= 0 {
		cfg.AskBudget = DefaultAskBudget
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &Service{cfg: cfg, store: store, wallet: w, pay: p, router: r, inv: newMemInventory(),
		programs: map[int64]*program{},
		pending:  map[int64]int64{}, stuck: map[int64]bool{}, doubt: map[int64]doubt{}, owed: map[int64]bool{}, m: newMetrics(), stop: make(chan struct{})}
	s.placeLimit = limit.New(cfg.OrdersPerMinute, time.Minute, max(1, cfg.OrdersPerMinute), cfg.Now)
	s.tooMany = proto.Errorf(proto.CodeRateLimited, "too many ticket orders placed, at most %d per minute", cfg.OrdersPerMinute)
	s.cstore = cfg.Coupons
	if s.cstore == nil {
		s.cstore = NewPebbleCoupons(store)
	}
	if err := s.load(); err != nil {
		return nil, err
	}
	s.wg.Add(1)
	go s.loop()
	return s, nil
}

// Close stops the timeout sweep.
func (s *Service) Close() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
}

// load rebuilds programs and seats from Pebble and settles interrupted sagas.
func (s *Service) load() error {
	err := s.store.Scan(prefixProgram, func(_, v []byte) error {
		var d ProgramDef
		if err := proto.Unmarshal(v, &d); err != nil {
			return err
		}
		s.addProgram(d)
		return s.inv.Add(d)
	})
	if err != nil {
		return err
	}
	var interrupted []*Order
	var last int64
	err = s.store.Scan(prefixOrder, func(_, v []byte) error {
		o, err := decodeOrder(v)
		if err != nil {
			return err
		}
		last = max(last, o.id)
		var st uint8
		switch o.Status {
		case StatusPendingPay:
			st = SeatLocked
			s.pending[o.id] = o.ExpiresAt
		case StatusPlacing:
			st = SeatLocked
			interrupted = append(interrupted, o)
		case StatusPaid:
			st = SeatSold
		default:
			if o.Steps.CouponUsed && !o.Steps.CouponBack {
				s.owe(o.id) // closed, its coupon's give-back interrupted
			}
			return nil
		}
		if err := s.inv.Restore(o.ProgramID, o.id, o.seats, st); err != nil {
			return err
		}
		if p := s.program(o.ProgramID); p != nil {
			p.held[o.UserID] += len(o.seats)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// No order id is made again, whatever the clock did since (an order
	// paid with coins has no pay order to keep its id).
	s.pay.OrderIDsAbove(last)
	for i, o := range interrupted {
		if err := s.recoverSaga(o.id); err != nil {
			// The store, the wallet or the coupon store is failing: the
			// rest would each wait as long (a coupon store that hangs: its
			// timeout per order, minutes before the node serves) — this
			// one and the rest are left to the sweep, which stops at the
			// first failure too.
			s.cfg.Log.Error("ticket: interrupted saga not settled: it and the rest left to the sweep", "order", o.OrderID,
				"left", len(interrupted)-i, "err", err)
			for _, rest := range interrupted[i:] {
				s.markStuck(rest.id)
			}
			break
		}
	}
	s.settleOwed()
	return nil
}

func decodeOrder(v []byte) (*Order, error) {
	o := &Order{}
	if err := proto.Unmarshal(v, o); err != nil {
		return nil, err
	}
	id, err := strconv.ParseInt(o.OrderID, 10, 64)
	if err != nil {
		return nil, err
	}
	o.id = id
	for _, sid := range o.SeatIDs {
		seat, ok := ParseSeat(sid)
		if !ok {
			return nil, errors.New("ticket: bad seat id in a stored order")
		}
		o.seats = append(o.seats, seat)
	}
	return o, nil
}

// PlaceReq is the body of POST /tickets/orders.
type PlaceReq struct {
	ProgramID  int64    `json:"program_id"`
	SeatIDs    []string `json:"seat_ids"`
	CategoryID int      `json:"category_id"`
	Count      int      `json:"count"`
	ReqID      string   `json:"req_id"`
	Pay        string   `json:"pay"`
	CouponID   string   `json:"coupon_id"`
}

// Place places an order for user: all-or-nothing seats, limits, the
// repeat guard, idempotent by (user, req_id). A mock order answers
// PENDING_PAY with its pay_url; a coins order runs the saga and answers
// PAID or the failed step's error with every earlier step undone.
func (s *Service) Place(user int64, r PlaceReq) (o Order, err error) {
	defer func() { s.m.orders.WithLabelValues(outcome(o, err)).Inc() }()
	return s.place(user, r)
}

func (s *Service) place(user int64, r PlaceReq) (_ Order, err error) {
	if !ValidReqID(r.ReqID) {
		return Order{}, proto.BadRequest("req_id must be 1..%d bytes", maxReqIDLen)
	}
	if r.Pay == "" {
		r.Pay = PayMock
	}
	if r.Pay != PayMock && r.Pay != PayCoins {
		return Order{}, proto.BadRequest(`pay must be "mock" or "coins"`)
	}
	if len(r.CouponID) > 40 {
		return Order{}, proto.Errorf(proto.CodeCouponUnusable, "coupon not usable")
	}
	if r.ProgramID <= 0 {
		return Order{}, proto.BadRequest("program_id is required")
	}
	p := s.program(r.ProgramID)
	if p == nil {
		return Order{}, proto.Errorf(proto.CodeNotFound, "program not found")
	}
	var want Want
	switch {
	case len(r.SeatIDs) > 0:
		if r.CategoryID != 0 || r.Count != 0 {
			return Order{}, proto.BadRequest("give seat_ids or category_id and count, not both")
		}
		if len(r.SeatIDs) > p.def.PerOrderMax {
			return Order{}, proto.Errorf(proto.CodeTicketLimit, "at most %d tickets per order", p.def.PerOrderMax)
		}
		seen := map[Seat]bool{}
		for _, id := range r.SeatIDs {
			seat, ok := ParseSeat(id)
			if !ok {
				return Order{}, proto.BadRequest("bad seat id (want \"<category>-<row>-<col>\")")
			}
			if seen[seat] {
				return Order{}, proto.BadRequest("seat %s given twice", seat)
			}
			seen[seat] = true
			want.Seats = append(want.Seats, seat)
		}
	case r.CategoryID > 0 && r.Count > 0:
		if r.Count > p.def.PerOrderMax {
			return Order{}, proto.Errorf(proto.CodeTicketLimit, "at most %d tickets per order", p.def.PerOrderMax)
		}
		if _, ok := p.prices[r.CategoryID]; !ok {
			return Order{}, proto.BadRequest("no category %d in this program", r.CategoryID)
		}
		want.Category, want.Count = r.CategoryID, r.Count
	default:
		return Order{}, proto.BadRequest("give seat_ids, or category_id > 0 and count > 0")
	}
	n := max(len(want.Seats), want.Count)

	leave, err := s.enter(user, r.ProgramID, r.ReqID)
	if err != nil {
		return Order{}, err
	}
	defer leave()
	if v, err := s.store.Get(orderReqKey(user, r.ReqID)); err == nil {
		return s.replay(int64(persist.DecodeUint64(v)))
	} else if !errors.Is(err, persist.ErrNotFound) {
		return Order{}, err
	}
	if err := account.Refuse(s.cfg.Frozen, user, "no orders can be placed"); err != nil {
		return Order{}, err
	}
	spent, perr := limit.Take(s.placeLimit, s.cfg.SharedPlaces, uint64(user), s.tooMany, s.cfg.Log)
	if perr != nil {
		return Order{}, perr
	}
	defer func() {
		// An attempt a dependency stopped before it recorded an order
		// (the worker lease, the coupon store, the disk) spends none of
		// the node's count (protocol.md); refusals — seats taken, limits,
		// a coupon not usable — do.
		// (A req_id bound to another program is a replay's answer: free.)
		if err != nil && (proto.AsError(err).Code == proto.CodeInternal || err == errReqOfAnotherProgram) {
			if _, gerr := s.store.Get(orderReqKey(user, r.ReqID)); errors.Is(gerr, persist.ErrNotFound) {
				spent.GiveBack()
			}
		}
	}()
	// The guard makes this check-then-reserve safe: no other order of this
	// user for this program is being placed.
	p.mu.Lock()
	held := p.held[user]
	p.mu.Unlock()
	if held+n > p.def.PerUserMax {
		return Order{}, proto.Errorf(proto.CodeTicketLimit, "at most %d tickets per user for this program (you hold %d)", p.def.PerUserMax, held)
	}
	if b := s.cfg.ReqBinding; b != nil {
		// Bound before anything is written (an order never exists without
		// its binding), let go when nothing was — under the guard, so no
		// other request of this req_id runs here meanwhile.
		bound, berr := b.Bind(user, r.ReqID, r.ProgramID)
		if berr != nil {
			// Its reply may be lost after the binding was made: let it go
			// (nothing was written; only a binding to this program goes).
			b.Unbind(user, r.ReqID, r.ProgramID)
			return Order{}, berr
		}
		if bound != r.ProgramID {
			return Order{}, errReqOfAnotherProgram
		}
		defer func() {
			if has, herr := s.store.Has(orderReqKey(user, r.ReqID)); herr == nil && !has {
				b.Unbind(user, r.ReqID, r.ProgramID)
			}
		}()
	}
	id, err := s.pay.NewOrderID(user)
	if err != nil {
		return Order{}, err
	}
	seats, err := s.inv.Reserve(r.ProgramID, id, want)
	if err != nil {
		return Order{}, err
	}
	s.addHeld(p, user, len(seats))
	now := s.cfg.Now().UnixMilli()
	o := &Order{OrderID: strconv.FormatInt(id, 10), UserID: user, ProgramID: r.ProgramID, Pay: r.Pay,
		CouponID: r.CouponID, ReqID: r.ReqID, CreatedAt: now, UpdatedAt: now, id: id, seats: seats}
	for _, seat := range seats {
		o.SeatIDs = append(o.SeatIDs, seat.String())
		o.Total += p.prices[seat.Cat]
	}
	o.Amount = o.Total
	if o.CouponID != "" && o.Total == 0 {
		// A coupon is one use taken off the order's amount: an order that
		// costs nothing would use it up for nothing (before, it held it
		// with a discount of 0, never given back). Refused before anything
		// is written, like a coupon not the buyer's; the seats go back.
		s.release(o)
		return Order{}, errCouponOnFreeOrder
	}
	if r.Pay == PayCoins {
		return s.placeCoins(o)
	}
	return s.placeMock(o)
}

// enter is the repeat-submit guard: one order being placed per (user,
// program) and per (user, req_id); another → 10409 until leave.
func (s *Service) enter(user, programID int64, req string) (leave func(), err error) {
	up, ur := userProgram{user, programID}, userReq{user, req}
	g := &s.guards[uint64(user)%guardShards]
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.placing == nil {
		g.placing, g.reqs = map[userProgram]struct{}{}, map[userReq]struct{}{}
	}
	if _, busy := g.placing[up]; busy {
		return nil, proto.Errorf(proto.CodeConflict, "an order for this program is already being placed")
	}
	if _, busy := g.reqs[ur]; busy {
		return nil, proto.Errorf(proto.CodeConflict, "an order with this req_id is already being placed")
	}
	g.placing[up], g.reqs[ur] = struct{}{}, struct{}{}
	return func() {
		g.mu.Lock()
		delete(g.placing, up)
		delete(g.reqs, ur)
		g.mu.Unlock()
	}, nil
}

func (s *Service) addHeld(p *program, user int64, n int) {
	if n == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held[user] += n; p.held[user] <= 0 {
		delete(p.held, user)
	}
}

// release frees o's seats in memory (exactly once: only seats still locked
// by o are freed) and gives them back to the buyer's per-user count.
func (s *Service) release(o *Order) {
	n := s.inv.Release(o.ProgramID, o.id, o.seats)
	if p := s.program(o.ProgramID); p != nil {
		s.addHeld(p, o.UserID, -n)
	}
}

// replay answers a repeated req_id with the first order: a saga that failed
// answers its failure again.
func (s *Service) replay(id int64) (Order, error) {
	o, err := s.load1(id)
	if err != nil {
		return Order{}, err
	}
	if o.Saga == SagaCompensated && o.FailCode != 0 {
		return Order{}, finalFailure(o.FailCode, o.FailMsg)
	}
	return s.withPayURL(*o), nil
}

// ReqBinding binds each (user, req_id) of a ticket order to the program it
// was placed for across the nodes of a cluster: each node's idempotency
// record knows its own orders only, and the same req_id sent for programs
// of two nodes made two orders (and charged twice).
type ReqBinding interface {
	// Bind binds req to program unless it names another already, and
	// returns the program it names (a binding to program from an earlier
	// attempt is taken as is).
	Bind(user int64, req string, program int64) (int64, error)
	// Unbind lets the binding go if it names program: its request was
	// refused before any order of it was written.
	Unbind(user int64, req string, program int64)
}

// ValidReqID reports whether req is a req_id Place takes.
func ValidReqID(req string) bool { return req != "" && len(req) <= maxReqIDLen }

// errReqOfAnotherProgram answers a req_id a cluster bound to another
// program, where no order of it is (PlacedFor).
var errReqOfAnotherProgram = proto.Errorf(proto.CodeConflict,
	"this req_id names an order of another program (being placed, or refused before it was made): retry it for that program, or use a new req_id")

// PlacedFor answers user's order of req_id made here — the first result of
// a (user, req_id) sent again for another program (PROTOCOL §5: a cluster
// binds each req_id to the program it was first sent for, whose node holds
// the order) — or 10409 when none was made here (being placed, or refused
// before it was made).
func (s *Service) PlacedFor(user int64, req string) (Order, error) {
	v, err := s.store.Get(orderReqKey(user, req))
	if errors.Is(err, persist.ErrNotFound) {
		return Order{}, errReqOfAnotherProgram
	}
	if err != nil {
		return Order{}, err
	}
	return s.replay(int64(persist.DecodeUint64(v)))
}

// ReqsOnDisk calls fn with the (user, req_id, program, creation time in unix
// ms) of every order in store made since (the cluster's req_id bindings,
// put back in Redis after it lost them).
func ReqsOnDisk(store *persist.Store, since time.Time, fn func(user int64, req string, program, at int64) error) error {
	from := since.UnixMilli()
	return store.Scan(prefixOrder, func(_, v []byte) error {
		o, err := decodeOrder(v)
		if err != nil {
			return err
		}
		if o.ReqID == "" || o.CreatedAt < from {
			return nil
		}
		return fn(o.UserID, o.ReqID, o.ProgramID, o.CreatedAt)
	})
}

func (s *Service) withPayURL(o Order) Order {
	if o.Status == StatusPendingPay && o.PayURL == "" {
		if po, err := s.pay.Get(o.id); err == nil {
			o.PayURL = po.PayURL
		}
	}
	return o
}

// Has reports whether ticket order id was made here (it is on this node's
// disk).
func (s *Service) Has(id int64) bool {
	has, _ := s.store.Has(orderKey(id))
	return has
}

// HasProgram reports whether program id is served here (made on this node).
func (s *Service) HasProgram(id int64) bool { return s.program(id) != nil }

// load1 reads order id from Pebble.
func (s *Service) load1(id int64) (*Order, error) {
	v, err := s.store.Get(orderKey(id))
	if errors.Is(err, persist.ErrNotFound) {
		return nil, proto.Errorf(proto.CodeNotFound, "order not found")
	}
	if err != nil {
		return nil, err
	}
	return decodeOrder(v)
}

func (o *Order) record() persist.Record {
	v, _ := proto.Marshal(o)
	return persist.Record{Key: orderKey(o.id), Value: v}
}

// Get returns order id if user bought it (anyone else: 10004).
func (s *Service) Get(user, id int64) (Order, error) {
	o, err := s.load1(id)
	if err != nil {
		return Order{}, err
	}
	if o.UserID != user {
		return Order{}, proto.Errorf(proto.CodeNotFound, "order not found")
	}
	return s.withPayURL(*o), nil
}

// placeMock records a PENDING_PAY order and its pay order in one durable
// batch, then answers with the pay_url; an order with a coupon goes through
// placeMockCoupon first.
func (s *Service) placeMock(o *Order) (Order, error) {
	if o.CouponID != "" {
		return s.placeMockCoupon(o)
	}
	res, err := s.commitMock(o, nil)
	if err != nil {
		s.release(o)
	}
	return res, err
}

// placeMockCoupon places a provider order with a coupon. The coupon is
// checked first (an unusable one refuses the order with nothing written);
// then the order is recorded PLACING (with its req_id), the coupon taken
// for it and, in the commit of that use, the order written PENDING_PAY (or
// PAID, when the coupon covers it) with its pay order — one batch with the
// coupon's record on a single node. A failure after the PLACING record
// compensates (the coupon given back if the store says the order holds it,
// the seats released), as a crash does at start-up: the PLACING record is
// what tells a restarted node that a coupon may be held for this order.
func (s *Service) placeMockCoupon(o *Order) (Order, error) {
	defer s.orders.Lock(o.id)()
	if c, err := s.cstore.Get(o.CouponID); err != nil || c.UserID != o.UserID || c.UsedBy != "" {
		s.release(o)
		if err == nil || proto.AsError(err).Code == proto.CodeCouponUnusable {
			err = errCouponUnusable
		}
		return Order{}, err
	}
	o.Status, o.Saga = StatusPlacing, SagaRunning
	recs := []persist.Record{{Key: orderReqKey(o.UserID, o.ReqID), Value: persist.EncodeUint64(uint64(o.id))}, o.record()}
	if err := s.store.Apply(func(b *persist.Batch) error { return setAll(b, recs) }); err != nil {
		s.release(o)
		return Order{}, err
	}
	var res Order
	err := s.cstore.Use(o.CouponID, o.UserID, o.OrderID, func(c Coupon, recs []persist.Record) error {
		_ = s.hook("crash:coupon_unrecorded")
		if err := s.hook("fail:coupon_write"); err != nil {
			return err
		}
		next := *o
		next.Saga = ""
		next.Steps.CouponUsed = true
		next.Discount = min(c.Amount, o.Total)
		next.Amount = o.Total - next.Discount
		r, err := s.commitMock(&next, recs)
		if err != nil {
			return err
		}
		*o, res = next, r
		return nil
	})
	if err != nil {
		return s.compensate(o, err)
	}
	return res, nil
}

// commitMock writes o as PENDING_PAY with its req_id, extra and its pay
// order in one durable batch (PAID with no pay order when there is nothing
// to pay) and serves it. On an error o's seats are still locked in memory.
func (s *Service) commitMock(o *Order, extra []persist.Record) (Order, error) {
	now := s.cfg.Now().UnixMilli()
	o.UpdatedAt = now
	recs := append([]persist.Record{{Key: orderReqKey(o.UserID, o.ReqID), Value: persist.EncodeUint64(uint64(o.id))}}, extra...)
	if o.Amount == 0 {
		// Nothing to pay (a coupon covers it): sold at once.
		o.Status = StatusPaid
		recs = append(recs, o.record())
		if err := s.store.Apply(func(b *persist.Batch) error { return setAll(b, recs) }); err != nil {
			return Order{}, err
		}
		s.inv.Sell(o.ProgramID, o.id, o.seats)
		s.push(o)
		return *o, nil
	}
	// The order's amount is coins; its pay order's is cents, what the
	// provider charges (before, the coins were asked as cents: a tenth of
	// the price).
	o.Status, o.ExpiresAt, o.PayAmount = StatusPendingPay, now+s.cfg.PayTimeout.Milliseconds(), payAmount(o.Amount)
	recs = append(recs, o.record())
	po, err := s.pay.CreateBizOrder(pay.BizOrderReq{ID: o.id, User: o.UserID, Biz: Biz, Amount: o.PayAmount,
		ReqID: "ticket:" + o.ReqID, ExpiresAt: o.ExpiresAt}, recs...)
	if err != nil {
		return Order{}, err
	}
	s.pendMu.Lock()
	s.pending[o.id] = o.ExpiresAt
	s.pendMu.Unlock()
	o.PayURL = po.PayURL
	s.push(o)
	return *o, nil
}

// payAmount is the provider's charge, in cents, of an order amount in coins.
func payAmount(coins int64) int64 { return coins * pay.CentsPerCoin }

// The dearest order, MaxPerOrder seats at maxPrice coins, costs 2·10⁹ cents:
// no overflow, and a number a browser reads exactly (below 2⁵³). This does
// not compile if the bounds or the rate grow past that.
const _ = uint64(1<<53 - MaxPerOrder*maxPrice*pay.CentsPerCoin)

func setAll(b *persist.Batch, recs []persist.Record) error {
	for _, r := range recs {
		if err := b.Set(r.Key, r.Value, nil); err != nil {
			return err
		}
	}
	return nil
}

// orderStatus is the order-status push's data (biz order_status).
type orderStatus struct {
	OrderID string `json:"order_id"`
	Status  string `json:"status"`
}

func (s *Service) push(o *Order) {
	if s.router == nil {
		return
	}
	d, _ := proto.Marshal(orderStatus{o.OrderID, o.Status}) // a struct: no map to build and iterate per order
	s.router.SendUser(o.UserID, proto.Push{Biz: proto.BizOrderStatus, Data: d, Ack: true})
}
