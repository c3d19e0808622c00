package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
)

func setStatus(t *testing.T, n *gateway.Node, token string, user int64, body string) (int, int) {
	t.Helper()
	var out struct {
		Code int `json:"code"`
	}
	st := nodetest.DoJSON(t, "PUT", fmt.Sprintf("%s/api/v1/admin/users/%d/status", nodetest.HTTPURL(n), user), token, body, &out)
	return st, out.Code
}

func getStatus(t *testing.T, n *gateway.Node, token string, user int64) int {
	t.Helper()
	var out struct {
		Data struct {
			Status int `json:"status"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "GET", fmt.Sprintf("%s/api/v1/admin/users/%d/status", nodetest.HTTPURL(n), user), token, "", &out); st != 200 {
		t.Fatalf("get status: %d", st)
	}
	return out.Data.Status
}

// A frozen account (SPEC §2, status 2) can neither send nor receive: a
// frozen sender's gift and a gift to a frozen receiver are refused with
// 20004 (biz 5557 to the sender), nothing moved; a frozen user cannot
// create a payment order; the freeze is durable across a restart; an
// unfreeze lets coins move again. Only an admin sets the status.
func TestFrozenAccountMovesNothing(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.Limits.GiftPerSecond = 0
	n := nodetest.Start(t, cfg)
	const anchor, sender = 1, 50
	room := nodetest.OpenRoom(t, n, anchor, 0)
	admin := nodetest.Token(t, n, 9000, gateway.RoleAdmin)
	devCredit(t, n, sender, 1000)

	// Only admins; only 1 or 2.
	if st, code := setStatus(t, n, nodetest.Token(t, n, sender, gateway.RoleAnchor), sender, `{"status":2}`); st != 403 || code != proto.CodeForbidden {
		t.Fatalf("non-admin freeze: %d %d", st, code)
	}
	for _, bad := range []string{`{"status":3}`, `{"status":0}`, `{"status":"x"}`, `nope`} {
		if st, code := setStatus(t, n, admin, sender, bad); st != 400 || code != proto.CodeBadRequest {
			t.Fatalf("bad status %s: %d %d", bad, st, code)
		}
	}
	if s := getStatus(t, n, admin, sender); s != 1 {
		t.Fatalf("initial status %d", s)
	}

	var log pushLog
	c := sdkDial(t, n, sender, &log, nil)
	ctx := context.Background()
	if _, err := c.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	refused := func(req string) {
		t.Helper()
		_, err := sendGift(ctx, c, giftReq(room, anchor, 23, 1, req))
		var pe *proto.Error
		if !errors.As(err, &pe) || pe.Code != proto.CodeAccountFrozen {
			t.Fatalf("gift %s: %v, want code %d", req, err, proto.CodeAccountFrozen)
		}
		if b, _ := n.Ledger.Balance(sender); b != 1000 {
			t.Fatalf("sender balance %d after a refused gift", b)
		}
		if r, _ := n.Ledger.Tally(gift.TallyReceived, anchor); r != 0 {
			t.Fatalf("receiver got %d", r)
		}
		nodetest.Eventually(t, 5*time.Second, func() bool {
			for _, p := range log.snapshot() {
				var d gift.FailedPush
				if p.Biz == proto.BizGiftFailed && proto.Unmarshal(p.Data, &d) == nil && d.ReqID == req && d.Code == proto.CodeAccountFrozen {
					return true
				}
			}
			return false
		}, "no biz 5557 with 20004 for %s", req)
	}

	// Frozen sender.
	if st, _ := setStatus(t, n, admin, sender, `{"status":2}`); st != 200 {
		t.Fatalf("freeze: %d", st)
	}
	if s := getStatus(t, n, admin, sender); s != 2 {
		t.Fatalf("status %d after freeze", s)
	}
	refused("frozen-sender")
	var order struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/pay/orders", nodetest.Token(t, n, sender, gateway.RoleViewer),
		`{"product_id":1,"channel":"mock","req_id":"frozen-order"}`, &order); st != 403 || order.Code != proto.CodeAccountFrozen {
		t.Fatalf("frozen user's order: %d %d", st, order.Code)
	}

	// Frozen receiver (the sender unfrozen).
	if st, _ := setStatus(t, n, admin, sender, `{"status":1}`); st != 200 {
		t.Fatalf("unfreeze: %d", st)
	}
	if st, _ := setStatus(t, n, admin, anchor, `{"status":2}`); st != 200 {
		t.Fatalf("freeze receiver: %d", st)
	}
	refused("frozen-receiver")
	persisttest.CheckConservation(t, n.Ledger)

	// The freeze survives a restart.
	c.Close()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if err := n.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	n = nodetest.Start(t, cfg)
	admin = nodetest.Token(t, n, 9000, gateway.RoleAdmin)
	if s := getStatus(t, n, admin, anchor); s != 2 {
		t.Fatalf("receiver status %d after restart", s)
	}
	if s := getStatus(t, n, admin, sender); s != 1 {
		t.Fatalf("sender status %d after restart", s)
	}
	c = sdkDial(t, n, sender, &log, nil)
	if _, err := c.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	refused("frozen-receiver-after-restart")

	// Unfrozen: the gift goes through.
	if st, _ := setStatus(t, n, admin, anchor, `{"status":1}`); st != 200 {
		t.Fatalf("unfreeze receiver: %d", st)
	}
	if _, err := sendGift(ctx, c, giftReq(room, anchor, 23, 1, "unfrozen")); err != nil {
		t.Fatalf("gift after unfreeze: %v", err)
	}
	if b, _ := n.Ledger.Balance(sender); b != 980 {
		t.Fatalf("sender balance %d", b)
	}
	if r, _ := n.Ledger.Tally(gift.TallyReceived, anchor); r != 20 {
		t.Fatalf("received %d", r)
	}
	cr, db, _ := persisttest.CheckConservation(t, n.Ledger)
	if cr != 1000 || db != 20 { // the dev credit, the one gift
		t.Fatalf("credits %d debits %d", cr, db)
	}
}

// A frozen account moves no coins through tickets or red packets either:
// a ticket order (provider-paid or with coins) is refused with 20004 and
// leaves neither an order nor a pay order; a frozen anchor's rain is not
// prepared (its debit) and a frozen viewer grabs nothing (its credit).
// Before, only gifts and POST /pay/orders checked the freeze.
func TestFrozenAccountBuysNoTicketsAndMovesNoRain(t *testing.T) {
	cfg := rpConfig(t)
	n := nodetest.Start(t, cfg)
	admin := nodetest.Token(t, n, 9000, gateway.RoleAdmin)
	const buyer, anchor, viewer = 60, 61, 62
	devCredit(t, n, buyer, 1000)
	devCredit(t, n, anchor, 1000)
	var prog struct {
		Code int `json:"code"`
		Data struct {
			ProgramID int64 `json:"program_id"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/admin/programs", admin, programBody, &prog); st != 200 || prog.Code != 0 {
		t.Fatalf("program: %d %+v", st, prog)
	}
	for _, u := range []int64{buyer, anchor, viewer} {
		if st, _ := setStatus(t, n, admin, u, `{"status":2}`); st != 200 {
			t.Fatalf("freeze %d: %d", u, st)
		}
	}
	for _, pay := range []string{"mock", "coins"} {
		var out struct {
			Code int `json:"code"`
		}
		body := fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":1,"req_id":"f-%s","pay":%q}`, prog.Data.ProgramID, pay, pay)
		if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/tickets/orders", nodetest.Token(t, n, buyer, gateway.RoleViewer), body, &out); st != 403 || out.Code != proto.CodeAccountFrozen {
			t.Fatalf("frozen buyer's %s ticket order: %d %d, want 403 %d", pay, st, out.Code, proto.CodeAccountFrozen)
		}
	}
	if v, err := n.Tickets.Program(prog.Data.ProgramID); err != nil || v.Categories[0].Remaining != 10 {
		t.Fatalf("seats after the refused orders: %+v %v", v, err)
	}
	room := nodetest.OpenRoom(t, n, anchor, 0)
	st, r := rpCall(t, n, anchor, "POST", fmt.Sprintf("/rooms/%d/redpackets", room), `{"total_amount":100,"total_count":2,"duration_s":30}`)
	if st != 200 || r.Code != 0 {
		t.Fatalf("create rain: %d %+v", st, r)
	}
	code := r.Data.Code
	if st, r := rpCall(t, n, anchor, "POST", "/redpackets/"+code+"/prepare", ""); st != 403 || r.Code != proto.CodeAccountFrozen {
		t.Fatalf("frozen anchor's prepare: %d %+v", st, r)
	}
	if b, _ := n.Ledger.Balance(anchor); b != 1000 {
		t.Fatalf("frozen anchor's balance %d", b)
	}
	if st, _ := setStatus(t, n, admin, anchor, `{"status":1}`); st != 200 {
		t.Fatalf("unfreeze: %d", st)
	}
	if st, r := rpCall(t, n, anchor, "POST", "/redpackets/"+code+"/prepare", ""); st != 200 || r.Data.State != redpacket.StatePrepared {
		t.Fatalf("prepare once unfrozen: %d %+v", st, r)
	}
	if st, r := rpCall(t, n, anchor, "POST", "/redpackets/"+code+"/start", ""); st != 200 || r.Data.State != redpacket.StateRunning {
		t.Fatalf("start: %d %+v", st, r)
	}
	var log pushLog
	c := joinedViewer(t, n, viewer, room, &log)
	if _, err := c.Grab(context.Background(), code); nodetest.CodeOf(err) != proto.CodeAccountFrozen {
		t.Fatalf("frozen viewer's grab: %v, want %d", err, proto.CodeAccountFrozen)
	}
	if b, _ := n.Ledger.Balance(viewer); b != 0 {
		t.Fatalf("frozen viewer's balance %d", b)
	}
	persisttest.CheckConservation(t, n.Ledger)
}

// A retry of a payment order made before its user was frozen answers that
// order (the same req_id is the same order), as the protocol's idempotency
// says; only a new order is refused. Before, the retry was 20004.
func TestOrderRetryAfterAFreezeAnswersTheOrder(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	const user = 51
	admin := nodetest.Token(t, n, 9000, gateway.RoleAdmin)
	create := func(req string) (int, int, string) {
		var out struct {
			Code int `json:"code"`
			Data struct {
				OrderID string `json:"order_id"`
			} `json:"data"`
		}
		st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/pay/orders", nodetest.Token(t, n, user, gateway.RoleViewer),
			fmt.Sprintf(`{"product_id":1,"channel":"mock","req_id":%q}`, req), &out)
		return st, out.Code, out.Data.OrderID
	}
	st, code, first := create("before")
	if st != 200 || code != 0 || first == "" {
		t.Fatalf("order: %d %d", st, code)
	}
	if st, _ := setStatus(t, n, admin, user, `{"status":2}`); st != 200 {
		t.Fatalf("freeze: %d", st)
	}
	if st, code, again := create("before"); st != 200 || code != 0 || again != first {
		t.Fatalf("the retry after the freeze: %d %d %q, want the first order %q", st, code, again, first)
	}
	if st, code, _ := create("after"); st != 403 || code != proto.CodeAccountFrozen {
		t.Fatalf("a new order after the freeze: %d %d, want 20004", st, code)
	}
}

// A dev credit to a frozen account is refused (a frozen account moves
// nothing); the retry of one made before the freeze replays it. Before,
// the dev credit ignored the freeze.
func TestDevCreditRefusedToAFrozenAccount(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	const user = 52
	admin := nodetest.Token(t, n, 9000, gateway.RoleAdmin)
	credit := func(req string) (int, int) {
		var out struct {
			Code int `json:"code"`
		}
		st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/dev/credit", "",
			fmt.Sprintf(`{"user_id":%d,"amount":10,"req_id":%q}`, user, req), &out)
		return st, out.Code
	}
	if st, code := credit("c1"); st != 200 || code != 0 {
		t.Fatalf("credit: %d %d", st, code)
	}
	if st, _ := setStatus(t, n, admin, user, `{"status":2}`); st != 200 {
		t.Fatalf("freeze: %d", st)
	}
	if st, code := credit("c1"); st != 200 || code != 0 {
		t.Fatalf("the retry of a credit made before the freeze: %d %d, want its replay", st, code)
	}
	if st, code := credit("c2"); st != 403 || code != proto.CodeAccountFrozen {
		t.Fatalf("a new credit to a frozen account: %d %d, want 20004", st, code)
	}
	if b, _ := n.Wallet.Balance(user); b != 10 {
		t.Fatalf("balance %d, want 10", b)
	}
}
