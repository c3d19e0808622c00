package gateway

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"time"

	"github.com/cloudwego/hertz/pkg/app"

	"github.com/liveedge/liveedge/edge/account"
	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/edge/pk"
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
		Postings: []persist.Posting{{User: r.UserID, Delta: r.Amount, Reason: persist.ReasonDev, Ref: "dev credit"}},
		// A frozen account moves nothing (a retry of a credit made before
		// the freeze replays it: Check runs for new requests only).
		Check: func() error { return account.Refuse(a.node.Accounts.Frozen, r.UserID, "no coins can be credited") }})
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

// adminPathID is the {id} of an admin-only path; false when the caller is
// not an admin or the id is bad (the answer is written).
func (a *API) adminPathID(c *app.RequestContext) (int64, bool) {
	if !a.requireAdmin(c) {
		return 0, false
	}
	id, err := pathID(c)
	if err != nil {
		a.fail(c, err)
		return 0, false
	}
	return id, true
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
	g, err := a.node.Gifts.Catalogue().Create(g) // as stored: its version is the write's, not the body's
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, g)
}

func (a *API) updateGift(_ context.Context, c *app.RequestContext) {
	id, okID := a.adminPathID(c)
	if !okID {
		return
	}
	// Fields absent from the body keep their value — the stored one, read
	// in the same compare-and-set as the write (this node's copy may lag a
	// change made through another node).
	g, err := a.node.Gifts.Catalogue().Update(id, func(g *gift.Gift) error { return bind(c, g) })
	if err != nil {
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

// startPK pairs two rooms. An anchor (of room_a) only invites: the answer
// is {"pk_id","status":"invited","expires_at"} and the contest starts when
// room_b's anchor accepts (POST /pk/{id}/accept). An admin pairs at once
// ("status":"running").
func (a *API) startPK(_ context.Context, c *app.RequestContext) {
	var r startPKReq
	if err := bind(c, &r); err != nil {
		a.fail(c, err)
		return
	}
	ident := identOf(c)
	// Clamped before the multiplication (a huge duration_s wrapped to a valid
	// one); the service checks the bounds.
	d := time.Duration(max(0, min(r.DurationS, 1<<32))) * time.Second
	if ident.Role == RoleAdmin {
		ct, err := a.node.PK.Start(r.RoomA, r.RoomB, d)
		if err != nil {
			a.fail(c, err)
			return
		}
		ok(c, contestView(ct))
		return
	}
	if r.RoomA <= 0 || r.RoomB <= 0 {
		// 10001 as for an admin (pk's checks), not room_a's lookup's 10004.
		a.fail(c, proto.BadRequest("room_a and room_b must be room ids"))
		return
	}
	info, err := a.rooms.Get(r.RoomA, ident.UserID)
	if err != nil {
		a.fail(c, err)
		return
	}
	if !info.IsAnchor {
		a.fail(c, proto.Errorf(proto.CodeForbidden, "only room_a's anchor (or an admin) starts a PK"))
		return
	}
	inv, err := a.node.PK.Invite(ident.UserID, r.RoomA, r.RoomB, d)
	if err != nil {
		a.fail(c, err)
		return
	}
	view := invitationView(inv)
	if b, err := a.rooms.Get(r.RoomB, 0); err == nil {
		if data, err := proto.Marshal(view); err == nil {
			a.node.Router.SendUser(b.AnchorID, proto.Push{Biz: proto.BizPKInvite, Data: data, Ack: true})
		}
	}
	ok(c, view)
}

func contestView(ct pk.Contest) map[string]any {
	status := "running"
	if ct.Over {
		status = "over"
	}
	return map[string]any{"pk_id": ct.ID, "status": status, "rooms": ct.Rooms, "scores": ct.ScoreMap(), "seq": ct.Seq,
		"ends_at": ct.EndsAt.UnixMilli(), "over": ct.Over}
}

func invitationView(inv pk.Invitation) map[string]any {
	return map[string]any{"pk_id": inv.ID, "status": "invited", "rooms": inv.Rooms, "inviter": inv.Inviter,
		"duration_s": int(inv.Duration.Seconds()), "expires_at": inv.ExpiresAt.UnixMilli()}
}

// pkInvitationFor returns invitation id if the caller may answer it: room_b's
// anchor (accept or decline), the inviter (decline only: withdraw), an admin.
func (a *API) pkInvitationFor(c *app.RequestContext, accept bool) (pk.Invitation, bool) {
	inv, found, err := a.node.PK.FindInvitation(c.Param("id"))
	if err != nil {
		a.fail(c, err) // could not be read: retry, not "not found"
		return inv, false
	}
	if !found {
		a.fail(c, proto.Errorf(proto.CodeNotFound, "PK invitation not found or expired"))
		return inv, false
	}
	ident := identOf(c)
	if ident.Role == RoleAdmin || (!accept && ident.UserID == inv.Inviter) {
		return inv, true
	}
	info, err := a.rooms.Get(inv.Rooms[1], ident.UserID)
	if err == nil && info.IsAnchor {
		return inv, true
	}
	if err != nil && proto.AsError(err).Code != proto.CodeNotFound {
		a.fail(c, err) // the room could not be read: retry, not "forbidden"
		return inv, false
	}
	a.fail(c, proto.Errorf(proto.CodeForbidden, "only room_b's anchor answers this PK invitation"))
	return inv, false
}

func (a *API) acceptPK(_ context.Context, c *app.RequestContext) {
	inv, allowed := a.pkInvitationFor(c, true)
	if !allowed {
		return
	}
	ct, err := a.node.PK.Accept(inv.ID)
	if err != nil {
		a.fail(c, err)
		return
	}
	ok(c, contestView(ct))
}

func (a *API) declinePK(_ context.Context, c *app.RequestContext) {
	inv, allowed := a.pkInvitationFor(c, false)
	if !allowed {
		return
	}
	if err := a.node.PK.Decline(inv.ID); err != nil {
		a.fail(c, err)
		return
	}
	ok(c, map[string]any{"pk_id": inv.ID, "status": "declined"})
}

// getPK answers a contest (scores keyed by room id, as in biz 5558) or a
// pending invitation ("status":"invited").
func (a *API) getPK(_ context.Context, c *app.RequestContext) {
	ct, found, err := a.node.PK.Find(c.Param("id"))
	if err == nil && found {
		ok(c, contestView(ct))
		return
	}
	inv, foundInv, errInv := a.node.PK.FindInvitation(c.Param("id"))
	if errInv == nil && foundInv {
		ok(c, invitationView(inv))
		return
	}
	if err = cmp.Or(err, errInv); err != nil {
		a.fail(c, err) // could not be read: retry, not "not found"
		return
	}
	a.fail(c, proto.ErrNotFound)
}
