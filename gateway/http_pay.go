package gateway

import (
	"context"

	"github.com/cloudwego/hertz/pkg/app"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
)

func (a *API) listProducts(_ context.Context, c *app.RequestContext) {
	ok(c, map[string]any{"products": a.node.Pay.ListProducts()})
}

func (a *API) createOrder(_ context.Context, c *app.RequestContext) {
	var r pay.CreateReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	o, err := a.node.createOrder(identOf(c).UserID, r)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, o)
}

func (a *API) orderOf(c *app.RequestContext) (pay.Order, int64, bool) {
	id, valid := pay.ParseOrderID(c.Param("id"))
	if !valid {
		a.fail(c, proto.BadRequest("bad order id"))
		return pay.Order{}, 0, false
	}
	o, err := a.node.orderOp("get", id)
	if err != nil {
		a.fail(c, err)
		return o, id, false
	}
	return o, id, true
}

func (a *API) getOrder(_ context.Context, c *app.RequestContext) {
	o, _, found := a.orderOf(c)
	if !found {
		return
	}
	if ident := identOf(c); o.UserID != ident.UserID && ident.Role != RoleAdmin {
		a.fail(c, proto.Errorf(proto.CodeNotFound, "order not found"))
		return
	}
	ok(c, o)
}

func (a *API) refundOrder(_ context.Context, c *app.RequestContext) {
	if !a.requireAdmin(c) {
		return
	}
	_, id, found := a.orderOf(c)
	if !found {
		return
	}
	o, err := a.node.orderOp("refund", id)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, o)
}

// payNotify is the provider webhook: the signature over the raw body is
// checked before anything in the body is read; the answer is the plain text
// "success" once the event is durably recorded, a rejection is the error
// envelope.
//
// An unknown channel in the path is refused (400, code 10001) before anything
// else: no provider of ours posts there.
func (a *API) payNotify(_ context.Context, c *app.RequestContext) {
	if !pay.KnownChannel(c.Param("channel")) {
		a.metrics.payNotifies.WithLabelValues(notifyLabel(pay.NotifyBadRequest)).Inc()
		a.fail(c, proto.BadRequest("unknown payment channel"))
		return
	}
	status, body := a.node.notify(c.Param("channel"), string(c.GetHeader(pay.SignatureHeader)), c.Request.Body())
	a.metrics.payNotifies.WithLabelValues(notifyLabel(status)).Inc()
	if status != pay.NotifyOK {
		envelope(c, status, &proto.Error{Code: notifyCode(status), Msg: body})
		return
	}
	c.Data(status, "text/plain; charset=utf-8", []byte(body))
}

// notifyCode is the envelope code of a rejected webhook delivery.
func notifyCode(status int) int {
	switch status {
	case pay.NotifyUnauthorized:
		return proto.CodeUnauthenticated
	case pay.NotifyBadRequest:
		return proto.CodeBadRequest
	case pay.NotifyNotFound:
		return proto.CodeNotFound
	case pay.NotifyConflict:
		return proto.CodeConflict
	}
	return proto.CodeInternal
}

func notifyLabel(status int) string {
	switch status {
	case pay.NotifyOK:
		return "ok"
	case pay.NotifyUnauthorized:
		return "unauthorized"
	case pay.NotifyConflict:
		return "conflict"
	case pay.NotifyNotFound:
		return "not_found"
	case pay.NotifyBadRequest:
		return "bad_request"
	}
	return "retry"
}
