package gateway

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Payment orders in a cluster live in the Pebble of the node that made them
// (its worker id is in the order id). A request for an order made elsewhere —
// GET, an admin refund, the provider's webhook, which may land on any node —
// is forwarded over NATS to that node (le.pay.<node>), found through the
// worker lease in Redis. The owner alone moves the order, so the per-event and
// per-order locks, the durable records and the reconciliation of its open
// orders work as on one node: once cluster-wide. When the owner is down the
// request answers 503 (the provider retries its webhook; the order is durable
// in the owner's Pebble and served again when it is back).

// payForwardTimeout bounds one forwarded request (a webhook fsyncs there).
const payForwardTimeout = 5 * time.Second

// payForwardWorkers bounds the forwarded requests a node runs at once.
const payForwardWorkers = 64

var errOwnerDown = proto.Errorf(proto.CodeInternal, "the order's node is unreachable, retry")

// errLeaseGone is errOwnerDown when Redis answered: no node holds the
// worker id, and none was seen holding it within a lease's time — the
// one case a request for it can be told "not found" rather than "retry".
var errLeaseGone = fmt.Errorf("%w (no node holds its worker id)", errOwnerDown)

func paySubject(node string) string { return "le.pay." + node }

type payFwdReq struct {
	Op      string `json:"op"` // get | refund | notify | rp.prepare | rp.start | rp.cancel | rp.grab | rp.get
	ID      int64  `json:"id,omitempty"`
	Channel string `json:"channel,omitempty"`
	Sig     string `json:"sig,omitempty"`
	Body    []byte `json:"body,omitempty"`
	User    int64  `json:"user,omitempty"` // rp.*: the caller, authenticated by the forwarding node
	Code    string `json:"code,omitempty"` // rp.*
	// BudgetMS is how long the forwarding node waits, from when the owner
	// receives the request (relative: the two clocks may differ): a request
	// still queued on the owner after most of it is not run (its caller is
	// about to answer "retry").
	BudgetMS int64 `json:"budget_ms,omitempty"`
}

type payFwdRep struct {
	Order  *pay.Order   `json:"order,omitempty"`
	Err    *proto.Error `json:"err,omitempty"`
	Status int          `json:"status,omitempty"` // notify
	Body   string       `json:"body,omitempty"`   // notify
	Data   []byte       `json:"data,omitempty"`   // rp.*: the reply's d as JSON
}

// payOwner returns the node that owns order id: "" when it is this node (or
// not a cluster).
func (n *Node) payOwner(id int64) (string, error) {
	if n.Cluster == nil || n.worker == nil {
		return "", nil
	}
	if n.Pay.Has(id) || (n.Tickets != nil && n.Tickets.Has(id)) {
		// Made here, perhaps under a worker id this node no longer holds
		// (it came back under another, its old one taken meanwhile).
		return "", nil
	}
	return n.workerOwner(pay.WorkerOf(id))
}

// keyLastWorker is where a cluster node keeps the order-id worker id it
// leased last: it asks for that one first when it starts again (the ids it
// made carry it, and the cluster routes them by its lease), even if Redis
// lost the ids' owners meanwhile.
var keyLastWorker = []byte("rec/payworker")

// lastWorker returns the worker id st says this node leased last, or -1.
func lastWorker(st *persist.Store) int {
	v, err := st.Get(keyLastWorker)
	if err != nil {
		return -1
	}
	w, err := strconv.Atoi(string(v))
	if err != nil || w < 0 || w >= pay.MaxWorkers {
		return -1
	}
	return w
}

// workerOwner returns the node holding worker id w's lease ("" = this node).
// A lease Redis does not have (it restarted empty: its holder writes it
// again within a second, pay.WorkerLease) or cannot tell is taken to be
// still the node last seen holding it, within the lease's TTL — requests go
// where they went a moment ago rather than failing "unreachable".
func (n *Node) workerOwner(w int) (string, error) {
	if n.Cluster == nil || n.worker == nil || w == n.worker.ID() {
		return "", nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	owner, err := n.Redis.DoCache(ctx, n.Redis.B().Get().Key(pay.WorkerLeaseKey(w)).Cache(), 10*time.Second).ToString()
	if err != nil {
		switch seen, ok := n.owners.get(w, time.Now()); {
		case ok:
			owner = seen
		case rueidis.IsRedisNil(err):
			return "", errLeaseGone // no lease: its node is gone for longer than the lease
		default:
			return "", errOwnerDown // Redis could not tell
		}
	} else {
		n.owners.put(w, owner, time.Now())
	}
	if owner == n.Config.Node.ID {
		return "", nil
	}
	return owner, nil
}

// ownersSeen are the nodes last seen holding each worker id's lease (at
// most pay.MaxWorkers entries: keys come from Redis's answers).
type ownersSeen struct {
	mu sync.Mutex
	m  map[int]ownerSeen
}

type ownerSeen struct {
	node string
	at   time.Time
}

func (o *ownersSeen) put(w int, node string, now time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.m == nil {
		o.m = map[int]ownerSeen{}
	}
	o.m[w] = ownerSeen{node: node, at: now}
}

// touch renews when node was seen holding w's lease, if it is the one seen
// last (never inserts: only Redis's answers name a holder).
func (o *ownersSeen) touch(w int, node string, now time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if s, ok := o.m[w]; ok && s.node == node {
		o.m[w] = ownerSeen{node: node, at: now}
	}
}

// get returns the node seen holding w's lease within the lease's TTL.
func (o *ownersSeen) get(w int, now time.Time) (string, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	s, ok := o.m[w]
	if !ok || now.Sub(s.at) >= pay.DefaultLeaseTTL {
		return "", false
	}
	return s.node, true
}

// payForwardQueue bounds the forwarded requests waiting for one of the
// payForwardWorkers, and payForwardQueueBytes their bytes; beyond either a
// request is answered "busy" at once (the caller retries).
const (
	payForwardQueue      = 4096
	payForwardQueueBytes = 16 << 20
)

var errForwardBusy = proto.Errorf(proto.CodeInternal, "the order's node is busy, retry")

// payForward is a forwarded request and when it arrived.
type payForward struct {
	m       *nats.Msg
	arrived time.Time
}

// payForwards is the queue of forwarded requests and its workers: started as
// requests arrive, at most max at once, each ending when the queue is empty.
// running counts only real workers (a worker is counted in before it starts
// and out as it ends, never past max), so the hand-over below cannot strand
// a request.
type payForwards struct {
	serve   func(payFwdReq) payFwdRep
	log     *slog.Logger
	q       chan payForward
	max     int32
	running atomic.Int32
	// bytes are the queued requests' bytes, at most maxBytes.
	bytes    atomic.Int64
	maxBytes int64

	mu      sync.Mutex // orders arrive against stop
	closing atomic.Bool
	wg      sync.WaitGroup
}

func newPayForwards(serve func(payFwdReq) payFwdRep, log *slog.Logger, workers, queue int, queueBytes int64) *payForwards {
	return &payForwards{serve: serve, log: log, q: make(chan payForward, queue), max: int32(workers), maxBytes: queueBytes}
}

// servePayForwards answers the requests other nodes forward for this node's
// orders. The subscription's callback never waits: it queues the request
// (stamping its arrival, so one that waited for a worker longer than its
// caller does is dropped) or answers "busy" when the queue is full — a
// blocked callback would leave requests in the NATS client's own buffer,
// unbounded by us and unseen by the budget check.
func (n *Node) servePayForwards() error {
	setAnswerLimit(n.NC)
	f := newPayForwards(n.serveForward, n.Log, payForwardWorkers, payForwardQueue, payForwardQueueBytes)
	sub, err := n.NC.Subscribe(paySubject(n.Config.Node.ID), f.arrive)
	if err == nil {
		n.payFwd, n.payFwdSub = f, sub
	}
	return err
}

// tryStart counts one more worker in, unless max are running.
func (f *payForwards) tryStart() bool {
	for {
		n := f.running.Load()
		if n >= f.max {
			return false
		}
		if f.running.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (f *payForwards) arrive(m *nats.Msg) {
	f.mu.Lock()
	if f.closing.Load() {
		f.mu.Unlock()
		respond(m, payFwdRep{Err: errForwardBusy})
		return
	}
	size := int64(len(m.Data))
	if f.bytes.Add(size) > f.maxBytes {
		f.bytes.Add(-size)
		f.mu.Unlock()
		respond(m, payFwdRep{Err: errForwardBusy})
		return
	}
	select {
	case f.q <- payForward{m: m, arrived: time.Now()}:
	default:
		f.bytes.Add(-size)
		f.mu.Unlock()
		respond(m, payFwdRep{Err: errForwardBusy})
		return
	}
	start := f.tryStart() // else max run, and each looks at the queue before it ends
	if start {
		f.wg.Add(1)
	}
	f.mu.Unlock()
	if start {
		go f.work()
	}
}

// work serves queued requests until the queue is empty. A worker ending
// counts itself out first and then looks at the queue once more, so a
// request queued meanwhile (whose arrival found max running) is served.
func (f *payForwards) work() {
	defer f.wg.Done()
	for {
		select {
		case pf := <-f.q:
			f.bytes.Add(-int64(len(pf.m.Data)))
			if f.closing.Load() {
				respond(pf.m, payFwdRep{Err: errForwardBusy})
			} else {
				f.run(pf)
			}
			continue
		default:
		}
		f.running.Add(-1)
		if len(f.q) == 0 || !f.tryStart() {
			return
		}
	}
}

// stop ends the forwarding (the node is closing, its services next): what
// arrives or is still queued is answered "busy", and it returns once the
// requests already running are done.
func (f *payForwards) stop() {
	f.mu.Lock()
	f.closing.Store(true)
	f.mu.Unlock()
	f.wg.Wait()
	for {
		select {
		case pf := <-f.q:
			f.bytes.Add(-int64(len(pf.m.Data)))
			respond(pf.m, payFwdRep{Err: errForwardBusy})
		default:
			return
		}
	}
}

// run answers one forwarded request, unless its caller has given up already
// (no answer, nothing done).
func (f *payForwards) run(pf payForward) {
	var req payFwdReq
	if err := proto.Unmarshal(pf.m.Data, &req); err != nil {
		respond(pf.m, payFwdRep{Err: proto.BadRequest("bad forwarded request")})
		return
	}
	if req.BudgetMS > 0 && time.Since(pf.arrived) >= time.Duration(req.BudgetMS)*time.Millisecond*4/5 {
		f.log.Warn("forwarded request expired before it ran", "op", req.Op)
		return
	}
	respond(pf.m, f.serve(req))
}

// respond answers a NATS request with rep as JSON (a forwarded request, or
// a red-packet shard request).
func respond(m *nats.Msg, rep any) {
	b, _ := proto.Marshal(rep)
	out := &nats.Msg{Subject: m.Reply, Data: b}
	if int64(len(b)) > gzipAnswersOver.Load() {
		// A program view of 20,000 seats is ~1.3 MB of JSON; NATS takes
		// 1 MB by default. Seats compress well.
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		if _, err := zw.Write(b); err == nil && zw.Close() == nil && buf.Len() < len(b) {
			out.Data, out.Header = buf.Bytes(), nats.Header{answerEncoding: []string{"gzip"}}
		}
	}
	if err := m.RespondMsg(out); err != nil {
		// Still too large (or not sent): said now, not left to the caller's
		// timeout ("owner down" 5 s later).
		eb, _ := proto.Marshal(struct {
			Err *proto.Error `json:"err"`
		}{Err: proto.Errorf(proto.CodeInternal, "the answer could not be sent between nodes (%d bytes)", len(out.Data))})
		if rerr := m.Respond(eb); rerr != nil {
			slog.Warn("forwarded answer not sent", "subject", m.Subject, "err", err, "then", rerr)
		}
	}
}

// gzipAnswersOver is the size past which answers between nodes are gzipped
// (header answerEncoding; answerData reads them): just under what NATS takes
// (its max payload, set when a node connects; 1 MB by default) — an answer
// an older node could read is never gzipped (a rolling upgrade).
var gzipAnswersOver atomic.Int64

func init() { gzipAnswersOver.Store(1<<20 - answerHeadroom) }

// setAnswerLimit sets gzipAnswersOver from the NATS server's max payload.
func setAnswerLimit(nc *nats.Conn) {
	if p := nc.MaxPayload(); p > 2*answerHeadroom {
		gzipAnswersOver.Store(p - answerHeadroom)
	}
}

const (
	answerHeadroom = 4 << 10 // headers and the reply subject
	answerEncoding = "Le-Encoding"
	maxAnswerBytes = 64 << 20
)

// answerData is an answer's payload, gunzipped if it was gzipped (at most
// maxAnswerBytes).
func answerData(m *nats.Msg) ([]byte, error) {
	if m.Header.Get(answerEncoding) != "gzip" {
		return m.Data, nil
	}
	zr, err := gzip.NewReader(bytes.NewReader(m.Data))
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(zr, maxAnswerBytes+1))
	if err == nil && len(b) > maxAnswerBytes {
		err = errors.New("gateway: answer between nodes too large")
	}
	return b, err
}

// serveForward runs one forwarded request on this node.
func (n *Node) serveForward(req payFwdReq) payFwdRep {
	var rep payFwdRep
	switch req.Op {
	case "get", "refund":
		o, err := n.localOrderOp(req.Op, req.ID)
		if err != nil {
			rep.Err = n.wireErr(err)
		} else {
			rep.Order = &o
		}
	case "notify":
		rep.Status, rep.Body = n.localNotify(req.Channel, req.Sig, req.Body)
	case "rp.prepare", "rp.start", "rp.cancel", "rp.grab", "rp.get":
		rep.Data, rep.Err = n.redPacketLocal(req.Op, req.User, req.Code)
	case "tix.program", "tix.place", "tix.placed", "tix.get", "tix.cancel":
		rep.Data, rep.Err = n.ticketLocal(req.Op, req.User, req.ID, req.Body)
	default:
		rep.Err = proto.BadRequest("unknown forwarded op")
	}
	return rep
}

// forwardPay sends req to owner and waits for its answer.
func (n *Node) forwardPay(owner string, req payFwdReq) (payFwdRep, error) {
	var rep payFwdRep
	// The owner runs it only if it starts well before the caller gives up.
	req.BudgetMS = payForwardTimeout.Milliseconds()
	b, err := proto.Marshal(req)
	if err != nil {
		return rep, err
	}
	m, err := n.NC.Request(paySubject(owner), b, payForwardTimeout)
	if err != nil {
		if !errors.Is(err, nats.ErrNoResponders) && !errors.Is(err, nats.ErrTimeout) {
			n.Log.Warn("pay forward", "owner", owner, "op", req.Op, "err", err)
		}
		return rep, errOwnerDown
	}
	data, err := answerData(m)
	if err != nil {
		return rep, errOwnerDown
	}
	if err := proto.Unmarshal(data, &rep); err != nil {
		return rep, errOwnerDown
	}
	return rep, nil
}

// orderOp runs get or refund on the order's node.
func (n *Node) orderOp(op string, id int64) (pay.Order, error) {
	owner, err := n.payOwner(id)
	if err != nil {
		return pay.Order{}, err
	}
	if owner == "" {
		return n.localOrderOp(op, id)
	}
	rep, err := n.forwardPay(owner, payFwdReq{Op: op, ID: id})
	if err != nil {
		return pay.Order{}, err
	}
	if rep.Err != nil {
		return pay.Order{}, rep.Err
	}
	if rep.Order == nil {
		return pay.Order{}, errOwnerDown
	}
	return *rep.Order, nil
}

// notify runs a webhook delivery on the order's node. Its signature is
// checked here first (every node has the secrets): an unsigned body is
// refused where it arrived, never queued on another node. The order id is
// then read from the body only to route it; the owner checks everything
// again.
func (n *Node) notify(channel, sig string, body []byte) (int, string) {
	if n.Cluster != nil {
		if status, msg, ok := n.Pay.Authentic(channel, sig, body); !ok {
			return status, msg
		}
		var ev pay.Event
		if proto.Unmarshal(body, &ev) == nil {
			if id, ok := pay.ParseOrderID(ev.OrderID); ok {
				owner, err := n.payOwner(id)
				if err != nil {
					return http.StatusServiceUnavailable, proto.AsError(err).Msg
				}
				if owner != "" {
					rep, err := n.forwardPay(owner, payFwdReq{Op: "notify", Channel: channel, Sig: sig, Body: body})
					if err != nil {
						return http.StatusServiceUnavailable, proto.AsError(err).Msg
					}
					if rep.Err != nil || rep.Status == 0 { // busy, or not run: the provider retries
						msg := "retry"
						if rep.Err != nil {
							msg = rep.Err.Msg
						}
						return http.StatusServiceUnavailable, msg
					}
					return rep.Status, rep.Body
				}
			}
		}
	}
	return n.localNotify(channel, sig, body)
}

// madeByEarlierHolder: order id carries this node's worker id but was made
// before this node took the lease — by another node that held the id then —
// or this node has lost its lease (another may hold the id now and have
// made it). Its order is not here: "retry" (503), never "unknown order"
// (404), which a provider may take as final.
func (n *Node) madeByEarlierHolder(id int64) bool {
	return n.Cluster != nil && n.worker != nil && pay.WorkerOf(id) == n.worker.ID() &&
		(pay.TimeOf(id).Before(n.worker.Since()) || !n.worker.Held())
}

func (n *Node) localOrderOp(op string, id int64) (pay.Order, error) {
	var o pay.Order
	var err error
	if op == "refund" {
		o, err = n.Pay.Refund(id)
	} else {
		o, err = n.Pay.Get(id)
	}
	if pe := proto.AsError(err); err != nil && pe.Code == proto.CodeNotFound && n.madeByEarlierHolder(id) {
		return o, errOwnerDown
	}
	return o, err
}

func (n *Node) localNotify(channel, sig string, body []byte) (int, string) {
	status, msg := n.Pay.Notify(channel, sig, body)
	if status == pay.NotifyNotFound {
		var ev pay.Event
		if proto.Unmarshal(body, &ev) == nil {
			if id, ok := pay.ParseOrderID(ev.OrderID); ok && n.madeByEarlierHolder(id) {
				return http.StatusServiceUnavailable, errOwnerDown.Msg
			}
		}
	}
	return status, msg
}
