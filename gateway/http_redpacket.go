package gateway

import (
	"context"
	"time"

	"github.com/cloudwego/hertz/pkg/app"
	"github.com/cloudwego/hertz/pkg/route"

	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
)

// redPacketRoutes adds the red-packet endpoints (PROTOCOL.md §4) to the
// authenticated group.
func (a *API) redPacketRoutes(g *route.RouterGroup) {
	g.POST("/rooms/:id/redpackets", a.createRain)
	g.POST("/redpackets/:code/prepare", a.prepareRain)
	g.POST("/redpackets/:code/start", a.startRain)
	g.POST("/redpackets/:code/cancel", a.cancelRain)
	g.POST("/redpackets/:code/grab", a.grabRain)
	g.GET("/redpackets/:code", a.getRain)
}

type createRainReq struct {
	TotalAmount int64 `json:"total_amount"`
	TotalCount  int   `json:"total_count"`
	DurationS   int64 `json:"duration_s"`
}

// createRain: the room's anchor makes a rain (WAIT) → its view, with "code".
func (a *API) createRain(_ context.Context, c *app.RequestContext) {
	room, err := pathID(c)
	if err != nil {
		a.fail(c, err)
		return
	}
	var r createRainReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	d := time.Duration(max(0, min(r.DurationS, 1<<32))) * time.Second // the service checks the bounds
	v, err := a.node.RedPackets.Create(identOf(c).UserID, room, r.TotalAmount, r.TotalCount, d)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, v)
}

// rainOp answers a red-packet request, served by the rain's node.
func (a *API) rainOp(c *app.RequestContext, op string) {
	code := c.Param("code")
	if len(code) > proto.MaxRedPacketCodeLen {
		a.fail(c, proto.BadRequest("code must be 1..%d bytes", proto.MaxRedPacketCodeLen))
		return
	}
	user := identOf(c).UserID
	if op == "rp.grab" && !a.node.grabs.Allow(uint64(user)) {
		a.fail(c, proto.ErrRateLimited)
		return
	}
	b, perr := a.node.redPacket(op, user, code)
	if op == "rp.get" && perr == nil && identOf(c).Role != RoleAdmin {
		b, perr = statsOrPublic(b, user)
	}
	a.jsonReply(c, b, perr)
}

// statsOrPublic is the rain's view d for user: whole for its anchor (its
// stats), what the room's pushes tell everyone for any other user.
func statsOrPublic(d []byte, user int64) ([]byte, *proto.Error) {
	var v redpacket.View
	if err := proto.Unmarshal(d, &v); err != nil {
		return nil, proto.ErrInternal
	}
	if v.AnchorID == user {
		return d, nil
	}
	b, err := proto.Marshal(v.Public())
	if err != nil {
		return nil, proto.ErrInternal
	}
	return b, nil
}

// jsonReply answers an op that may have run on another node: its reply's d
// as JSON, or its error.
func (a *API) jsonReply(c *app.RequestContext, d []byte, perr *proto.Error) {
	if perr != nil {
		a.fail(c, perr)
		return
	}
	okRaw(c, d)
}

func (a *API) prepareRain(_ context.Context, c *app.RequestContext) { a.rainOp(c, "rp.prepare") }

func (a *API) startRain(_ context.Context, c *app.RequestContext) { a.rainOp(c, "rp.start") }

// cancelRain: the anchor ends a rain that has not started (a prepared one's
// total goes back to them).
func (a *API) cancelRain(_ context.Context, c *app.RequestContext) { a.rainOp(c, "rp.cancel") }

// grabRain is the HTTP twin of the grab frame: the caller must be in the
// rain's room (a session joined to it on any node).
func (a *API) grabRain(_ context.Context, c *app.RequestContext) { a.rainOp(c, "rp.grab") }

func (a *API) getRain(_ context.Context, c *app.RequestContext) { a.rainOp(c, "rp.get") }
