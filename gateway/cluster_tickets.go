package gateway

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
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
func (n *Node) programNeverServed(id int64) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := n.Redis.Do(ctx, n.Redis.B().Get().Key(pay.WorkerOwnerKey(int(id&(1<<programWorkerBits-1)))).Build()).Error()
	return rueidis.IsRedisNil(err)
}

// errNoProgram answers a program id no node serves.
var errNoProgram = proto.Errorf(proto.CodeNotFound, "program not found")

// ticketReqTTL is how long a (user, req_id) of a ticket order names its
// program through every node once its order is written (PROTOCOL §5: 24 h);
// ticketReqPending how long a binding made for a request lasts before that
// (a refused request's binding is deleted at once; one whose node died
// before answering lapses).
const (
	ticketReqTTL     = 24 * time.Hour
	ticketReqPending = time.Minute
)

// ticketReqKey binds a (user, req_id) of a ticket order to the program it
// was first sent for: "p<program>" while its request is served, "<program>"
// once the order is written (outside le:*, as the payment bindings: rebuilt
// with the shared wallet from the orders on every node's disk, and left by
// its reset).
func ticketReqKey(user int64, req string) string {
	return "liveedge:tixreq:{" + strconv.FormatInt(user, 10) + "}:" + req
}

// claimTicketReqScript: setIfAbsentLua once the shared wallet is ready; KEYS
// the binding, the meta hash; ARGV "p<program>", ticketReqPending in ms.
var claimTicketReqScript = rueidis.NewLuaScript(notReadyLua + setIfAbsentLua)

// confirmTicketReqScript: confirmLua (the binding names ARGV[1] for ARGV[2]
// ms if it is pending for it, confirmed for it, or gone).
var confirmTicketReqScript = rueidis.NewLuaScript(confirmLua)

// releaseTicketReqScript deletes KEYS[1] if it is pending for ARGV[1].
var releaseTicketReqScript = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) == 'p' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

var errTicketReqUnbound = proto.Errorf(proto.CodeInternal, "could not record this req_id; nothing was placed: retry with the same req_id")

var errTicketReqNotConfirmed = proto.Errorf(proto.CodeInternal, "could not confirm the order of this req_id; retry with the same req_id")

// boundTicketReq returns the program user's req_id names in the cluster (0:
// none). A request whose req_id names none is checked first (its program
// must have a node: ownerOK) and then binds it, pending, to its program —
// so a req_id sent again for another program answers the first result
// (PROTOCOL §5: each node's idempotency record knows its own orders only,
// and two programs on two nodes made two orders, and charged twice). A
// request Place refuses before anything (no program, a bad req_id) binds
// nothing.
func (n *Node) boundTicketReq(user int64, r ticket.PlaceReq) (int64, error) {
	if n.Cluster == nil || r.ProgramID <= 0 || !ticket.ValidReqID(r.ReqID) {
		return 0, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	key := ticketReqKey(user, r.ReqID)
	v, err := n.Redis.Do(ctx, n.Redis.B().Get().Key(key).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		// A program no node serves binds nothing (a typo must not hold the
		// req_id): its owner first.
		if _, oerr := n.programOwner(r.ProgramID); oerr != nil {
			return 0, oerr
		}
		v, err = claimTicketReqScript.Exec(ctx, n.Redis, []string{key, persist.SharedMetaKey},
			[]string{"p" + strconv.FormatInt(r.ProgramID, 10), strconv.FormatInt(ticketReqPending.Milliseconds(), 10)}).ToString()
		if rueidis.IsRedisNil(err) {
			return r.ProgramID, nil // bound now
		}
	}
	if err != nil {
		n.Log.Warn("tickets: req_id binding failed", "user", user, "err", err)
		return 0, errTicketReqUnbound
	}
	program, err := strconv.ParseInt(strings.TrimPrefix(v, "p"), 10, 64)
	if err != nil || program <= 0 {
		return 0, fmt.Errorf("gateway: malformed ticket req_id binding %q", v)
	}
	return program, nil
}

// settleTicketReq runs on the program's node after a place (or a replay
// for another program) answered: the binding is confirmed for ticketReqTTL
// when an order of the req_id is written here, or let go when none is (a
// refused request leaves the req_id free, as on a single node) — unless
// another request of it is being placed (10409: that one settles it). An
// order not confirmed is not handed out (its binding could lapse and a
// request for another program make a second order): "retry".
func (n *Node) settleTicketReq(user int64, r ticket.PlaceReq, program int64, placeErr error) error {
	if n.Cluster == nil || r.ProgramID <= 0 || !ticket.ValidReqID(r.ReqID) {
		return nil
	}
	if pe := proto.AsError(placeErr); placeErr != nil && pe.Code == proto.CodeConflict {
		return nil
	}
	written, err := n.Tickets.HasReq(user, r.ReqID)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	key, val := ticketReqKey(user, r.ReqID), strconv.FormatInt(program, 10)
	if !written {
		if err := releaseTicketReqScript.Exec(ctx, n.Redis, []string{key}, []string{val}).Error(); err != nil {
			n.Log.Warn("tickets: a refused request's req_id binding not let go (it lapses)", "user", user, "err", err)
		}
		return nil
	}
	cur, err := confirmTicketReqScript.Exec(ctx, n.Redis, []string{key, persist.SharedMetaKey},
		[]string{val, strconv.FormatInt(ticketReqTTL.Milliseconds(), 10)}).ToString()
	if err != nil || cur != val {
		n.Log.Warn("tickets: confirming a req_id failed", "user", user, "names", cur, "err", err)
		return errTicketReqNotConfirmed
	}
	return nil
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
					op, program, id = "tix.placed", bound, bound
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
		if serr := n.settleTicketReq(user, r, r.ProgramID, err); serr != nil && err == nil {
			return nil, proto.AsError(serr)
		}
	case "tix.placed":
		var r ticket.PlaceReq
		if uerr := proto.Unmarshal(body, &r); uerr != nil {
			return nil, proto.BadRequest("bad order request")
		}
		// id: the program the req_id is bound to, this node's (r names
		// another).
		v, err = n.Tickets.PlacedFor(user, r.ReqID)
		if serr := n.settleTicketReq(user, r, id, err); serr != nil && err == nil {
			return nil, proto.AsError(serr)
		}
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
