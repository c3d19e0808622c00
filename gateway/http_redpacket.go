package gateway

import (
	"context"
	"time"

	"github.com/cloudwego/hertz/pkg/app"
	"github.com/cloudwego/hertz/pkg/route"

	"github.com/liveedge/liveedge/gateway/proto"
)

// redPacketRoutes adds the red-packet endpoints (PROTOCOL.md §4) to the
// authenticated group.
func (a *API) redPacketRoutes(g *route.RouterGroup) {
	g.POST("/rooms/:id/redpackets", a.createRain)
	g.POST("/redpackets/:code/prepare", a.prepareRain)
	g.POST("/redpackets/:code/start", a.startRain)
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

func (a *API) prepareRain(_ context.Context, c *app.RequestContext) {
	v, err := a.node.RedPackets.Prepare(identOf(c).UserID, c.Param("code"))
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, v)
}

func (a *API) startRain(_ context.Context, c *app.RequestContext) {
	v, err := a.node.RedPackets.Start(identOf(c).UserID, c.Param("code"))
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, v)
}

// grabRain is the HTTP twin of the grab frame: the caller must be in the
// rain's room (a WebSocket session joined to it on this node).
func (a *API) grabRain(_ context.Context, c *app.RequestContext) {
	code := c.Param("code")
	if len(code) > proto.MaxRedPacketCodeLen {
		a.fail(c, proto.BadRequest("code must be 1..%d bytes", proto.MaxRedPacketCodeLen))
		return
	}
	rep, perr := a.node.RedPackets.Grab(identOf(c).UserID, code)
	if perr != nil {
		a.fail(c, perr)
		return
	}
	ok(c, rep)
}

func (a *API) getRain(_ context.Context, c *app.RequestContext) {
	v, err := a.node.RedPackets.Get(c.Param("code"))
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, v)
}
