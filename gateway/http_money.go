package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"time"

	"github.com/cloudwego/hertz/pkg/app"

	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// maxDevCredit bounds one dev credit.
const maxDevCredit = 1_000_000_000

type devCreditReq struct {
	UserID int64  `json:"user_id"`
	Amount int64  `json:"amount"`
	ReqID  string `json:"req_id"` // optional: makes the credit idempotent
}

// devCredit credits coins for tests and demos (reason "dev"), recorded in
// the ledger like any credit, pushed to the user as biz 5570.
func (a *API) devCredit(_ context.Context, c *app.RequestContext) {
	var r devCreditReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	if r.UserID <= 0 || r.Amount <= 0 || r.Amount > maxDevCredit || len(r.ReqID) > 64 {
		a.fail(c, proto.BadRequest("user_id > 0, 0 < amount <= %d, req_id <= 64 bytes", maxDevCredit))
		return
	}
	if r.ReqID == "" {
		var b [12]byte
		_, _ = rand.Read(b[:])
		r.ReqID = hex.EncodeToString(b[:])
	}
	res, err := a.node.Wallet.Apply(persist.Op{User: r.UserID, ReqID: "dev:" + r.ReqID,
		Postings: []persist.Posting{{User: r.UserID, Delta: r.Amount, Reason: persist.ReasonDev, Ref: "dev credit"}}})
	if err != nil {
		a.fail(c, err)
		return
	}
	if !res.Replayed {
		d, _ := proto.Marshal(map[string]any{"balance": res.Balances[0], "delta": r.Amount, "reason": persist.ReasonDev})
		a.node.Router.SendUser(r.UserID, proto.Push{Biz: proto.BizWalletCredit, Data: d, Ack: true})
	}
	ok(c, map[string]int64{"balance": res.Balances[0]})
}

func (a *API) wallet(_ context.Context, c *app.RequestContext) {
	u := identOf(c).UserID
	b, err := a.node.Wallet.Balance(u)
	if err != nil {
		a.fail(c, err)
		return
	}
	recv, err := a.node.Wallet.Tally(gift.TallyReceived, u)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]int64{"balance": b, "received": recv})
}

func (a *API) trades(_ context.Context, c *app.RequestContext) {
	limit, err := queryInt(c, "limit", 20)
	if err != nil || limit < 1 || limit > 100 {
		a.fail(c, proto.BadRequest("limit must be 1..100"))
		return
	}
	var before int64
	if s := string(c.Query("cursor")); s != "" {
		if before, err = strconv.ParseInt(s, 10, 64); err != nil || before <= 0 {
			a.fail(c, proto.BadRequest("bad cursor"))
			return
		}
	}
	ts, err := a.node.Wallet.Trades(identOf(c).UserID, before, limit)
	if err != nil {
		a.fail(c, err)
		return
	}
	next := ""
	if len(ts) == limit {
		next = strconv.FormatInt(ts[len(ts)-1].ID, 10)
	}
	if ts == nil {
		ts = []persist.Trade{}
	}
	ok(c, map[string]any{"trades": ts, "next_cursor": next})
}

func (a *API) listGifts(_ context.Context, c *app.RequestContext) {
	all := string(c.Query("all")) == "1"
	ok(c, map[string]any{"gifts": a.node.Gifts.Catalogue().List(all)})
}

func (a *API) requireAdmin(c *app.RequestContext) bool {
	if identOf(c).Role != RoleAdmin {
		a.fail(c, proto.Errorf(proto.CodeForbidden, "admin only"))
		return false
	}
	return true
}

func (a *API) createGift(_ context.Context, c *app.RequestContext) {
	if !a.requireAdmin(c) {
		return
	}
	var g gift.Gift
	g.Status = gift.StatusEnabled
	if err := bind(c, &g); err != nil {
		a.fail(c, err)
		return
	}
	if err := a.node.Gifts.Catalogue().Create(g); err != nil {
		a.fail(c, err)
		return
	}
	ok(c, g)
}

func (a *API) updateGift(_ context.Context, c *app.RequestContext) {
	if !a.requireAdmin(c) {
		return
	}
	id, err := pathID(c)
	if err != nil {
		a.fail(c, err)
		return
	}
	g, found := a.node.Gifts.Catalogue().Get(id)
	if !found {
		a.fail(c, proto.ErrNotFound)
		return
	}
	if err := bind(c, &g); err != nil { // fields absent from the body keep their value
		a.fail(c, err)
		return
	}
	g.ID = id
	if err := a.node.Gifts.Catalogue().Update(g); err != nil {
		a.fail(c, err)
		return
	}
	ok(c, g)
}

type startPKReq struct {
	RoomA     int64 `json:"room_a"`
	RoomB     int64 `json:"room_b"`
	DurationS int   `json:"duration_s"`
}

func (a *API) startPK(_ context.Context, c *app.RequestContext) {
	var r startPKReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	ident := identOf(c)
	if ident.Role != RoleAdmin {
		info, err := a.rooms.Get(r.RoomA, ident.UserID)
		if err != nil {
			a.fail(c, err)
			return
		}
		if !info.IsAnchor {
			a.fail(c, proto.Errorf(proto.CodeForbidden, "only room_a's anchor (or an admin) starts a PK"))
			return
		}
	}
	ct, err := a.node.PK.Start(r.RoomA, r.RoomB, time.Duration(r.DurationS)*time.Second)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]any{"pk_id": ct.ID, "rooms": ct.Rooms, "ends_at": ct.EndsAt.UnixMilli()})
}

func (a *API) getPK(_ context.Context, c *app.RequestContext) {
	ct, found := a.node.PK.Get(c.Param("id"))
	if !found {
		a.fail(c, proto.ErrNotFound)
		return
	}
	ok(c, map[string]any{"pk_id": ct.ID, "rooms": ct.Rooms, "scores": ct.Scores, "seq": ct.Seq,
		"ends_at": ct.EndsAt.UnixMilli(), "over": ct.Over})
}
