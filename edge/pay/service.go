package pay

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/liveedge/liveedge/edge/keylock"
	"hash/fnv"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/liveedge/liveedge/edge/account"
	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// Config configures Service.
type Config struct {
	Node           string
	WorkerID       int           // snowflake worker (-1 = from Node)
	WorkerHeld     func() bool   // nil = always; false refuses order creation (a WorkerLease lost)
	Secrets        []string      // webhook HMAC secrets accepted (first one signs our queries' checks)
	Tolerance      time.Duration // signature timestamp tolerance (0 = 300 s)
	OrderTimeout   time.Duration // unpaid orders close after this (0 = 15 min)
	ProviderURL    string        // provider base URL: pay_url and the active query ("" = none)
	NotifyURL      string        // where the provider must post notifies (put into pay_url)
	ReconcileAfter time.Duration // PAYING longer than this → active query (0 = 1 min)
	ReconcileEvery time.Duration // how often the reconciler runs (0 = 10 s)
	// ReconcileWorkers bounds the provider queries in flight at once (0 =
	// DefaultReconcileWorkers); each has its own QueryTimeout, and an order
	// whose query hangs holds one worker, never the others.
	ReconcileWorkers int
	QueryTimeout     time.Duration // one active query or close at the provider (0 = 5 s)
	// UnaskedRetention bounds how long an order closed without the
	// provider's word (rec/payunasked) is asked about after its close (0 =
	// DefaultUnaskedRetention): past it, with the provider still not
	// answering, it is logged for an operator (warn, its order id), counted
	// (liveedge_pay_unasked_dropped_total) and dropped — never retried for
	// good, never silently.
	UnaskedRetention time.Duration
	// MaxOpenPerUser bounds a user's orders in WAITING_PAY / PAYING (each
	// one is queried by the reconciler): one more → 10429 (0 = no bound).
	MaxOpenPerUser int
	// OrdersPerMinute bounds a user's order creations (a replay of a req_id
	// is not a creation): more → 10429 (0 = no bound).
	OrdersPerMinute int
	// SharedCreates, if set, counts OrdersPerMinute on every node of a
	// cluster as well (limit.Shared; this node's count alone let a user make
	// N times as many through N nodes).
	SharedCreates *limit.Shared
	// SharedOpen, if set, counts MaxOpenPerUser's unpaid orders on every
	// node of a cluster as well (limit.Held, bounded by the same number;
	// this node's count alone let a user hold N times as many through N
	// nodes).
	SharedOpen *limit.Held
	Now        func() time.Time
	Log        *slog.Logger

	// Frozen tells whether a user's account is frozen (edge/account): a
	// frozen user's order creation is refused with 20004. nil = none is.
	Frozen func(user int64) (bool, error)

	// ReqClaims makes a (user, req_id) name one order across the nodes of
	// a cluster; nil: this node's store alone answers duplicates.
	ReqClaims ReqClaims
}

// ReqClaims binds each (user, req_id) of an order creation to one order id
// shared by every node (Redis in a cluster). A binding is pending from
// Claim until Confirm (a short lease: a node that dies before writing its
// order lets the req_id go again), then kept for the idempotency window.
type ReqClaims interface {
	// Claim binds (user, req) to order id, pending, unless it is bound
	// already: then it returns that order's id (≠ 0).
	Claim(user int64, req string, id int64) (prev int64, err error)
	// Confirm makes (user, req)'s binding to id lasting — binding it to id
	// if it is gone — unless it names another order: that one is returned.
	Confirm(user int64, req string, id int64) (bound int64, err error)
	// Release unbinds (user, req) if it is still bound to id.
	Release(user int64, req string, id int64) error
	// Bound returns the order (user, req) is bound to (0: none).
	Bound(user int64, req string) (int64, error)
}

// newOrderRules checks what a new order of user for product must pass and
// returns the product.
func (s *Service) newOrderRules(user int64, product int64) (Product, error) {
	p, ok := s.products[product]
	if !ok || !p.Valid {
		return Product{}, proto.Errorf(proto.CodeProductNotFound, "product not found")
	}
	if err := s.refuseFrozen(user); err != nil {
		return Product{}, err
	}
	if s.cfg.WorkerHeld != nil && !s.cfg.WorkerHeld() {
		return Product{}, errors.New("pay: order-id worker lease not held; refusing to make order ids")
	}
	return p, nil
}

// OrderElsewhere is CreateOrder's answer when the req_id is bound to an
// order this node does not have: made through another node (or being
// made there now). The caller answers with that order.
type OrderElsewhere struct{ ID int64 }

func (e *OrderElsewhere) Error() string {
	return "pay: req_id bound to order " + strconv.FormatInt(e.ID, 10) + " of another node"
}

// errClaimUnavailable: the req_id's binding could not be read or made.
var errClaimUnavailable = proto.Errorf(proto.CodeInternal, "could not reserve the req_id, retry")

// Service runs orders and the webhook.
type Service struct {
	cfg      Config
	store    *persist.Store
	wallet   persist.Wallet
	router   router.Router
	ids      *IDGen
	products map[int64]Product
	client   *http.Client

	loaded      int                // order records read at start (loadOpen)
	createLimit *limit.Keyed       // OrdersPerMinute per user (nil = off)
	tooMany     *proto.Error       // its refusal (10429)
	tooManyOpen *proto.Error       // MaxOpenPerUser's refusal (10429)
	orders      keylock.Map[int64] // one lock per order id: transitions are compare-and-set under it
	events      keylock.Map[int64] // one lock per event id (its hash): the duplicate check and the event's write are one step
	users       keylock.Map[int64] // one lock per user: order creation is idempotent under it

	bizMu sync.RWMutex
	biz   map[string]Business // business → where its paid events go (RegisterBusiness)

	openMu sync.Mutex
	open   map[int64]openOrder // orders in WAITING_PAY / PAYING
	// making are the orders whose creating write is in flight: Pebble makes
	// a batch readable before its fsync, so Get must not answer one from
	// the store yet — in a cluster another node fetches the order of a
	// pending req_id binding and hands it out (a crash before the fsync:
	// an order paid for that no disk has).
	making   map[int64]struct{}
	openOf   map[int64]int  // user → number of their open orders
	inflight map[int64]bool // open orders the reconciler is querying now
	workers  chan struct{}  // reconciler worker slots (ReconcileWorkers)
	// unaskedFrom: the id the reconciler's next run lists rec/payunasked
	// from (unasked).
	unaskedFrom atomic.Int64
	// unaskedDropped counts the closed orders dropped from rec/payunasked
	// past UnaskedRetention, the provider never having answered about them.
	unaskedDropped prometheus.Counter

	ctx    context.Context // cancelled by Close: ends provider queries in flight
	rekeep chan struct{}   // cap 1: keeper keeps the open orders' places (nil: no SharedOpen)
	cancel context.CancelFunc

	notifyURL atomic.Pointer[string]
	logSeq    atomic.Int64 // last order-log sequence (see transitionRecord)

	stop chan struct{}
	wg   sync.WaitGroup
}

// SetNotifyURL sets the webhook base URL put into pay_url (the node calls it
// once its HTTP listener is bound, when no public URL is configured).
func (s *Service) SetNotifyURL(u string) { s.notifyURL.Store(&u) }

// payURL is the provider's payment page of o ("" without a provider):
// <provider>/pay?amount=…&notify_url=…&order_id=…, the query as
// url.Values.Encode writes it (keys sorted, values query-escaped) without
// its map and sort — it is built for every order.
func (s *Service) payURL(o *Order) string {
	if s.cfg.ProviderURL == "" {
		return ""
	}
	amount := strconv.FormatInt(o.Amount, 10)
	notify := url.QueryEscape(*s.notifyURL.Load() + "/" + o.Channel)
	id := url.QueryEscape(o.OrderID)
	var b strings.Builder
	b.Grow(len(s.cfg.ProviderURL) + len("/pay?amount=&notify_url=&order_id=") + len(amount) + len(notify) + len(id))
	b.WriteString(s.cfg.ProviderURL)
	b.WriteString("/pay?amount=")
	b.WriteString(amount)
	b.WriteString("&notify_url=")
	b.WriteString(notify)
	b.WriteString("&order_id=")
	b.WriteString(id)
	return b.String()
}

var (
	prefixOrder    = recPrefix("order/")
	prefixOrderReq = recPrefix("orderreq/")
	prefixOrderLog = recPrefix("orderlog/")
	// prefixOldEvent: rec/payevent/<event id> held events before
	// prefixOrderEvent; no longer read or written (a settled order answers
	// its events' copies by its status without them: Notify's last cases),
	// dropped at start (New).
	prefixOldEvent = recPrefix("payevent/")
	// prefixOrderEvent: rec/orderevent/<order id><event id> →
	// eventRecord, the record of a provider event applied to an order —
	// one per order and event id: a provider reusing an event id for
	// another order no longer overwrites the first order's record.
	prefixOrderEvent = recPrefix("orderevent/")
	prefixRefund     = recPrefix("refund/")
	// prefixSecondPay: rec/refundsecond/<order id><txn id> → the refund
	// record of a second payment of a settled order (secondPayment): one
	// per transaction, beside the order's own refund record.
	prefixSecondPay = recPrefix("refundsecond/")
	// prefixMismatch: rec/paymismatch/<id> → the event of a payment the
	// provider's verified query answer reported for open order id, not as
	// the order (rememberMismatch), until the order is settled.
	prefixMismatch = recPrefix("paymismatch/")
	// prefixUnasked: rec/payunasked/<id> → "" for each order closed
	// (IN_VALID) here without being closed at the provider
	// (closeAtProvider) — a business's pay order its business closed
	// without asking (CloseBizOrder), an order closed while the provider
	// did not answer. Written in the closing batch; the reconciler closes
	// the order at the provider after its close (reconcileClosed) until
	// the provider answers — closed there, or paid: that payment is
	// refunded as a late one — or UnaskedRetention has passed (then
	// logged for an operator, counted, dropped). Without it a payment
	// whose notifies were all lost stayed at the provider, neither sold
	// nor refunded: a closed order was never asked about again.
	prefixUnasked = recPrefix("payunasked/")
	// prefixReqBound: rec/reqbound/<created ms>/<id> → {user, req}, the
	// orders whose req_id binding was confirmed (ReqClaims), by creation
	// time: the bindings are rebuilt from them (ReqBindingsOnDisk).
	prefixReqBound = recPrefix("reqbound/")
	// The start-up checkpoint (loadOpen): rec/orderopen/<id> → "" for each
	// order open when the node last started, and rec/orderstart → that
	// start's clock and id mark (startMark). Order ids grow with time, so
	// an order open now was either open then (listed) or made since (its
	// id at or above the mark): a start reads those, not every order ever.
	prefixOrderOpen = recPrefix("orderopen/")
	orderStartKey   = recPrefix("orderstart")
)

// startSlack: the ids of the hour before a start are read again at the next
// one. The mark holds whatever the clock does: a start whose clock is behind
// the last one's reads every order, and ids made after a start are above
// its mark and every stored order's id (IDGen.notBelow), also when the
// clock steps back while the node runs.
const startSlack = time.Hour

// startMark is the start-up checkpoint's record.
type startMark struct {
	At   int64 `json:"at"`   // the start's clock, unix ms
	Mark int64 `json:"mark"` // FirstIDAt(At - startSlack)
}

// DefaultReconcileWorkers is the default of Config.ReconcileWorkers.
const DefaultReconcileWorkers = 8

// DefaultUnaskedRetention is the default of Config.UnaskedRetention: three
// days of a provider not answering about an order — past any outage the
// reconciler could wait out, and past a real provider's notify schedule
// (Alipay's ~25 h).
const DefaultUnaskedRetention = 72 * time.Hour

// openOrder is an order in WAITING_PAY / PAYING.
type openOrder struct {
	created int64 // unix ms
	user    int64
	counted bool // in openOf (MaxOpenPerUser)
	// creditDoubt: the order's credit was answered in doubt (it may still
	// land: the shared wallet settles it later, with the order's PAYED
	// record). The order is not closed meanwhile — a close and then the
	// late credit would both stand, and a redelivered payment on the
	// closed order be refunded on top of the credit. Cleared when the
	// wallet settles the op (onSettled) or a credit is answered.
	creditDoubt bool
	// order is the order as last durably written (an immutable copy,
	// replaced on each write under the order's lock), so that Get of an open
	// order — every notify, query and close — is a map read, not a Pebble
	// read of a block that is cold (an order is paid once, mostly after its
	// memtable was flushed). nil: read it from the store (a write whose
	// outcome is unknown dropped it).
	order *Order
}

func recPrefix(s string) []byte { return append(append([]byte{}, persist.PrefixRec...), s...) }

func orderKey(id int64) []byte { return persist.Key(prefixOrder, uint64(id)) }

func orderReqKey(user int64, req string) []byte {
	return append(persist.Key(prefixOrderReq, uint64(user)), req...)
}

func reqBoundKey(at, id int64) []byte { return persist.Key2(prefixReqBound, uint64(at), uint64(id)) }

type reqBound struct {
	User  int64  `json:"user"`
	ReqID string `json:"req_id"`
}

// ReqBindingWindow is how long an order's req_id names it through every
// node once confirmed (the cluster's binding; the wallet's idempotency
// window).
const ReqBindingWindow = 25 * time.Hour

// markBound records that o's req_id binding is confirmed (synced: a binding
// Redis loses is rebuilt from these). A failure is logged: the order stands,
// only a rebuild would miss its binding.
func (s *Service) markBound(o Order) {
	id, _ := strconv.ParseInt(o.OrderID, 10, 64)
	b, _ := proto.Marshal(reqBound{User: o.UserID, ReqID: o.ReqID})
	if err := s.store.Put(reqBoundKey(o.CreatedAt, id), b); err != nil {
		s.cfg.Log.Warn("pay: req_id binding not recorded", "order", id, "err", err)
	}
}

// ReqBindingsOnDisk calls fn with every order in store whose req_id binding
// was confirmed within ReqBindingWindow (and an hour's slack for the nodes'
// clocks) of since: its user, req_id, id and creation time (unix ms).
func ReqBindingsOnDisk(store *persist.Store, since time.Time, fn func(user int64, req string, id, at int64) error) error {
	from := since.Add(-ReqBindingWindow - time.Hour).UnixMilli()
	return store.ScanRange(reqBoundKey(max(from, 0), 0), persist.PrefixEnd(prefixReqBound), func(k, v []byte) (bool, error) {
		if len(k) != len(prefixReqBound)+16 {
			return true, nil
		}
		var rb reqBound
		if err := proto.Unmarshal(v, &rb); err != nil {
			return false, fmt.Errorf("pay: req_id binding %x: %w", k, err)
		}
		at := int64(binary.BigEndian.Uint64(k[len(prefixReqBound):]))
		id := int64(binary.BigEndian.Uint64(k[len(prefixReqBound)+8:]))
		return true, fn(rb.User, rb.ReqID, id, at)
	})
}

// pruneBound drops the binding records older than the window (and a day).
func (s *Service) pruneBound() {
	cut := s.cfg.Now().Add(-ReqBindingWindow - 24*time.Hour).UnixMilli()
	if cut <= 0 {
		return
	}
	if err := s.store.DeleteRangeNoSync(prefixReqBound, reqBoundKey(cut, 0)); err != nil {
		s.cfg.Log.Warn("pay: old req_id binding records not pruned", "err", err)
	}
}

// RefundRecordKey is where order's refund record is kept (JSON: the order,
// the amount owed back in cents, the event, why, when): one per order,
// written with the order's move to PAY_BACK.
func RefundRecordKey(order int64) []byte { return persist.Key(prefixRefund, uint64(order)) }

// refundRecord is order o's refund record (RefundRecordKey): amount owed
// back, the event that paid it, why.
func refundRecord(o Order, id, amount int64, eventID, why string, now int64) persist.Record {
	v, _ := proto.Marshal(map[string]any{"order_id": o.OrderID, "amount": amount, "event_id": eventID, "reason": why, "at": now})
	return persist.Record{Key: RefundRecordKey(id), Value: v}
}

// EventRecordKey is where the record of provider event eventID applied to
// order is kept (JSON: the event, the order's status before it, when).
func EventRecordKey(order int64, eventID string) []byte {
	return append(persist.Key(prefixOrderEvent, uint64(order)), eventID...)
}

// New builds the service and loads open orders.
func New(store *persist.Store, w persist.Wallet, r router.Router, cfg Config) (*Service, error) {
	if cfg.Tolerance <= 0 {
		cfg.Tolerance = DefaultTolerance
	}
	if cfg.OrderTimeout <= 0 {
		cfg.OrderTimeout = 15 * time.Minute
	}
	if cfg.ReconcileAfter <= 0 {
		cfg.ReconcileAfter = time.Minute
	}
	if cfg.ReconcileEvery <= 0 {
		cfg.ReconcileEvery = 10 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ReconcileWorkers <= 0 {
		cfg.ReconcileWorkers = DefaultReconcileWorkers
	}
	if cfg.QueryTimeout <= 0 {
		cfg.QueryTimeout = 5 * time.Second
	}
	if cfg.UnaskedRetention <= 0 {
		cfg.UnaskedRetention = DefaultUnaskedRetention
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if len(cfg.Secrets) == 0 {
		return nil, errors.New("pay: at least one webhook secret is required")
	}
	s := &Service{cfg: cfg, store: store, wallet: w, router: r, ids: NewIDGen(cfg.Node, cfg.WorkerID, cfg.Now),
		products: map[int64]Product{}, client: &http.Client{},
		open: map[int64]openOrder{}, openOf: map[int64]int{}, inflight: map[int64]bool{},
		workers: make(chan struct{}, cfg.ReconcileWorkers), stop: make(chan struct{}),
		createLimit: limit.New(cfg.OrdersPerMinute, time.Minute, max(1, cfg.OrdersPerMinute), cfg.Now),
		tooMany:     proto.Errorf(proto.CodeRateLimited, "too many orders created, at most %d per minute", cfg.OrdersPerMinute),
		tooManyOpen: proto.Errorf(proto.CodeRateLimited, "too many unpaid orders (at most %d): pay or wait for one to close", cfg.MaxOpenPerUser)}
	s.unaskedDropped = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "liveedge", Name: "pay_unasked_dropped_total",
		Help: "Orders closed without the provider's word that it never answered about within pay.unasked_retention: dropped from the reconciler's queries, each logged (warn) for an operator to check at the provider."})
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if n, ok := w.(persist.SettleNotifier); ok {
		n.OnSettled(s.onSettled)
	}
	for _, p := range Products {
		s.products[p.ID] = p
	}
	s.SetNotifyURL(cfg.NotifyURL)
	if err := s.loadOpen(); err != nil {
		return nil, err
	}
	// Event records of an earlier version, never read now: dropped (one
	// range deletion; a crash before it is flushed leaves them to the next
	// start).
	if err := s.store.DeletePrefixNoSync(prefixOldEvent); err != nil {
		s.cfg.Log.Warn("pay: event records of an earlier version not dropped, next start", "err", err)
	}
	s.wg.Add(1)
	go s.loop()
	if cfg.SharedOpen != nil {
		// Counted across the cluster again (Redis may have lost them, or
		// let them lapse while this node was down), each until its own
		// deadline.
		s.openMu.Lock()
		ids := slices.Collect(maps.Keys(s.open))
		s.openMu.Unlock()
		s.rekeep = make(chan struct{}, 1)
		s.wg.Add(1)
		go s.keeper(ids)
	}
	return s, nil
}

// loadOpen loads the open orders (WAITING_PAY, PAYING) from the store: those
// the last start's checkpoint lists and every order made since (ids from its
// mark on) — or every order, when there is no checkpoint (a store of an
// older version) or the clock is behind the last start's — then writes this
// start's checkpoint. So a start reads the orders open then and those made
// since, not the whole history. s.loaded counts the order records read.
func (s *Service) loadOpen() error {
	now := s.cfg.Now()
	load := func(id int64, v []byte) error {
		s.loaded++
		var o Order
		if err := proto.Unmarshal(v, &o); err != nil {
			return fmt.Errorf("pay: order %d: %w", id, err)
		}
		if OpenStatus(o.Status) {
			s.addOpen(id, o, o.coins())
		}
		return nil
	}
	var last startMark
	v, err := s.store.Get(orderStartKey)
	switch {
	case errors.Is(err, persist.ErrNotFound):
	case err != nil:
		return err
	default:
		if err := proto.Unmarshal(v, &last); err != nil {
			return fmt.Errorf("pay: start checkpoint: %w", err)
		}
	}
	if last.At == 0 || now.UnixMilli() < last.At {
		if last.At != 0 {
			s.cfg.Log.Warn("pay: the clock is behind the last start's: reading every order", "last_start", time.UnixMilli(last.At))
		}
		err = s.store.Scan(prefixOrder, func(k, v []byte) error { return load(int64(persist.KeyID(k)), v) })
	} else {
		err = s.store.Scan(prefixOrderOpen, func(k, _ []byte) error {
			id := int64(persist.KeyID(k))
			if id >= last.Mark {
				return nil // read with those made since, below
			}
			v, err := s.store.Get(orderKey(id))
			if errors.Is(err, persist.ErrNotFound) {
				return nil
			}
			if err != nil {
				return err
			}
			return load(id, v)
		})
		if err == nil {
			err = s.store.ScanRange(orderKey(last.Mark), persist.PrefixEnd(prefixOrder), func(k, v []byte) (bool, error) {
				return true, load(int64(persist.KeyID(k)), v)
			})
		}
	}
	if err != nil {
		return err
	}
	// Ids made from now on: above this start's mark and every stored order
	// (a clock set back cannot bring an id below the mark, nor make an id
	// again).
	mark := FirstIDAt(now.Add(-startSlack))
	s.ids.notBelow(mark)
	err = s.store.ScanReverse(prefixOrder, persist.PrefixEnd(prefixOrder), func(k, _ []byte) (bool, error) {
		s.ids.notBelow(int64(persist.KeyID(k)))
		return false, nil
	})
	if err != nil {
		return err
	}
	// This start's checkpoint, in one synced batch: no order is made before
	// it is written (New has not returned), and until then the last one
	// stays true.
	cur, _ := proto.Marshal(startMark{At: now.UnixMilli(), Mark: mark})
	s.openMu.Lock()
	open := slices.Collect(maps.Keys(s.open))
	s.openMu.Unlock()
	return s.store.Apply(func(b *persist.Batch) error {
		if err := b.DeleteRange(prefixOrderOpen, persist.PrefixEnd(prefixOrderOpen), nil); err != nil {
			return err
		}
		for _, id := range open {
			if err := b.Set(persist.Key(prefixOrderOpen, uint64(id)), nil, nil); err != nil {
				return err
			}
		}
		return b.Set(orderStartKey, cur, nil)
	})
}

// KeepOpenPlaces keeps the places (Config.SharedOpen) of this node's counted
// open orders again, each until its own deadline, in the background: for
// when Redis lost them while the node ran (its shared state was rebuilt).
// Places held already keep their deadlines. It never blocks.
func (s *Service) KeepOpenPlaces() {
	if s.rekeep == nil {
		return
	}
	select {
	case s.rekeep <- struct{}{}:
	default: // one is pending: it reads the open orders when it runs
	}
}

// keeper keeps the open orders' places at start (first: those loaded) and
// at each KeepOpenPlaces, until Close. (The reconciler may run meanwhile:
// openMu.)
func (s *Service) keeper(first []int64) {
	defer s.wg.Done()
	s.keepOpenOrders(first)
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.rekeep:
		}
		s.openMu.Lock()
		ids := slices.Collect(maps.Keys(s.open))
		s.openMu.Unlock()
		s.keepOpenOrders(ids)
	}
}

// Close stops the background loops.
func (s *Service) Close() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.cancel()
	s.wg.Wait()
}

// ListProducts returns the valid products.
func (s *Service) ListProducts() []Product {
	out := make([]Product, 0, len(s.products))
	for _, p := range s.products {
		if p.Valid {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// MaxSourceBytes bounds an order's source (where it was made: "live_room",
// "user_center"), which every copy of the order carries.
const MaxSourceBytes = 32

// CreateReq is the body of POST /pay/orders.
type CreateReq struct {
	ProductID int64  `json:"product_id"`
	Channel   string `json:"channel"`
	Source    string `json:"source"`
	ReqID     string `json:"req_id"`
}

// Channels are the payment channels this node has a provider for: only the
// mock provider (it behaves like the real ones). alipay, wechat, unionpay
// and cashier (SPEC §4) are refused with 10001 until a provider of theirs is
// wired in; an order must never get a pay_url of a provider it does not use.
var Channels = map[string]bool{"mock": true}

// KnownChannel reports whether channel is one of Channels.
func KnownChannel(channel string) bool { return Channels[channel] }

// refuseFrozen answers 20004 for a frozen user (Config.Frozen).
func (s *Service) refuseFrozen(user int64) error {
	return account.Refuse(s.cfg.Frozen, user, "no orders can be created")
}

// CreateOrder creates (idempotently per user and req_id) an order in PAYING
// with its pay_url.
func (s *Service) CreateOrder(user int64, r CreateReq) (Order, error) {
	if r.ReqID == "" || len(r.ReqID) > 64 {
		return Order{}, proto.BadRequest("req_id must be 1..64 bytes")
	}
	if len(r.Source) > MaxSourceBytes {
		return Order{}, proto.BadRequest("source must be at most %d bytes", MaxSourceBytes)
	}
	if r.Channel == "" {
		r.Channel = "mock"
	}
	if !KnownChannel(r.Channel) {
		return Order{}, proto.BadRequest("unknown channel (known: mock)") // not echoed: any length, any bytes
	}
	// Idempotency: one lock per (user) shard serializes creation per user.
	defer s.users.Lock(user)()
	claims := s.cfg.ReqClaims
	if v, err := s.store.Get(orderReqKey(user, r.ReqID)); err == nil {
		id := int64(persist.DecodeUint64(v))
		if claims != nil {
			// Made here — and still the req_id's order? (Another node's, if
			// this one's write came after its binding had lapsed.)
			if err := s.confirmReq(claims, user, r.ReqID, id); err != nil {
				return Order{}, err
			}
			o, err := s.Get(id)
			if err == nil {
				if _, gerr := s.store.Get(reqBoundKey(o.CreatedAt, id)); errors.Is(gerr, persist.ErrNotFound) {
					s.markBound(o) // a crash came between the confirm and the record
				}
			}
			return o, err
		}
		return s.Get(id)
	} else if !errors.Is(err, persist.ErrNotFound) {
		return Order{}, err
	}
	// The rules that may have changed since a first request (the product
	// withdrawn, the account frozen) refuse only a new order: a retry of
	// one made here got it back above, one made through another node is
	// pointed at it (the req_id's binding) rather than refused.
	p, err := s.newOrderRules(user, r.ProductID)
	if err != nil {
		return Order{}, s.refusedUnlessElsewhere(claims, user, r.ReqID, err)
	}
	if s.atOpenBound(user) {
		// The node's own count first: a user at the bound costs no Redis
		// script (before, a req_id binding taken and given back, two Lua
		// calls per refused attempt) — one read, so that a retry of an
		// order made through another node is pointed at it, not refused.
		return Order{}, s.refusedUnlessElsewhere(claims, user, r.ReqID, s.tooManyOpen)
	}
	id := s.ids.Next(user)
	if claims != nil {
		// Through any node, one order per (user, req_id): bind it before
		// anything else, so a duplicate elsewhere is answered with this
		// order, never made a second one (nor refused by a limit).
		prev, err := claims.Claim(user, r.ReqID, id)
		if err != nil {
			s.cfg.Log.Warn("pay: binding a req_id failed", "user", user, "err", err)
			return Order{}, errClaimUnavailable
		}
		if prev != 0 {
			return Order{}, &OrderElsewhere{ID: prev}
		}
	}
	item, held := strconv.FormatInt(id, 10), false
	release := func() { // the binding and the open place taken
		if claims != nil {
			if err := claims.Release(user, r.ReqID, id); err != nil {
				s.cfg.Log.Warn("pay: releasing a req_id failed", "user", user, "err", err)
			}
		}
		if held {
			s.cfg.SharedOpen.Drop(uint64(user), item)
		}
	}
	if s.atOpenBound(user) { // (again: an order of the user made here meanwhile)
		release()
		return Order{}, s.tooManyOpen
	}
	spent, perr := limit.Take(s.createLimit, s.cfg.SharedCreates, uint64(user), s.tooMany, s.cfg.Log)
	if perr != nil {
		release()
		return Order{}, perr
	}
	// Last: a refusal above leaves no place to give back. (Check drops a
	// place whose Take's reply was lost itself.)
	if perr := s.cfg.SharedOpen.Check(uint64(user), item, s.openHold(), s.tooManyOpen); perr != nil {
		if perr != s.tooManyOpen {
			spent.GiveBack() // Redis did not answer: no order, no rate spent
		}
		release()
		return Order{}, perr
	}
	held = true
	now := s.cfg.Now().UnixMilli()
	o := Order{OrderID: strconv.FormatInt(id, 10), UserID: user, ProductID: p.ID, Amount: p.Price, Coins: p.Coins,
		Channel: r.Channel, Source: r.Source, Biz: p.Biz, Status: StatusPaying, ReqID: r.ReqID,
		CreatedAt: now, UpdatedAt: now}
	o.PayURL = s.payURL(&o)
	v, _ := proto.Marshal(o)
	s.openMu.Lock()
	if s.making == nil {
		s.making = map[int64]struct{}{}
	}
	s.making[id] = struct{}{}
	s.openMu.Unlock()
	err = s.store.Apply(func(b *persist.Batch) error {
		if err := b.Set(orderKey(id), v, nil); err != nil {
			return err
		}
		if err := b.Set(orderReqKey(user, r.ReqID), persist.EncodeUint64(uint64(id)), nil); err != nil {
			return err
		}
		for _, t := range []persist.Record{
			s.transitionRecord(id, "", StatusWaitingPay, "created", now),
			s.transitionRecord(id, StatusWaitingPay, StatusPaying, "pay_url issued", now),
		} {
			if err := b.Set(t.Key, t.Value, nil); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		s.madeOrNot(id)
		release()
		return Order{}, err
	}
	s.addOpen(id, o, true)
	s.madeOrNot(id) // durable, and in open: Get answers it from memory
	if claims != nil {
		// Confirmed: still this order (a superseded one is an error here).
		if err := s.confirmReq(claims, user, r.ReqID, id); err != nil {
			return Order{}, err
		}
		s.markBound(o)
	}
	return o, nil
}

// confirmReq makes the req_id's binding to order id (made here) lasting
// before the order is handed out. If the binding names another order — this
// one's pending binding lapsed before its write (a stall) and a retry through
// another node made that one — this order is superseded: closed at once
// (INVALID; a payment for it would be refunded) and the caller is pointed at
// the other. Redis not answering: "retry" (the order is not handed out
// unconfirmed; a retry here confirms it).
func (s *Service) confirmReq(claims ReqClaims, user int64, req string, id int64) error {
	bound, err := claims.Confirm(user, req, id)
	if err != nil {
		s.cfg.Log.Warn("pay: confirming a req_id failed", "user", user, "err", err)
		return errClaimUnavailable
	}
	if bound == id {
		return nil
	}
	unlock := s.orders.Lock(id)
	defer unlock()
	o, err := s.Get(id)
	if err != nil {
		return err
	}
	if OpenStatus(o.Status) {
		if err := s.moveLocked(&o, id, StatusInvalid, "superseded by order "+strconv.FormatInt(bound, 10)+" (same req_id)", unaskedRecord(id)); err != nil {
			return err
		}
	}
	return &OrderElsewhere{ID: bound}
}

// transitionRecord is one row of an order's state log,
// rec/orderlog/<id>/<seq>; seq is strictly increasing within the process
// (wall-clock ns, bumped past the last one) so two rows never share a key.
func (s *Service) transitionRecord(id int64, from, to, why string, at int64) persist.Record {
	v, _ := proto.Marshal(transition{From: from, To: to, Why: why, At: at})
	for {
		last := s.logSeq.Load()
		next := max(s.cfg.Now().UnixNano(), last+1)
		if s.logSeq.CompareAndSwap(last, next) {
			return persist.Record{Key: persist.Key2(prefixOrderLog, uint64(id), uint64(next)), Value: v}
		}
	}
}

func (s *Service) logTransition(b *persist.Batch, id int64, from, to, why string, at int64) error {
	t := s.transitionRecord(id, from, to, why, at)
	return b.Set(t.Key, t.Value, nil)
}

// ParseOrderID parses a decimal order id.
func ParseOrderID(s string) (int64, bool) {
	id, err := strconv.ParseInt(s, 10, 64)
	return id, err == nil && id > 0
}

// Has reports whether order id was made here (it is on this node's disk or
// being written): a cluster serves it here whatever node holds its worker
// id now.
func (s *Service) Has(id int64) bool {
	s.openMu.Lock()
	_, open := s.open[id]
	s.openMu.Unlock()
	if open {
		return true
	}
	has, _ := s.store.Has(orderKey(id))
	return has
}

// madeOrNot ends order id's creating write (making).
func (s *Service) madeOrNot(id int64) {
	s.openMu.Lock()
	delete(s.making, id)
	s.openMu.Unlock()
}

// Get returns order id: an open order from memory (its last durable
// write), any other from the store — "not found" while its creating write
// is in flight (making).
func (s *Service) Get(id int64) (Order, error) {
	s.openMu.Lock()
	if oo, ok := s.open[id]; ok && oo.order != nil {
		o := *oo.order
		s.openMu.Unlock()
		return o, nil
	}
	if _, ok := s.making[id]; ok {
		s.openMu.Unlock()
		return Order{}, proto.Errorf(proto.CodeNotFound, "order not found")
	}
	s.openMu.Unlock()
	var o Order
	v, err := s.store.Get(orderKey(id))
	if errors.Is(err, persist.ErrNotFound) {
		return o, proto.Errorf(proto.CodeNotFound, "order not found")
	}
	if err != nil {
		return o, err
	}
	err = proto.Unmarshal(v, &o) // before o is read: the order of a return's operands is not the spec's
	return o, err
}

// Event is a provider's notify body.
type Event struct {
	EventID string `json:"event_id"`
	OrderID string `json:"order_id"`
	Amount  int64  `json:"amount"`
	Status  string `json:"status"` // SUCCESS | FAILED
	PaidAt  int64  `json:"paid_at"`
	// TxnID (extension, optional) is the provider's id of the payment
	// itself, the same in every event about it: a SUCCESS of an order
	// already paid (or refunded) by another transaction is a second
	// payment, recorded for refund (secondPayment).
	TxnID TxnID `json:"txn_id,omitempty"`
}

// MaxTxnIDLen bounds a transaction id kept (a longer one is ignored).
const MaxTxnIDLen = 128

// TxnID is a provider's transaction id as an event carries it: a JSON
// string, or a number taken as its text (a provider may send one). Any other
// value, or a string over MaxTxnIDLen bytes, reads as none: an optional
// field in an unexpected form never refuses the event (its payment is
// still credited; it is only not told apart from a second one).
type TxnID string

// UnmarshalJSON implements json.Unmarshaler.
func (t *TxnID) UnmarshalJSON(b []byte) error {
	*t = ""
	switch {
	case len(b) > 0 && b[0] == '"':
		var v string
		if err := proto.Unmarshal(b, &v); err == nil && len(v) <= MaxTxnIDLen {
			*t = TxnID(v)
		}
	case len(b) > 0 && len(b) <= MaxTxnIDLen && (b[0] == '-' || (b[0] >= '0' && b[0] <= '9')):
		*t = TxnID(b)
	}
	return nil
}

// eventRecord is the durable record of a processed provider event.
type eventRecord struct {
	Event        Event  `json:"event"`
	StatusBefore string `json:"order_status_before"`
	At           int64  `json:"at"`
}

// transition is one row of an order's state log.
type transition struct {
	From string `json:"from"`
	To   string `json:"to"`
	Why  string `json:"why"`
	At   int64  `json:"at"`
}

// Notify outcomes, as HTTP statuses.
const (
	NotifyOK           = http.StatusOK
	NotifyUnauthorized = http.StatusUnauthorized
	NotifyBadRequest   = http.StatusBadRequest
	NotifyNotFound     = http.StatusNotFound
	NotifyConflict     = http.StatusConflict
	NotifyRetry        = http.StatusInternalServerError
)

// Notify handles one webhook delivery: the signature is verified over the
// raw body before anything in it is read. It returns the HTTP status and the
// body ("success" once the event is durably recorded, also for duplicates).
func (s *Service) Notify(channel, sigHeader string, body []byte) (int, string) {
	if status, msg, ok := s.Authentic(channel, sigHeader, body); !ok {
		return status, msg
	}
	var ev Event
	if err := proto.Unmarshal(body, &ev); err != nil {
		return NotifyBadRequest, "bad JSON"
	}
	if ev.EventID == "" || len(ev.EventID) > 128 || ev.OrderID == "" || (ev.Status != "SUCCESS" && ev.Status != "FAILED") {
		return NotifyBadRequest, "missing or bad fields"
	}
	return s.apply(channel, ev)
}

// Authentic checks a webhook delivery's channel and signature (over the raw
// body, nothing in it read): ok, or the HTTP status and body to answer. A
// cluster node checks a delivery before it forwards it to the order's node,
// so only the provider's deliveries cross the cluster (the owner checks
// again in Notify).
func (s *Service) Authentic(channel, sigHeader string, body []byte) (status int, msg string, ok bool) {
	if !KnownChannel(channel) {
		return NotifyBadRequest, "unknown channel", false
	}
	if err := Verify(sigHeader, body, s.cfg.Secrets, s.cfg.Now(), s.cfg.Tolerance); err != nil {
		return NotifyUnauthorized, err.Error(), false
	}
	return 0, "", true
}

// eventLockKey is the events keylock.Map[int64] key of an event id: two ids that share
// a hash only wait for each other.
func eventLockKey(id string) int64 {
	h := fnv.New64a()
	h.Write([]byte(id))
	return int64(h.Sum64())
}

// apply runs a verified event (from a notify or an active query). The
// duplicate check and every write of the event's record happen under the
// event id's lock (taken before the order's: lock order event → order), so
// concurrent deliveries of one event id apply it once and its record is
// the first delivery's, never overwritten by a later copy.
func (s *Service) apply(channel string, ev Event) (int, string) {
	defer s.events.Lock(eventLockKey(ev.EventID))()
	id, ok := ParseOrderID(ev.OrderID)
	if !ok {
		return NotifyNotFound, "unknown order" // (never recorded: not a duplicate either)
	}
	defer s.orders.Lock(id)()
	o, err := s.Get(id)
	if err != nil {
		if proto.AsError(err).Code == proto.CodeNotFound {
			return NotifyNotFound, "unknown order"
		}
		return NotifyRetry, "retry"
	}
	// An event of an open order is new — a SUCCESS applied to an order
	// closed it, and closed orders never open again; a FAILED one is looked
	// up below before it is recorded — so only an event of a closed order is
	// looked up (the first look of most notifies, a Pebble read of a key that is
	// not there, was 9 % of the node's CPU under a webhook storm). The one
	// difference: a provider reusing an event id for another, open order has
	// it applied to that order (before: answered as a duplicate, the payment
	// never credited).
	// Only a payment (SUCCESS) can be not as the order: a declined attempt
	// (FAILED) of another amount is recorded and changes nothing, as any —
	// before, it was answered 409 and never recorded, and the provider
	// retried it for its whole schedule.
	mismatch := ""
	switch {
	case ev.Status != "SUCCESS":
	case o.Channel != channel:
		mismatch = "channel mismatch"
	case ev.Amount != o.Amount:
		mismatch = "amount mismatch"
	}
	if !OpenStatus(o.Status) {
		prev, err := s.store.Get(EventRecordKey(id, ev.EventID))
		if err == nil && !sameEvent(prev, ev) {
			// The id of a declined attempt reused for the payment — not a
			// duplicate of this notify (answered as one, the payment was
			// neither credited nor refunded).
			err = persist.ErrNotFound
		}
		switch {
		case err == nil && mismatch != "":
			// A duplicate of a payment not as the order (recorded when it
			// was refunded): changes nothing, answered 409 as its first
			// copy was — the provider retries a 409.
			return NotifyConflict, mismatch
		case err == nil:
			return NotifyOK, "success" // duplicate event: changes nothing
		case !errors.Is(err, persist.ErrNotFound):
			return NotifyRetry, "retry"
		}
	}
	lateSuccess := ev.Status == "SUCCESS" && o.Status == StatusInvalid
	now := s.cfg.Now().UnixMilli()
	evRec := eventRec(id, ev, o.Status, now)
	if mismatch != "" && !lateSuccess {
		// An open order's is refunded by the reconciler after two
		// timeouts (refundMismatch); a settled one's changes nothing —
		// unless it is a second payment (another transaction): recorded
		// for refund of the amount it reports, and answered 409 all the
		// same (its redeliveries are duplicates: 409, nothing more).
		if ev.Status == "SUCCESS" && secondPayment(o, ev) {
			if st, msg := s.refundSecond(o, id, ev, &evRec, now); st != NotifyOK {
				return st, msg
			}
		}
		return NotifyConflict, mismatch
	}
	switch {
	case ev.Status == "SUCCESS" && OpenStatus(o.Status):
		return s.markPaid(o, id, ev, evRec, now)
	case ev.Status == "SUCCESS" && o.Status == StatusInvalid:
		// Paid after the order closed: refund, never credit.
		b := s.business(o.Biz)
		if b == nil && !o.coins() {
			// Its business is not registered yet (the node is starting):
			// it must record the refund first — retry.
			s.cfg.Log.Warn("pay: late payment of a business not registered yet", "order", o.OrderID, "biz", o.Biz)
			return NotifyRetry, "retry"
		}
		if b != nil {
			switch err := b.Refunded(o); {
			case errors.Is(err, ErrBizPaid) && mismatch != "":
				// Not this payment's (it is not as the order): left as it was.
				return NotifyConflict, mismatch
			case errors.Is(err, ErrBizPaid):
				// The business took this payment before the order was
				// closed here (a crash or a failed write between its Paid
				// and our PAYED): the payment stands, as what it bought.
				return s.recordBizPaid(o, id, ev, evRec, now)
			case err != nil:
				s.cfg.Log.Error("pay: business refund", "order", o.OrderID, "biz", o.Biz, "err", err)
				return NotifyRetry, "retry"
			}
		}
		if mismatch != "" {
			// Paid after the close and not as the order (another amount
			// or channel): refunded as the provider reports it (before,
			// neither credited nor refunded), and answered 409 as any
			// payment not as its order (PROTOCOL.md) once the refund is
			// recorded; the provider's retries are duplicates.
			if st, msg := s.refundPayment(o, id, ev, evRec, now, "paid after close, not as the order ("+mismatch+"): refunded", ev.Amount); st != NotifyOK {
				return st, msg
			}
			return NotifyConflict, mismatch
		}
		return s.refundLate(o, id, ev, evRec, now)
	case ev.Status == "FAILED" && OpenStatus(o.Status):
		// SPEC §4: act only on a success status. A declined attempt is
		// recorded (once: a redelivery keeps the first record) and the
		// order stays open — the user may pay it again, and a payment that
		// follows is credited; the timeout closes it otherwise. Before, a
		// FAILED closed the order, and the user's second, successful
		// attempt was refunded instead of credited.
		if _, err := s.store.Get(evRec.Key); err == nil {
			return NotifyOK, "success"
		} else if !errors.Is(err, persist.ErrNotFound) {
			return NotifyRetry, "retry"
		}
		if err := s.store.Put(evRec.Key, evRec.Value); err != nil {
			return NotifyRetry, "retry"
		}
		return NotifyOK, "success"
	case ev.Status == "SUCCESS" && secondPayment(o, ev):
		return s.refundSecond(o, id, ev, &evRec, now)
	default:
		// Already settled (PAYED, PAY_BACK, or FAILED after the fact): record, change nothing.
		if err := s.store.Put(evRec.Key, evRec.Value); err != nil {
			return NotifyRetry, "retry"
		}
		return NotifyOK, "success"
	}
}

// refundMismatch closes open order id, which the provider reports paid but
// not as the order (msg: how), as refunded: PAY_BACK and a refund record of
// the amount the provider reports, never credited; the business (a ticket
// order) closes its own first.
func (s *Service) refundMismatch(id int64, ev Event, msg string) {
	defer s.orders.Lock(id)()
	o, err := s.Get(id)
	if err != nil || !OpenStatus(o.Status) {
		return
	}
	b := s.business(o.Biz)
	if b == nil && !o.coins() {
		// Its business is not registered yet (the node is starting: the
		// reconciler runs from New): it must record the refund first, or
		// its order would close CANCELLED beside a PAY_BACK — next run, as
		// apply answers a late payment "retry".
		s.cfg.Log.Warn("pay: mismatched payment of a business not registered yet", "order", o.OrderID, "biz", o.Biz)
		return
	}
	if b != nil {
		if err := b.Refunded(o); err != nil {
			s.cfg.Log.Warn("pay: business refund of a mismatched payment", "order", o.OrderID, "err", err)
			return // next run
		}
	}
	now := s.cfg.Now().UnixMilli()
	if st, _ := s.refundPayment(o, id, ev, eventRec(id, ev, o.Status, now), now, "paid not as the order ("+msg+"): refunded", ev.Amount); st == NotifyOK {
		s.cfg.Log.Warn("pay: payment not as the order refunded", "order", o.OrderID, "why", msg, "amount", ev.Amount)
	}
}

// rememberMismatch records durably that the provider's query reported ev, a
// payment of open order id not as the order, so that it is refunded
// whatever closes the order first (refundReported) — not only by
// refundMismatch past two timeouts: a ticket order's sweep closes its pay
// order at the deadline (CloseBizOrder), this reconciler closes an order
// the provider stops answering about, and a closed order is never queried
// again (its notifies may all be lost).
func (s *Service) rememberMismatch(id int64, ev Event) {
	key := persist.Key(prefixMismatch, uint64(id))
	if has, err := s.store.Has(key); err == nil && has {
		return // reported at an earlier run
	}
	v, _ := proto.Marshal(ev)
	if err := s.store.Put(key, v); err != nil {
		// The next query of the order reports it again.
		s.cfg.Log.Warn("pay: payment not as the order not remembered", "order", id, "err", err)
	}
}

// refundReported refunds each payment rememberMismatch recorded whose order
// has closed (IN_VALID) as a late payment not as its order is (apply: its
// business records the refund first, then PAY_BACK with a refund record and
// the event — once: a redelivery is a duplicate), and forgets those whose
// order is settled. An open order's is left to its queries
// (refundMismatch); one whose refund must wait (its business not
// registered yet, a store error) is tried again at the next run.
func (s *Service) refundReported() {
	type reported struct {
		id int64
		ev Event
	}
	var list []reported
	err := s.store.Scan(prefixMismatch, func(k, v []byte) error {
		var ev Event
		if err := proto.Unmarshal(v, &ev); err != nil {
			s.cfg.Log.Error("pay: unreadable record of a payment not as the order", "key", k, "err", err)
			return nil
		}
		list = append(list, reported{int64(persist.KeyID(k)), ev})
		return nil
	})
	if err != nil {
		s.cfg.Log.Warn("pay: payments not as the order not read, next run", "err", err)
		return
	}
	for _, r := range list {
		o, err := s.Get(r.id)
		bizPaid := false
		if err == nil && o.Status == StatusInvalid {
			st, msg := s.apply(o.Channel, r.ev)
			if o, err = s.Get(r.id); err == nil && o.Status == StatusInvalid {
				if st != NotifyConflict {
					s.cfg.Log.Warn("pay: payment not as the order not refunded yet, next run", "order", o.OrderID, "status", st, "msg", msg)
					continue
				}
				// 409 leaves a closed order as it was only when its
				// business took another payment of it (Refunded answered
				// ErrBizPaid: its PAYED write was lost before the close):
				// as a PAYED order's, below. (Kept, it was tried and
				// warned about at every run, for good.)
				bizPaid = true
			}
		}
		switch {
		case err != nil && proto.AsError(err).Code != proto.CodeNotFound:
			continue // a store error: next run
		case err == nil && OpenStatus(o.Status):
			continue
		case err == nil && secondPayment(o, r.ev):
			// Settled by another transaction after the query had reported
			// this one: a second payment, recorded for refund of the
			// amount reported (once per transaction; next run on a
			// failure).
			if !s.refundSecondReported(r.id, r.ev) {
				continue
			}
		case err == nil && (o.Status == StatusPayed || bizPaid):
			// Paid as the order by another event after the query had
			// reported this one, and the two not told apart (no txn_id on
			// one of them): the payment it took stands — this one is for
			// an operator.
			s.cfg.Log.Error("pay: a paid order's payment not as the order was not refunded", "order", o.OrderID,
				"event", r.ev.EventID, "amount", r.ev.Amount)
		case err == nil && o.Status == StatusPayBack && o.EventID != r.ev.EventID:
			// Refunded for another payment (a late one, not this report's)
			// and the two not told apart: this one is for an operator too.
			s.cfg.Log.Error("pay: a refunded order's payment not as the order was not refunded", "order", o.OrderID,
				"event", r.ev.EventID, "amount", r.ev.Amount)
		}
		if err := s.store.DeleteNoSync(persist.Key(prefixMismatch, uint64(r.id))); err != nil {
			s.cfg.Log.Warn("pay: record of a payment not as the order not dropped, next run", "order", r.id, "err", err)
		}
	}
}

// sameEvent reports whether prev, the order's record of an event with ev's
// id, is ev's own — a duplicate of this notify — and not the id reused by a
// declined attempt (FAILED) now reporting the payment. (Records are per
// order: another order's use of the id is not seen here.) A record that
// does not decode counts as ev's (a duplicate, as before).
func sameEvent(prev []byte, ev Event) bool {
	var rec eventRecord
	if proto.Unmarshal(prev, &rec) != nil {
		return true
	}
	return ev.Status != "SUCCESS" || rec.Event.Status != "FAILED"
}

// eventRec is the durable record of event ev applied to order id in status
// before.
func eventRec(id int64, ev Event, before string, now int64) persist.Record {
	v, _ := proto.Marshal(eventRecord{Event: ev, StatusBefore: before, At: now})
	return persist.Record{Key: EventRecordKey(id, ev.EventID), Value: v}
}

// secondPayment reports whether SUCCESS ev, as settled order o (amount and
// channel), is another payment than the one that settled it: both carry the
// provider's transaction id, and they differ. Without both ids a second
// payment cannot be told from the same one re-sent under a new event id
// (a paid-by-query order's "query:" event is one): it is recorded only.
func secondPayment(o Order, ev Event) bool {
	return (o.Status == StatusPayed || o.Status == StatusPayBack) &&
		ev.TxnID != "" && o.TxnID != "" && string(ev.TxnID) != o.TxnID
}

// refundSecondReported records for refund ev, a payment not as its order
// that a query reported for order id (rememberMismatch), now that another
// transaction settled the order — under the event's and the order's locks,
// as a notify of it would be. False: not done, try again (a store error).
func (s *Service) refundSecondReported(id int64, ev Event) bool {
	defer s.events.Lock(eventLockKey(ev.EventID))()
	defer s.orders.Lock(id)()
	o, err := s.Get(id)
	if err != nil {
		return false
	}
	if ev.Status != "SUCCESS" || !secondPayment(o, ev) {
		return true
	}
	// The event id may have a record already: a notify of this payment
	// applied meanwhile (its refund then recorded, once per transaction),
	// or another payment's under the same id (a query's answers without an
	// event_id are all "query:<order>") — that record is never replaced,
	// and this transaction's refund is recorded all the same.
	has, err := s.store.Has(EventRecordKey(id, ev.EventID))
	if err != nil {
		return false
	}
	now := s.cfg.Now().UnixMilli()
	var evRec *persist.Record
	if !has {
		r := eventRec(id, ev, o.Status, now)
		evRec = &r
	}
	st, _ := s.refundSecond(o, id, ev, evRec, now)
	return st == NotifyOK
}

// SecondPaymentKey is where the refund record of transaction txn, a second
// payment of order, is kept (JSON: order_id, amount, event_id, txn_id,
// reason, at).
func SecondPaymentKey(order int64, txn string) []byte {
	return append(persist.Key(prefixSecondPay, uint64(order)), txn...)
}

// refundSecond records ev, a second payment of settled order o, for refund:
// a refund record of its amount under its transaction id, the event, a row
// of the order's log; the order keeps its status and its first payment
// (credited, or refunded, as it was). Once per transaction: another event
// of the same transaction is recorded only. The event's record evRec is
// written only when given (nil: the event id has a record already — never
// replaced).
func (s *Service) refundSecond(o Order, id int64, ev Event, evRec *persist.Record, now int64) (int, string) {
	key := SecondPaymentKey(id, string(ev.TxnID))
	has, err := s.store.Has(key)
	if err != nil {
		return NotifyRetry, "retry"
	}
	if has && evRec == nil {
		return NotifyOK, "success" // recorded already, nothing to write
	}
	why := "second payment " + string(ev.TxnID) + ": refunded"
	rv, _ := proto.Marshal(map[string]any{"order_id": o.OrderID, "amount": ev.Amount, "event_id": ev.EventID,
		"txn_id": ev.TxnID, "reason": why, "at": now})
	err = s.store.Apply(func(b *persist.Batch) error {
		if evRec != nil {
			if err := b.Set(evRec.Key, evRec.Value, nil); err != nil {
				return err
			}
		}
		if has {
			return nil
		}
		if err := b.Set(key, rv, nil); err != nil {
			return err
		}
		return s.logTransition(b, id, o.Status, o.Status, why, now)
	})
	if err != nil {
		return NotifyRetry, "retry"
	}
	if !has {
		s.cfg.Log.Warn("pay: second payment of a settled order recorded for refund", "order", o.OrderID,
			"txn", ev.TxnID, "first_txn", o.TxnID, "amount", ev.Amount)
	}
	return NotifyOK, "success"
}

// refundLate records a payment that arrived after its order closed as
// refunded (PAY_BACK + a refund record + the event), never credited.
func (s *Service) refundLate(o Order, id int64, ev Event, evRec persist.Record, now int64) (int, string) {
	return s.refundPayment(o, id, ev, evRec, now, "paid after close: refunded", o.Amount)
}

// refundPayment records o's payment ev as refunded, never credited: o
// PAY_BACK (note why), a refund record of amount, the event.
func (s *Service) refundPayment(o Order, id int64, ev Event, evRec persist.Record, now int64, why string, amount int64) (int, string) {
	from := o.Status
	if !CanMove(from, StatusPayBack) {
		return NotifyConflict, "order is " + from + ": cannot be refunded"
	}
	o.Status, o.UpdatedAt, o.EventID, o.TxnID, o.Note = StatusPayBack, now, ev.EventID, string(ev.TxnID), why
	ov, _ := proto.Marshal(o)
	rr := refundRecord(o, id, amount, ev.EventID, why, now)
	err := s.store.Apply(func(b *persist.Batch) error {
		if err := b.Set(orderKey(id), ov, nil); err != nil {
			return err
		}
		if err := b.Set(rr.Key, rr.Value, nil); err != nil {
			return err
		}
		if err := b.Set(evRec.Key, evRec.Value, nil); err != nil {
			return err
		}
		return s.logTransition(b, id, from, StatusPayBack, why, now)
	})
	if err != nil {
		s.openWritten(id, o, false) // a paying business order's refund may have landed
		return NotifyRetry, "retry"
	}
	s.closeOpen(id)
	s.pushStatus(o)
	return NotifyOK, "success"
}

// markPaid moves o to PAYED and credits its coins in one durable ledger op
// (the order's new state and the event record ride in the same batch), exactly
// once per order whatever the number of events.
func (s *Service) markPaid(o Order, id int64, ev Event, evRec persist.Record, now int64) (int, string) {
	if !o.coins() {
		return s.markBizPaid(o, id, ev, evRec, now)
	}
	from := o.Status
	o.Status, o.UpdatedAt, o.PaidAt, o.EventID, o.TxnID = StatusPayed, now, ev.PaidAt, ev.EventID, string(ev.TxnID)
	ov, _ := proto.Marshal(o)
	// In doubt from before the call: the wallet may tell its outcome
	// (onSettled, which clears the mark when it did not run) before Apply
	// returns — a mark set after would then stay for good, and the order
	// never close.
	s.setCreditDoubt(id, true)
	res, err := s.wallet.Apply(persist.Op{
		User:     o.UserID,
		ReqID:    "pay:" + o.OrderID,
		Postings: []persist.Posting{{User: o.UserID, Delta: o.Coins, Reason: persist.ReasonRecharge, Ref: "order " + o.OrderID}},
		Static: []persist.Record{
			{Key: orderKey(id), Value: ov},
			evRec,
			s.transitionRecord(id, from, StatusPayed, "paid "+ev.EventID, now),
		},
	})
	if err != nil {
		s.openWritten(id, o, false)
		if errors.Is(err, persist.ErrWalletUnavailable) || errors.Is(err, persist.ErrBalanceLimit) { // nothing moved
			s.setCreditDoubt(id, false)
		}
		s.cfg.Log.Error("pay: credit failed", "order", o.OrderID, "err", err)
		return NotifyRetry, "retry"
	}
	s.closeOpen(id)
	if !res.Replayed {
		d, _ := proto.Marshal(creditPush{Balance: res.Balances[0], Delta: o.Coins, OrderID: o.OrderID, Reason: persist.ReasonRecharge})
		s.router.SendUser(o.UserID, proto.Push{Biz: proto.BizWalletCredit, Data: d, Ack: true})
		s.pushStatus(o)
	}
	return NotifyOK, "success"
}

// markBizPaid routes a paid event of a business order to its business
// (SPEC §4): the business takes it (PAYED) or refuses it as closed
// (PAY_BACK, refunded); the pay order's new state is recorded after the
// business answered, so a crash in between is a redelivery to an idempotent
// business.
func (s *Service) markBizPaid(o Order, id int64, ev Event, evRec persist.Record, now int64) (int, string) {
	b := s.business(o.Biz)
	if b == nil {
		s.cfg.Log.Error("pay: paid event of an unknown business", "order", o.OrderID, "biz", o.Biz)
		return NotifyRetry, "retry"
	}
	switch err := b.Paid(o); {
	case errors.Is(err, ErrBizClosed):
		return s.refundLate(o, id, ev, evRec, now)
	case err != nil:
		s.cfg.Log.Error("pay: business paid", "order", o.OrderID, "biz", o.Biz, "err", err)
		return NotifyRetry, "retry"
	}
	return s.recordBizPaid(o, id, ev, evRec, now)
}

// recordBizPaid records a business order PAYED with its event, the
// business having taken the payment.
func (s *Service) recordBizPaid(o Order, id int64, ev Event, evRec persist.Record, now int64) (int, string) {
	from := o.Status
	o.Status, o.UpdatedAt, o.PaidAt, o.EventID, o.TxnID = StatusPayed, now, ev.PaidAt, ev.EventID, string(ev.TxnID)
	ov, _ := proto.Marshal(o)
	err := s.store.Apply(func(bt *persist.Batch) error {
		if err := bt.Set(orderKey(id), ov, nil); err != nil {
			return err
		}
		if err := bt.Set(evRec.Key, evRec.Value, nil); err != nil {
			return err
		}
		return s.logTransition(bt, id, from, StatusPayed, "paid "+ev.EventID, now)
	})
	if err != nil {
		s.openWritten(id, o, false)
		return NotifyRetry, "retry"
	}
	s.closeOpen(id)
	return NotifyOK, "success"
}

// moveLocked moves o to status (guarded), with the order's lock held.
func (s *Service) moveLocked(o *Order, id int64, to, why string, extra *persist.Record) error {
	if !CanMove(o.Status, to) {
		return proto.Errorf(proto.CodeOrderState, "order is %s; cannot move to %s", o.Status, to)
	}
	if to == StatusInvalid && s.creditInDoubt(id) {
		return errCreditInDoubt
	}
	from := o.Status
	now := s.cfg.Now().UnixMilli()
	o.Status, o.UpdatedAt, o.Note = to, now, why
	ov, _ := proto.Marshal(o)
	err := s.store.Apply(func(b *persist.Batch) error {
		if err := b.Set(orderKey(id), ov, nil); err != nil {
			return err
		}
		if extra != nil {
			if err := b.Set(extra.Key, extra.Value, nil); err != nil {
				return err
			}
		}
		return s.logTransition(b, id, from, to, why, now)
	})
	if err != nil {
		s.openWritten(id, *o, false)
		o.Status = from
		return err
	}
	if !OpenStatus(to) {
		s.closeOpen(id)
	} else {
		s.openWritten(id, *o, true)
	}
	s.pushStatus(*o)
	return nil
}

// addOpen tracks open order o (just durably written) for the reconciler;
// counted = it counts towards its user's MaxOpenPerUser (recharge orders; a
// business's orders are bounded by the business).
func (s *Service) addOpen(id int64, o Order, counted bool) {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if _, ok := s.open[id]; !ok {
		s.open[id] = openOrder{created: o.CreatedAt, user: o.UserID, counted: counted, order: &o}
		if counted {
			s.openOf[o.UserID]++
		}
	}
}

// openWritten records o as open order id's last durable write (with the
// order's lock held); ok = false: the write's outcome is unknown, the next
// Get reads the store.
func (s *Service) openWritten(id int64, o Order, ok bool) {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if oo, found := s.open[id]; found {
		oo.order = nil
		if ok {
			oo.order = &o
		}
		s.open[id] = oo
	}
}

// errCreditInDoubt refuses to close an order whose credit may still land.
var errCreditInDoubt = errors.New("pay: the order's credit is in doubt (the wallet settles it): not closed")

// setCreditDoubt marks (or clears) open order id's credit as in doubt.
func (s *Service) setCreditDoubt(id int64, doubt bool) {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if oo, found := s.open[id]; found {
		oo.creditDoubt = doubt
		s.open[id] = oo
	}
}

// creditInDoubt reports whether open order id's credit is in doubt.
func (s *Service) creditInDoubt(id int64) bool {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	return s.open[id].creditDoubt
}

func (s *Service) closeOpen(id int64) {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	o, ok := s.open[id]
	if !ok {
		return
	}
	delete(s.open, id)
	if !o.counted {
		return
	}
	s.cfg.SharedOpen.Drop(uint64(o.user), strconv.FormatInt(id, 10)) // never blocks
	if s.openOf[o.user]--; s.openOf[o.user] <= 0 {
		delete(s.openOf, o.user)
	}
}

// keepOpenOrders keeps the places (SharedOpen) of the counted open orders
// ids, each until its own deadline.
func (s *Service) keepOpenOrders(ids []int64) {
	for _, id := range ids {
		for !s.keepOpen(id) {
			select {
			case <-s.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond): // the queue is busy: later
			}
		}
	}
}

// keepOpen queues the keep of open order id's place if it is still open and
// counted: under openMu, as closeOpen queues its drop, so a keep never comes
// after the drop of a closed order. false: the queue is busy, try again.
func (s *Service) keepOpen(id int64) bool {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	oo, open := s.open[id]
	if !open || !oo.counted {
		return true // closed meanwhile (its drop is queued already), or not counted
	}
	ttl := s.openHold() - time.Duration(s.cfg.Now().UnixMilli()-oo.created)*time.Millisecond
	return s.cfg.SharedOpen.TryKeep(uint64(oo.user), strconv.FormatInt(id, 10), ttl)
}

// openHold is how long an order counts towards SharedOpen at most: an
// unpaid order closes by twice OrderTimeout (the provider not answering),
// so a place whose drop was lost (a node died) frees itself after that.
func (s *Service) openHold() time.Duration { return 2*s.cfg.OrderTimeout + time.Minute }

func (s *Service) openCount(user int64) int {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	return s.openOf[user]
}

// creditPush is the data of the wallet.credit push of a paid recharge.
type creditPush struct {
	Balance int64  `json:"balance"`
	Delta   int64  `json:"delta"`
	OrderID string `json:"order_id"`
	Reason  string `json:"reason"`
}

// onSettled is told by the wallet the outcome of a credit it answered in
// doubt (markPaid answered the provider "retry"): one that landed gets its
// pushes now — the provider's redelivery replays it and pushes nothing, and
// may not come at all (the order was PAYED by the op's own records).
func (s *Service) onSettled(st persist.Settled) {
	orderID, ok := strings.CutPrefix(st.ReqID, "pay:")
	if !ok {
		return
	}
	id, err := strconv.ParseInt(orderID, 10, 64)
	if err != nil {
		return
	}
	if !st.Ran || len(st.Result.Balances) == 0 || len(st.Postings) == 0 {
		// It did not land: the order may close. Under the order's lock: a
		// redelivery's markPaid holds it from marking its own attempt in
		// doubt until its Apply returned — cleared in between, the mark of
		// a second attempt (one that can start once this one's request is
		// released, right after this) would be lost, and the order closed
		// while a credit of it may still land. markPaid's Apply does not
		// wait for this request meanwhile (it is unsettled: ErrInProgress
		// at once), so the lock is never held against this.
		defer s.orders.Lock(id)()
		s.setCreditDoubt(id, false)
		return
	}
	s.closeOpen(id) // PAYED by the op's records
	// Under the order's lock, and only while it is still PAYED: an admin
	// refund that came first pushed its own PAY_BACK (and the debit's
	// balance) — a late PAYED and an older balance after it would be
	// stale.
	defer s.orders.Lock(id)()
	if o, err := s.Get(id); err != nil || o.Status != StatusPayed {
		return
	}
	d, _ := proto.Marshal(creditPush{Balance: st.Result.Balances[0], Delta: st.Postings[0].Delta, OrderID: orderID, Reason: persist.ReasonRecharge})
	s.router.SendUser(st.User, proto.Push{Biz: proto.BizWalletCredit, Data: d, Ack: true})
	s.pushStatus(Order{OrderID: orderID, UserID: st.User, Status: StatusPayed})
}

// statusPush is the data of an order.status push.
type statusPush struct {
	OrderID string `json:"order_id"`
	Status  string `json:"status"`
}

func (s *Service) pushStatus(o Order) {
	if !o.coins() {
		return // a business pushes its own order's statuses
	}
	d, _ := proto.Marshal(statusPush{OrderID: o.OrderID, Status: o.Status})
	s.router.SendUser(o.UserID, proto.Push{Biz: proto.BizOrderStatus, Data: d, Ack: true})
}

// Refund refunds a PAYED order: the coins are debited back (refused with
// 20001 if already spent) and the order moves to PAY_BACK, atomically.
func (s *Service) Refund(id int64) (Order, error) {
	defer s.orders.Lock(id)()
	o, err := s.Get(id)
	if err != nil {
		return o, err
	}
	if !CanMove(o.Status, StatusPayBack) || o.Status != StatusPayed {
		return o, proto.Errorf(proto.CodeOrderState, "order is %s; only PAYED orders are refunded", o.Status)
	}
	if !o.coins() {
		// A business order (tickets) bought something other than coins:
		// marking it PAY_BACK here would leave what it bought (the seats
		// sold) with the buyer. Its business has no refund yet.
		return o, proto.Errorf(proto.CodeOrderState, "order of business %q: refunded through its business, not here", o.Biz)
	}
	now := s.cfg.Now().UnixMilli()
	o.Status, o.UpdatedAt, o.Note = StatusPayBack, now, "refunded"
	ov, _ := proto.Marshal(o)
	// The money owed back is recorded with the coins' debit, as for every
	// other PAY_BACK (refundPayment): before, an admin refund left no
	// rec/refund row — the list of payments to give back missed it.
	_, err = s.wallet.Apply(persist.Op{User: o.UserID, ReqID: "refund:" + o.OrderID,
		Postings: []persist.Posting{{User: o.UserID, Delta: -o.Coins, Reason: persist.ReasonRefund, Ref: "order " + o.OrderID}},
		Static: []persist.Record{{Key: orderKey(id), Value: ov}, refundRecord(o, id, o.Amount, o.EventID, "admin refund", now),
			s.transitionRecord(id, StatusPayed, StatusPayBack, "refund", now)}})
	if errors.Is(err, persist.ErrInsufficient) {
		return o, proto.Errorf(proto.CodeInsufficientBalance, "the coins were already spent")
	}
	if err != nil {
		return o, err
	}
	s.pushStatus(o)
	return o, nil
}

// refusedUnlessElsewhere is refusal for a new order of (user, req) — unless
// the req_id is bound to an order made through another node (a retry of
// it: pointed at it, OrderElsewhere), or Redis could not say (it may be
// one: "retry", not the refusal). claims nil: a single node, refusal.
func (s *Service) refusedUnlessElsewhere(claims ReqClaims, user int64, req string, refusal error) error {
	if claims == nil {
		return refusal
	}
	switch prev, err := claims.Bound(user, req); {
	case err != nil:
		s.cfg.Log.Warn("pay: reading a req_id binding failed", "user", user, "err", err)
		return errClaimUnavailable
	case prev != 0:
		return &OrderElsewhere{ID: prev}
	}
	return refusal
}

// atOpenBound reports whether user has MaxOpenPerUser open orders on this
// node.
func (s *Service) atOpenBound(user int64) bool {
	m := s.cfg.MaxOpenPerUser
	return m > 0 && s.openCount(user) >= m
}

// loop reconciles stuck orders and closes expired ones.
func (s *Service) loop() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.ReconcileEvery)
	defer t.Stop()
	var lastPrune time.Time
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.Reconcile()
			if s.cfg.ReqClaims != nil && time.Since(lastPrune) >= time.Hour {
				lastPrune = time.Now()
				s.pruneBound()
			}
		}
	}
}

// Reconcile queries the provider about every order PAYING longer than
// ReconcileAfter (notifies get lost) that is not being queried already, on
// at most ReconcileWorkers goroutines, those due to close first (an order
// past its timeout is closed when the provider does not know it as paid),
// then the rest by their deadlines. It returns once every such order has
// its query started (waiting for a worker as they free up: a run is not
// bounded at ReconcileWorkers orders, and an order whose query hangs, until
// its QueryTimeout, holds only its own worker); it does not wait for the
// last queries to end. What a query learns is applied; an order past its
// deadline is closed at the provider instead of queried (reconcileOne).
// First, the payments not as their order that a query reported are
// refunded if their order has closed since (refundReported); last, up to
// unaskedPerRun orders closed here without being closed at the provider
// are closed there (reconcileClosed).
func (s *Service) Reconcile() {
	s.refundReported()
	type due struct {
		id, at int64
		closed bool // rec/payunasked: a closed order (reconcileClosed)
	}
	now := s.cfg.Now().UnixMilli()
	s.openMu.Lock()
	var list []due
	for id, o := range s.open {
		if s.inflight[id] || now-o.created < s.cfg.ReconcileAfter.Milliseconds() {
			continue
		}
		at := o.created + s.cfg.OrderTimeout.Milliseconds()
		if o.order != nil && o.order.ExpiresAt > o.order.CreatedAt {
			at = o.order.ExpiresAt // a business order's own deadline
		}
		list = append(list, due{id: id, at: at})
	}
	s.openMu.Unlock()
	slices.SortFunc(list, func(a, b due) int { return cmp.Compare(a.at, b.at) })
	for _, id := range s.unasked() {
		list = append(list, due{id: id, closed: true})
	}
	for _, d := range list {
		select {
		case s.workers <- struct{}{}:
		case <-s.stop:
			return
		}
		select {
		case <-s.stop:
			<-s.workers
			return
		default:
		}
		s.openMu.Lock()
		if _, open := s.open[d.id]; (!open && !d.closed) || s.inflight[d.id] {
			s.openMu.Unlock()
			<-s.workers // closed or being queried since the list was made
			continue
		}
		s.inflight[d.id] = true
		s.wg.Add(1)
		s.openMu.Unlock()
		go func(d due) {
			defer s.wg.Done()
			if d.closed {
				s.reconcileClosed(d.id)
			} else {
				s.reconcileOne(d.id)
			}
			s.openMu.Lock()
			delete(s.inflight, d.id)
			s.openMu.Unlock()
			<-s.workers
		}(d)
	}
}

// unaskedPerRun bounds the closed orders one reconciler run closes at the
// provider (reconcileClosed): a flash sale's sweep closes thousands at
// once, and a provider that does not answer holds a worker QueryTimeout
// for each. The next run goes on after the last one listed, so an order
// the provider never answers about does not keep the others from theirs
// (and is dropped past UnaskedRetention).
const unaskedPerRun = 128

// unasked lists up to unaskedPerRun orders of rec/payunasked, from after
// the last run's.
func (s *Service) unasked() []int64 {
	from := s.unaskedFrom.Load()
	var ids []int64
	add := func(k, _ []byte) (bool, error) {
		ids = append(ids, int64(persist.KeyID(k)))
		return len(ids) < unaskedPerRun, nil
	}
	err := s.store.ScanRange(persist.Key(prefixUnasked, uint64(from)), persist.PrefixEnd(prefixUnasked), add)
	if err == nil && len(ids) < unaskedPerRun && from > 0 {
		err = s.store.ScanRange(prefixUnasked, persist.Key(prefixUnasked, uint64(from)), add) // around
	}
	if err != nil {
		s.cfg.Log.Warn("pay: closed orders to query not read, next run", "err", err)
	}
	next := int64(0)
	if len(ids) == unaskedPerRun {
		next = ids[len(ids)-1] + 1
	}
	s.unaskedFrom.Store(next)
	return ids
}

// unaskedRecord is rec/payunasked/<id>: order id, closed now without being
// closed at the provider, is closed there after its close.
func unaskedRecord(id int64) *persist.Record {
	return &persist.Record{Key: persist.Key(prefixUnasked, uint64(id)), Value: []byte{}}
}

// reconcileClosed asks the provider to close order id, closed here
// (IN_VALID) without its word that it was not paid (rec/payunasked):
// closeAtProvider, whose answer reports a payment as a query's does. A
// payment it reports is applied as its notify would be — a late payment:
// refunded once, its business told first (or, one the business took before
// the close, PAYED) — and the record is dropped once the order is settled
// or the provider has closed it (no payment of it can come). No answer, or
// a payment that could not be applied yet (its business not registered, a
// store error): the next run asks again — past UnaskedRetention from the
// order's close with no answer, it is logged for an operator, counted and
// dropped.
func (s *Service) reconcileClosed(id int64) {
	key := persist.Key(prefixUnasked, uint64(id))
	forget := func() bool {
		if err := s.store.DeleteNoSync(key); err != nil {
			s.cfg.Log.Warn("pay: record of a closed order to query not dropped, next run", "order", id, "err", err)
			return false
		}
		return true
	}
	o, err := s.Get(id)
	switch {
	case err != nil && proto.AsError(err).Code == proto.CodeNotFound:
		forget()
		return
	case err != nil:
		return // a store error: next run
	case o.Status != StatusInvalid:
		forget() // settled since (a late notify), or open again (never: a record of a failed close)
		return
	}
	ev, answer := s.closeAtProvider(o)
	switch answer {
	case queryUnknown:
		if s.ctx.Err() != nil {
			return // shutting down: the request was cancelled, it said nothing
		}
		if since := time.Duration(s.cfg.Now().UnixMilli()-o.UpdatedAt) * time.Millisecond; since >= s.cfg.UnaskedRetention {
			// The provider has not answered about it since its close (the
			// order's last write): no run may ask for ever. An operator
			// checks it at the provider by hand — a payment found there
			// is refunded by hand. Logged and counted once: when the
			// record is gone (a failed delete is tried at the next run).
			if !forget() {
				return
			}
			s.cfg.Log.Warn("pay: closed order dropped from the provider queries: no answer within the retention; check it at the provider",
				"order", o.OrderID, "user", o.UserID, "amount", o.Amount, "closed_at", time.UnixMilli(o.UpdatedAt).UTC(),
				"retention", s.cfg.UnaskedRetention)
			s.unaskedDropped.Inc()
		}
		return
	case queryClosed:
		forget()
		return
	}
	st, msg := s.apply(o.Channel, ev)
	cur, err := s.Get(id)
	switch {
	case err != nil:
		return
	case cur.Status == StatusInvalid && st == NotifyConflict:
		// Not as the order, and its business took another payment of it
		// (apply: ErrBizPaid): this one is for an operator, as a paid
		// order's is (refundReported).
		s.cfg.Log.Error("pay: a closed order's payment not as the order was not refunded: its business took another", "order", o.OrderID,
			"event", ev.EventID, "amount", ev.Amount)
	case cur.Status == StatusInvalid:
		s.cfg.Log.Warn("pay: payment of a closed order not applied yet, next run", "order", o.OrderID, "status", st, "msg", msg)
		return
	}
	s.cfg.Log.Warn("pay: payment of a closed order found by a close at the provider", "order", o.OrderID, "event", ev.EventID,
		"amount", ev.Amount, "status", cur.Status)
	forget()
}

// reconcileOne queries the provider about open order id and acts on it;
// an order past its deadline is closed at the provider instead
// (closeAtProvider: its answer reports a payment as a query's does).
func (s *Service) reconcileOne(id int64) {
	o, err := s.Get(id)
	if err != nil {
		if proto.AsError(err).Code == proto.CodeNotFound {
			s.closeOpen(id)
		} else {
			s.cfg.Log.Warn("pay: reconcile: order not read, next run", "order", id, "err", err)
		}
		return // a store error: still open, looked at again next run
	}
	if !OpenStatus(o.Status) {
		s.closeOpen(id)
		return
	}
	age, timeout := s.cfg.Now().UnixMilli()-o.CreatedAt, s.cfg.OrderTimeout.Milliseconds()
	if o.ExpiresAt > o.CreatedAt {
		timeout = o.ExpiresAt - o.CreatedAt // a business order's own deadline
	}
	ask := s.query
	if age >= timeout {
		ask = s.closeAtProvider
	}
	ev, answer := ask(o)
	switch answer {
	case queryPaid:
		st, msg := s.apply(o.Channel, ev)
		if st != NotifyOK {
			s.cfg.Log.Warn("pay: reconcile apply", "order", o.OrderID, "status", st, "msg", msg)
		}
		if st == NotifyConflict && ev.Amount != o.Amount {
			s.rememberMismatch(id, ev)
		}
		if st == NotifyConflict && age >= 2*timeout {
			// Paid, says the provider, but not as the order (another
			// amount or channel): never credited. Past two timeouts the
			// order stops holding the user's open-order place and being
			// queried for ever: it is closed and the payment refunded.
			s.refundMismatch(id, ev, msg)
		}
		return
	case queryUnknown:
		if s.ctx.Err() != nil {
			return // shutting down: the request was cancelled, it said nothing
		}
	}
	// An expired order closes when the provider has closed it (no payment
	// of it can come); when the provider cannot tell (down, slow,
	// unverifiable answer) only after a second timeout, kept to be closed
	// at the provider after its close (rec/payunasked: a payment that
	// lands meanwhile is refunded).
	if age >= timeout && (answer == queryClosed || age >= 2*timeout) {
		s.closeLocal(&o, id, "unpaid timeout", answer == queryClosed)
	}
}

// closeLocal closes open order id here (IN_VALID, why), under its lock;
// closedThere: the provider closed it (closeAtProvider), else it is kept to
// be closed there after its close (rec/payunasked, in the closing batch).
func (s *Service) closeLocal(o *Order, id int64, why string, closedThere bool) {
	var unasked *persist.Record
	if !closedThere {
		unasked = unaskedRecord(id)
	}
	defer s.orders.Lock(id)()
	if cur, err := s.Get(id); err == nil && OpenStatus(cur.Status) {
		if err := s.moveLocked(&cur, id, StatusInvalid, why, unasked); err != nil {
			s.cfg.Log.Error("pay: close unpaid order", "order", o.OrderID, "err", err)
		}
	}
}

// queryAnswer is what an active query or a close at the provider learnt.
type queryAnswer int

const (
	queryUnknown queryAnswer = iota // no verified answer: transport error, timeout, cancelled, bad status or signature
	queryNotPaid                    // the provider's verified answer: not paid (or no provider to ask)
	queryPaid
	// queryClosed: the provider's verified answer to a close
	// (closeAtProvider): the order is closed there, it can no longer be
	// paid (or there is no provider to pay it at).
	queryClosed
)

// query asks the provider for the order's payment. The answer is signed like
// a notify and verified the same way.
func (s *Service) query(o Order) (Event, queryAnswer) {
	if s.cfg.ProviderURL == "" {
		return Event{}, queryNotPaid
	}
	ev, ok := s.ask(o, http.MethodGet, "/query?order_id="+url.QueryEscape(o.OrderID), nil)
	switch {
	case !ok:
		return Event{}, queryUnknown
	case ev.Status != "SUCCESS":
		return Event{}, queryNotPaid
	}
	return ev, queryPaid
}

// closeReq is the body of a close at the provider (POST
// <provider>/close?order_id=, the id again in the body), signed as a
// merchant's request (SignRequest: with each of Config.Secrets, so a
// rotation never leaves the provider unable to verify it; never as an
// answer is, so no signed answer replayed can close an order).
type closeReq struct {
	Op      string `json:"op"` // "close"
	OrderID string `json:"order_id"`
}

// closeAtProvider asks the provider to close o, unpaid on our side, as a
// real provider's close call does (Alipay trade.close, WeChat Pay
// closeorder): closed there, the order can no longer be paid — a buyer who
// pays it later is refused by the provider, so no payment of an order we
// closed can reach the provider unseen. Answers: queryClosed (closed for
// good, or no provider); queryPaid with the payment (the provider had it
// paid already: it is not closed, and the payment is applied as its notify
// would be); queryUnknown (no verified answer: closed or not, paid or not,
// nobody knows — the reconciler asks again, rec/payunasked). The answer is
// signed and verified as a query's is.
func (s *Service) closeAtProvider(o Order) (Event, queryAnswer) {
	if s.cfg.ProviderURL == "" {
		return Event{}, queryClosed
	}
	body, _ := proto.Marshal(closeReq{Op: "close", OrderID: o.OrderID})
	ev, ok := s.ask(o, http.MethodPost, "/close?order_id="+url.QueryEscape(o.OrderID), body)
	switch {
	case !ok:
		return Event{}, queryUnknown
	case ev.Status == "SUCCESS":
		return ev, queryPaid
	case ev.Status == "CLOSED":
		return Event{}, queryClosed
	}
	return Event{}, queryUnknown // neither closed nor paid: not what a close answers
}

// ask sends one request about o to the provider (a body is signed with the
// first secret) and returns its verified answer: a signed event of o.
func (s *Service) ask(o Order, method, path string, body []byte) (Event, bool) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.QueryTimeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.cfg.ProviderURL+path, rd)
	if err != nil {
		return Event{}, false
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set(SignatureHeader, SignRequest(s.cfg.Secrets, s.cfg.Now(), body))
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return Event{}, false
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return Event{}, false
	}
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode >= 400 && resp.StatusCode < 500 {
			// Not the provider being down: a request it refuses (our
			// signature, a secret rotated at one end only) stays
			// unanswered until an operator acts — say so.
			s.cfg.Log.Warn("pay: provider refused the request", "order", o.OrderID, "path", path, "status", resp.StatusCode,
				"answer", string(answer[:min(len(answer), 200)]))
		}
		return Event{}, false
	}
	if err := Verify(resp.Header.Get(SignatureHeader), answer, s.cfg.Secrets, s.cfg.Now(), s.cfg.Tolerance); err != nil {
		s.cfg.Log.Warn("pay: provider answer not verified", "order", o.OrderID, "path", path, "err", err)
		return Event{}, false
	}
	var ev Event
	if err := proto.Unmarshal(answer, &ev); err != nil || ev.OrderID != o.OrderID {
		return Event{}, false
	}
	if ev.Status == "SUCCESS" && ev.EventID == "" {
		ev.EventID = "query:" + o.OrderID
	}
	return ev, true
}

// Collectors returns the pay centre's Prometheus metrics.
func (s *Service) Collectors() []prometheus.Collector {
	return []prometheus.Collector{s.unaskedDropped}
}
