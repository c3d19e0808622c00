package gateway

import (
	"context"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
)

// Red-packet rains in a cluster are served by the node that created them:
// its memory holds the pool and its Pebble the grants (docs/redpacket.md).
// The creating node records itself as the rain's owner in Redis
// (le:rpown:{code}); every other node forwards prepare, start, grab — over
// WebSocket or HTTP — and GET of that rain to the owner over NATS (the same
// le.pay.<node> request subject as payment orders), with the caller's
// identity. The grabber-in-room check runs on the owner against the
// cluster-wide presence; the 5570 credit and the 5560/5561 room pushes reach
// users on every node through the cluster router. The pool is not sharded
// across nodes yet: an owner that is down answers nothing until it is back
// (its rains resume or settle at its restart).

func rainOwnerKey(code string) string { return "le:rpown:{" + code + "}" }

// rainOwnerTTL outlives any rain (redpacket.max_duration ≤ hours) and its
// settlement; a GET of an older code is answered by the node that is asked.
const rainOwnerTTL = 7 * 24 * time.Hour

// claimRain records this node as the owner of a new rain (cluster mode).
func (n *Node) claimRain(code string) error {
	if n.Cluster == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return n.Redis.Do(ctx, n.Redis.B().Set().Key(rainOwnerKey(code)).Value(n.Config.Node.ID).Px(rainOwnerTTL).Build()).Error()
}

// rainOwner returns the node that serves code ("" = this node, or unknown
// here and so answered here: 30001).
func (n *Node) rainOwner(code string) (string, error) {
	if n.Cluster == nil || code == "" || len(code) > proto.MaxRedPacketCodeLen {
		return "", nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	owner, err := n.Redis.DoCache(ctx, n.Redis.B().Get().Key(rainOwnerKey(code)).Cache(), time.Minute).ToString()
	switch {
	case err == nil && owner != n.Config.Node.ID:
		return owner, nil
	case err == nil || rueidis.IsRedisNil(err):
		return "", nil
	}
	return "", errOwnerDown
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
