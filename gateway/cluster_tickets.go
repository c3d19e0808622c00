package gateway

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/ticket"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Ticket programs in a cluster are served by the node that created them: its
// memory holds the seats and its Pebble the orders. A program id carries its
// node's worker id in its low bits (nextProgramID), like an order id, so any
// node finds the owner from the id and the worker leases in Redis; GET
// /programs/{id} and order placement through any other node are forwarded to
// the owner over NATS, and a ticket order is read and cancelled on the node in
// its id's worker bits. Coupons are cluster-wide (ticket.SharedCoupons in
// Redis): granted through any node, used once by whichever node runs the
// order.

// nextProgramID is ticket.Config.NextProgramID in a cluster (nil otherwise):
// the milliseconds since programEpoch of its making (or one more than the
// node's highest id's, whichever is greater) above programWorkerBits of
// worker id — unique across nodes without a shared counter: the worker
// leases keep a worker id to one node at a time, and the node that takes a
// worker id over makes its ids after it took the lease and after the high
// mark its earlier holders left in Redis (pay.WorkerHighKey), so after every
// id of theirs, whatever the clocks say. The owner is read back from the
// id, so nothing is lost with Redis. The id stays below 2^53 (a JSON number a browser reads exactly)
// for thousands of years. Before, the next id was the node's own highest
// plus one step: a node taking over a worker id made its earlier holder's
// program ids again, and requests for them reached a different show.
func (n *Node) nextProgramID() func(last int64) (int64, error) {
	if n.Cluster == nil || n.worker == nil {
		return nil
	}
	w := int64(n.worker.ID())
	return func(last int64) (int64, error) {
		if !n.worker.Held() {
			// Cut off from Redis past the lease: a node started meanwhile
			// may hold this worker id and make the same ids (as order ids).
			return 0, errWorkerNotHeld
		}
		// After the node's last id, now, and every id the worker id's
		// earlier holders could have made (a clock behind theirs).
		t := max(last>>programWorkerBits+1, time.Now().UnixMilli()-programEpoch.UnixMilli(),
			n.worker.Since().UnixMilli()-programEpoch.UnixMilli()+1)
		return t<<programWorkerBits | w, nil
	}
}

// programNeverServed: no node ever held program id's worker id (its owner
// key, which outlives the lease, names none).
// While the shared state is not ready Redis may have lost the owner keys
// (they come back with the rebuild, contributeWorkerOwner): not "never".
func (n *Node) programNeverServed(id int64) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r := n.Redis.DoMulti(ctx, n.Redis.B().Get().Key(pay.WorkerOwnerKey(int(id&(1<<programWorkerBits-1)))).Build(),
		n.Redis.B().Hget().Key(persist.SharedMetaKey).Field("state").Build())
	state, _ := r[1].ToString()
	return rueidis.IsRedisNil(r[0].Error()) && state == "ready"
}

// errNoProgram answers a program id no node serves.
var errNoProgram = proto.Errorf(proto.CodeNotFound, "program not found")

// ticketReqTTL is how long a (user, req_id) of a ticket order names its
// program through every node (PROTOCOL §5: 24 h).
const ticketReqTTL = 24 * time.Hour

// ticketReqKey binds a (user, req_id) of a ticket order to the program it
// was placed for (ticket.ReqBinding; outside le:*, as the payment bindings:
// rebuilt with the shared wallet from the orders on every node's disk, and
// left by its reset).
func ticketReqKey(user int64, req string) string {
	return "liveedge:tixreq:{" + strconv.FormatInt(user, 10) + "}:" + req
}

// bindTicketReqScript binds KEYS[1] to program ARGV[1] for ARGV[2] ms unless
// it is bound already, once the shared wallet (KEYS[2]) is ready; it
// returns the program it names.
// A binding to the same program (an attempt that wrote nothing, its
// binding kept) starts its 24 h again: they count from the order.
var bindTicketReqScript = rueidis.NewLuaScript(notReadyLua + `
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]`)

// unbindTicketReqScript deletes KEYS[1] if it names program ARGV[1].
var unbindTicketReqScript = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

var errTicketReqUnbound = proto.Errorf(proto.CodeInternal, "could not record this req_id; nothing was placed: retry with the same req_id")

// ticketReqs is ticket.ReqBinding in Redis. The program's node binds a
// request's req_id under its repeat guard, before anything is written, and
// lets it go when nothing was — so an order never exists without its
// binding, and a refused request holds none.
type ticketReqs struct{ n *Node }

func (b ticketReqs) Bind(user int64, req string, program int64) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	v, err := bindTicketReqScript.Exec(ctx, b.n.Redis, []string{ticketReqKey(user, req), persist.SharedMetaKey},
		[]string{strconv.FormatInt(program, 10), strconv.FormatInt(ticketReqTTL.Milliseconds(), 10)}).ToString()
	if err != nil {
		b.n.Log.Warn("tickets: req_id binding failed", "user", user, "err", err)
		return 0, errTicketReqUnbound
	}
	return parseTicketReq(v)
}

func (b ticketReqs) Unbind(user int64, req string, program int64) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := unbindTicketReqScript.Exec(ctx, b.n.Redis, []string{ticketReqKey(user, req)}, []string{strconv.FormatInt(program, 10)}).Error(); err != nil {
		// Kept for its day: the req_id still places for this program, and
		// answers 10409 for another.
		b.n.Log.Warn("tickets: a refused request's req_id binding not let go", "user", user, "err", err)
	}
}

func parseTicketReq(v string) (int64, error) {
	program, err := strconv.ParseInt(v, 10, 64)
	if err != nil || program <= 0 {
		return 0, fmt.Errorf("gateway: malformed ticket req_id binding %q", v)
	}
	return program, nil
}

// boundTicketReq returns the program user's req_id is bound to (0: none),
// so that a req_id sent again for another program goes to the node with
// its first result (a binding made meanwhile is found by that node's Bind).
func (n *Node) boundTicketReq(user int64, r ticket.PlaceReq) (int64, error) {
	if n.Cluster == nil || r.ProgramID <= 0 || !ticket.ValidReqID(r.ReqID) {
		return 0, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	v, err := n.Redis.Do(ctx, n.Redis.B().Get().Key(ticketReqKey(user, r.ReqID)).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return 0, nil
	}
	if err != nil {
		return 0, errTicketReqUnbound
	}
	return parseTicketReq(v)
}

// contributeWorkerOwner puts this node's worker id's owner key back in a
// rebuilding wallet generation (Redis lost it; no TTL, as the lease's claim
// writes it): a node away when Redis lost its data has its key back once
// the rebuild — which waits for every node — is done, so its programs are
// "retry" while it is away, never "not found".
func (n *Node) contributeWorkerOwner(_ time.Time, add func(op ...string) error) error {
	if n.worker == nil {
		return nil
	}
	const forever = 1 << 62 // (ms) the idem op's deadline: none in practice
	return add("idem", pay.WorkerOwnerKey(n.worker.ID()), n.Config.Node.ID, strconv.FormatInt(forever, 10))
}

// contributeTicketReqs adds the req_id bindings of this node's ticket orders
// of the last ticketReqTTL to a rebuilding wallet generation
// (persist.SharedConfig.Contribute); each expires ticketReqTTL after its
// order's creation.
func (n *Node) contributeTicketReqs(since time.Time, add func(op ...string) error) error {
	return ticket.ReqsOnDisk(n.Store, since.Add(-ticketReqTTL-time.Hour), func(user int64, req string, program, at int64) error {
		return add("idem", ticketReqKey(user, req), strconv.FormatInt(program, 10), strconv.FormatInt(at+ticketReqTTL.Milliseconds(), 10))
	})
}

var errWorkerNotHeld = proto.Errorf(proto.CodeInternal, "this node cannot make ids right now (its worker lease is not held), retry")

// errTicketNotAnswered answers a ticket order placed through another node
// that did not answer in time: it may have been done there.
var errTicketNotAnswered = proto.Errorf(proto.CodeInternal, "the program's node did not answer in time; it may have been done: retry with the same req_id")

// errCancelNotAnswered is errTicketNotAnswered for a cancel (it has no
// req_id; a retry of a cancel done answers the order as it is).
var errCancelNotAnswered = proto.Errorf(proto.CodeInternal, "the order's node did not answer in time; it may have been done: retry")

// errProgramOwnerDown answers a program this node's worker id names but an
// earlier holder of the id made (its node is elsewhere, or down).
var errProgramOwnerDown = proto.Errorf(proto.CodeInternal, "the program's node is unreachable, retry")

// programWorkerBits are the low bits of a cluster program id: its node's
// order-id worker id (pay.MaxWorkers of them).
const programWorkerBits = 5

// programEpoch is the zero of the time in cluster program ids.
var programEpoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// programMadeByEarlierHolder: program id carries this node's worker id and
// the time of its making, before this node took the lease — another node
// made it, and holds it: "retry" (50000), never "not found" (10004). Ids of
// the older form (a counter, no time) are not told apart.
func (n *Node) programMadeByEarlierHolder(id int64) bool {
	if n.Cluster == nil || n.worker == nil || int(id&(1<<programWorkerBits-1)) != n.worker.ID() {
		return false
	}
	ms := id >> programWorkerBits
	return ms >= programTimedFrom && programEpoch.Add(time.Duration(ms)*time.Millisecond).Before(n.worker.Since())
}

// programTimedFrom: a cluster program id whose time part is at least this
// (2025-02-01, in ms since programEpoch) is of the timed form; a counter
// id never reached it.
const programTimedFrom = 31 * 24 * 3600 * 1000

// programOwner returns the node that serves program id ("" = this node, or
// a single node).
func (n *Node) programOwner(id int64) (string, error) {
	if n.Cluster == nil || id <= 0 {
		return "", nil
	}
	if n.Tickets != nil && n.Tickets.HasProgram(id) {
		// Made here, perhaps under a worker id this node no longer holds
		// (it came back under another, its old one taken meanwhile).
		return "", nil
	}
	return n.workerOwner(int(id & (1<<programWorkerBits - 1)))
}

// ticketOp runs a ticket op on the node that owns it: tix.program (id: the
// program), tix.place (body: the PlaceReq; routed by its program), tix.get
// and tix.cancel (id: the order, routed by its worker id). It returns the
// reply's d as JSON.
func (n *Node) ticketOp(op string, user, id int64, body []byte) ([]byte, *proto.Error) {
	var owner string
	var err error
	program, bound := id, int64(0)
	switch op {
	case "tix.program":
		owner, err = n.programOwner(id)
	case "tix.place":
		var r ticket.PlaceReq
		if proto.Unmarshal(body, &r) == nil {
			program = r.ProgramID
			if bound, err = n.boundTicketReq(user, r); err == nil {
				if bound != 0 && bound != r.ProgramID {
					// Sent before for another program: its node has the
					// first result (or is placing it).
					op, program = "tix.placed", bound
				}
				owner, err = n.programOwner(program)
			}
		}
	default:
		owner, err = n.payOwner(id)
	}
	if errors.Is(err, errLeaseGone) && op != "tix.get" && op != "tix.cancel" {
		err = errOwnerDown
		if bound == 0 && op != "tix.placed" && n.programNeverServed(program) {
			// No node holds the program id's worker id, and none ever
			// did (a made-up id): nothing to show or sell — not "retry",
			// which a client would do for ever. (A program whose node is
			// away, or a req_id bound to one, whose order may be there:
			// "retry", as for an order's id.)
			return nil, errNoProgram
		}
	}
	if err != nil {
		return nil, proto.AsError(err)
	}
	if owner == "" {
		return n.ticketLocal(op, user, id, body)
	}
	rep, err := n.forwardPay(owner, payFwdReq{Op: op, User: user, ID: id, Body: body})
	if err != nil {
		switch op {
		case "tix.place":
			// Unanswered is not "nothing done": a retry must carry the
			// same req_id (a new one may buy twice).
			return nil, errTicketNotAnswered
		case "tix.cancel":
			return nil, errCancelNotAnswered
		}
		return nil, proto.AsError(err)
	}
	return rep.Data, rep.Err
}

func (n *Node) ticketLocal(op string, user, id int64, body []byte) ([]byte, *proto.Error) {
	if user <= 0 && op != "tix.program" {
		return nil, &proto.Error{Code: proto.CodeUnauthenticated, Msg: "no caller"} // a forwarded op always names its caller
	}
	var v any
	var err error
	switch op {
	case "tix.program":
		b, err := n.Tickets.ProgramJSON(id) // encoded once per change of the program
		if err != nil && proto.AsError(err).Code == proto.CodeNotFound && n.programMadeByEarlierHolder(id) {
			return nil, errProgramOwnerDown
		}
		if err != nil {
			return nil, n.wireErr(err)
		}
		return b, nil
	case "tix.place":
		var r ticket.PlaceReq
		if uerr := proto.Unmarshal(body, &r); uerr != nil {
			return nil, proto.BadRequest("bad order request")
		}
		v, err = n.Tickets.Place(user, r)
		if pe := proto.AsError(err); err != nil && pe.Code == proto.CodeNotFound && n.programMadeByEarlierHolder(r.ProgramID) {
			return nil, errProgramOwnerDown
		}
	case "tix.placed":
		var r ticket.PlaceReq
		if uerr := proto.Unmarshal(body, &r); uerr != nil {
			return nil, proto.BadRequest("bad order request")
		}
		v, err = n.Tickets.PlacedFor(user, r.ReqID)
	case "tix.get":
		v, err = n.Tickets.Get(user, id)
	case "tix.cancel":
		v, err = n.Tickets.Cancel(user, id)
	default:
		return nil, proto.BadRequest("unknown ticket op")
	}
	if pe := proto.AsError(err); err != nil && pe.Code == proto.CodeNotFound && (op == "tix.get" || op == "tix.cancel") && n.madeByEarlierHolder(id) {
		return nil, errOwnerDown
	}
	return n.replyData(v, err)
}
