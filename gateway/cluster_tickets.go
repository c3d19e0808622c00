package gateway

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/ticket"
	"github.com/liveedge/liveedge/gateway/proto"
)

// Ticket programs in a cluster are served by the node that created them: its
// memory holds the seats and its Pebble the orders. Program ids come from one
// counter in Redis (le:{tix}:prog), the owner is recorded in
// le:tixown:{<id>}; GET /programs/{id} and order placement through any other
// node are forwarded to the owner over NATS, and a ticket order (its id
// carries the owner's worker id, like a payment order) is read and cancelled
// on its node. Coupons are still per node (a coupon is used on the node
// that made it).

func programOwnerKey(id int64) string { return "le:tixown:{" + strconv.FormatInt(id, 10) + "}" }

// nextProgramID is ticket.Config.NextProgramID in a cluster (nil otherwise).
func (n *Node) nextProgramID() func() (int64, error) {
	if n.Cluster == nil {
		return nil
	}
	return func() (int64, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return n.Redis.Do(ctx, n.Redis.B().Incr().Key("le:{tix}:prog").Build()).AsInt64()
	}
}

// claimProgram records this node as the owner of program id (cluster mode).
func (n *Node) claimProgram(id int64) error {
	if n.Cluster == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return n.Redis.Do(ctx, n.Redis.B().Set().Key(programOwnerKey(id)).Value(n.Config.Node.ID).Build()).Error()
}

// programOwner returns the node that serves program id ("" = this node or
// unknown: answered here).
func (n *Node) programOwner(id int64) (string, error) {
	if n.Cluster == nil || id <= 0 {
		return "", nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	owner, err := n.Redis.DoCache(ctx, n.Redis.B().Get().Key(programOwnerKey(id)).Cache(), time.Minute).ToString()
	switch {
	case err == nil && owner != n.Config.Node.ID:
		return owner, nil
	case err == nil || rueidis.IsRedisNil(err):
		return "", nil
	}
	return "", errOwnerDown
}

// ticketOp runs a ticket op on the node that owns it: tix.program (id: the
// program), tix.place (body: the PlaceReq; routed by its program), tix.get
// and tix.cancel (id: the order, routed by its worker id). It returns the
// reply's d as JSON.
func (n *Node) ticketOp(op string, user, id int64, body []byte) ([]byte, *proto.Error) {
	var owner string
	var err error
	switch op {
	case "tix.program":
		owner, err = n.programOwner(id)
	case "tix.place":
		var r ticket.PlaceReq
		if proto.Unmarshal(body, &r) == nil {
			owner, err = n.programOwner(r.ProgramID)
		}
	default:
		owner, err = n.payOwner(id)
	}
	if err != nil {
		return nil, proto.AsError(err)
	}
	if owner == "" {
		return n.ticketLocal(op, user, id, body)
	}
	rep, err := n.forwardPay(owner, payFwdReq{Op: op, User: user, ID: id, Body: body})
	if err != nil {
		return nil, proto.AsError(err)
	}
	return rep.Data, rep.Err
}

func (n *Node) ticketLocal(op string, user, id int64, body []byte) ([]byte, *proto.Error) {
	var v any
	var err error
	switch op {
	case "tix.program":
		v, err = n.Tickets.Program(id)
	case "tix.place":
		var r ticket.PlaceReq
		if uerr := proto.Unmarshal(body, &r); uerr != nil {
			return nil, proto.BadRequest("bad order request")
		}
		v, err = n.Tickets.Place(user, r)
	case "tix.get":
		v, err = n.Tickets.Get(user, id)
	case "tix.cancel":
		v, err = n.Tickets.Cancel(user, id)
	default:
		return nil, proto.BadRequest("unknown ticket op")
	}
	if err != nil {
		if pe := proto.AsError(err); pe.Code == proto.CodeNotFound && op != "tix.program" && n.madeByEarlierHolder(id) {
			return nil, errOwnerDown
		}
		return nil, proto.AsError(err)
	}
	b, merr := proto.Marshal(v)
	if merr != nil {
		return nil, proto.ErrInternal
	}
	return b, nil
}
