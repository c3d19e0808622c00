package gateway

import (
	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
)

// Red-packet rains in a cluster are served by the node that created them:
// its memory holds the pool and its Pebble the grants (docs/redpacket.md).
// A rain's code carries the creating node's worker id in its first character
// (redpacket.Config.CodeTag), so every other node forwards prepare, start, grab — over
// WebSocket or HTTP — and GET of that rain to the owner over NATS (the same
// le.pay.<node> request subject as payment orders), with the caller's
// identity. The grabber-in-room check runs on the owner against the
// cluster-wide presence; the 5570 credit and the 5560/5561 room pushes reach
// users on every node through the cluster router. The pool is not sharded
// across nodes yet: an owner that is down answers nothing until it is back
// (its rains resume or settle at its restart).

// rainOwner returns the node that serves code ("" = this node, a single
// node, or not a code: answered here).
func (n *Node) rainOwner(code string) (string, error) {
	if n.Cluster == nil {
		return "", nil
	}
	tag, ok := redpacket.CodeTag(code)
	if !ok {
		return "", nil
	}
	return n.workerOwner(tag)
}

// redPacket runs op (rp.prepare | rp.start | rp.grab | rp.get) for user on
// the rain's node and returns the reply's d as JSON.
func (n *Node) redPacket(op string, user int64, code string) ([]byte, *proto.Error) {
	owner, err := n.rainOwner(code)
	if err != nil {
		return nil, proto.AsError(err)
	}
	if owner == "" {
		return n.redPacketLocal(op, user, code)
	}
	rep, err := n.forwardPay(owner, payFwdReq{Op: op, User: user, Code: code})
	if err != nil {
		return nil, proto.AsError(err)
	}
	return rep.Data, rep.Err
}

func (n *Node) redPacketLocal(op string, user int64, code string) ([]byte, *proto.Error) {
	if user <= 0 && op != "rp.get" {
		return nil, &proto.Error{Code: proto.CodeUnauthenticated, Msg: "no caller"} // a forwarded op always names its caller
	}
	var v any
	var err error
	switch op {
	case "rp.prepare":
		v, err = n.RedPackets.Prepare(user, code)
	case "rp.start":
		v, err = n.RedPackets.Start(user, code)
	case "rp.get":
		v, err = n.RedPackets.Get(code)
	case "rp.grab":
		var perr *proto.Error
		v, perr = n.RedPackets.Grab(user, code)
		if perr != nil {
			return nil, perr
		}
	default:
		return nil, proto.BadRequest("unknown red-packet op")
	}
	if err != nil {
		return nil, wireError(err)
	}
	b, merr := proto.Marshal(v)
	if merr != nil {
		return nil, proto.ErrInternal
	}
	return b, nil
}

// grabAsync serves a grab frame: on this node, or forwarded to the rain's
// node (in a goroutine bounded by the connection's in-flight limit).
func (n *Node) grabAsync(user int64, code string, done func(any, *proto.Error)) {
	owner, err := n.rainOwner(code)
	if err == nil && owner == "" {
		n.RedPackets.GrabAsync(user, code, func(rep redpacket.GrabReply, perr *proto.Error) {
			if perr != nil {
				done(nil, perr)
				return
			}
			done(rep, nil)
		})
		return
	}
	go func() {
		b, perr := n.redPacket("rp.grab", user, code)
		if perr != nil {
			done(nil, perr)
			return
		}
		done(b, nil)
	}()
}
