package gateway

import (
	"context"

	"github.com/cloudwego/hertz/pkg/app"
	"github.com/cloudwego/hertz/pkg/route"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/ticket"
	"github.com/liveedge/liveedge/gateway/proto"
)

// ticketRoutes are the tickets / flash-sale endpoints (PROTOCOL §4),
// all authenticated.
func (a *API) ticketRoutes(g *route.RouterGroup) {
	g.POST("/admin/programs", a.createProgram)
	g.GET("/programs/:id", a.getProgram)
	g.POST("/tickets/orders", a.placeTicketOrder)
	g.GET("/tickets/orders/:id", a.getTicketOrder)
	g.POST("/tickets/orders/:id/cancel", a.cancelTicketOrder)
	g.POST("/admin/coupons", a.createCoupon)
}

func (a *API) createProgram(_ context.Context, c *app.RequestContext) {
	if !a.requireAdmin(c) {
		return
	}
	var d ticket.ProgramDef
	if err := bind(c, &d); err != nil {
		a.fail(c, err)
		return
	}
	id, err := a.node.Tickets.CreateProgram(d)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]int64{"program_id": id})
}

// A user reads program views at most ProgramReadsPerSecond a second
// (bursts of ProgramReadBurst): a seat map polled during a sale, not a
// megabyte-per-request loop. Admins are not held to it.
const (
	ProgramReadsPerSecond = 5
	ProgramReadBurst      = 10
)

func (a *API) getProgram(_ context.Context, c *app.RequestContext) {
	id, err := pathID(c)
	if err != nil {
		a.fail(c, err)
		return
	}
	who := identOf(c)
	if who.Role != RoleAdmin && !a.programReads.Allow(uint64(who.UserID)) { // an operator's dashboard polls
		a.fail(c, proto.Errorf(proto.CodeRateLimited, "at most %d program reads a second", ProgramReadsPerSecond))
		return
	}
	b, perr := a.node.ticketOp("tix.program", who.UserID, id, nil)
	a.jsonReply(c, b, perr)
}

func (a *API) placeTicketOrder(_ context.Context, c *app.RequestContext) {
	var r ticket.PlaceReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	body, err := proto.Marshal(r) // validated by the bind; re-encoded for the program's node
	if err != nil {
		a.fail(c, err)
		return
	}
	b, perr := a.node.ticketOp("tix.place", identOf(c).UserID, 0, body)
	a.jsonReply(c, b, perr)
}

// ticketOrderID is the {id} of a ticket order path.
func (a *API) ticketOrderID(c *app.RequestContext) (int64, bool) {
	id, valid := pay.ParseOrderID(c.Param("id"))
	if !valid {
		a.fail(c, proto.BadRequest("bad order id"))
	}
	return id, valid
}

func (a *API) getTicketOrder(_ context.Context, c *app.RequestContext) {
	id, valid := a.ticketOrderID(c)
	if !valid {
		return
	}
	b, perr := a.node.ticketOp("tix.get", identOf(c).UserID, id, nil)
	a.jsonReply(c, b, perr)
}

func (a *API) cancelTicketOrder(_ context.Context, c *app.RequestContext) {
	id, valid := a.ticketOrderID(c)
	if !valid {
		return
	}
	b, perr := a.node.ticketOp("tix.cancel", identOf(c).UserID, id, nil)
	a.jsonReply(c, b, perr)
}

type couponReq struct {
	UserID int64  `json:"user_id"`
	Amount int64  `json:"amount"`
	ReqID  string `json:"req_id"` // optional: a grant sent again with it answers the first coupon
}

func (a *API) createCoupon(_ context.Context, c *app.RequestContext) {
	if !a.requireAdmin(c) {
		return
	}
	var r couponReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	cp, err := a.node.Tickets.GrantCoupon(identOf(c).UserID, r.ReqID, r.UserID, r.Amount)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, cp)
}
