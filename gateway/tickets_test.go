package gateway_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/edge/ticket"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
)

type ticketReply[T any] struct {
	Code int    `json:"code"`
	Msg  string `json:"msg"`
	Data T      `json:"data"`
}

// ticketCall does one ticket API call and returns the status and reply.
func ticketCall[T any](t *testing.T, e *payEnv, method, path, tok, body string) (int, ticketReply[T]) {
	t.Helper()
	var out ticketReply[T]
	st := nodetest.DoJSON(t, method, nodetest.HTTPURL(e.node)+"/api/v1"+path, tok, body, &out)
	return st, out
}

const programBody = `{"name":"Show","categories":[{"category_id":1,"name":"A","price":380,"rows":2,"cols":5},
	{"category_id":2,"name":"B","price":180,"rows":1,"cols":4}],"per_order_max":4,"per_user_max":6}`

// The ticket API over real HTTP on a real node: roles, bad input codes,
// the program served from memory, a provider-paid order through the same
// signed webhook as recharges (duplicate notify changes nothing), a coins
// order with a coupon, cancel, buyer-only reads, 40003/40004.
func TestTicketHTTPFlow(t *testing.T) {
	e := startPay(t, mockpay.Config{}, func(c *configs.Config) { c.Pay.MaxOpenOrdersPerUser = 1 })
	admin := nodetest.Token(t, e.node, 1, gateway.RoleAdmin)
	buyer := nodetest.Token(t, e.node, 700, gateway.RoleViewer)
	other := nodetest.Token(t, e.node, 701, gateway.RoleViewer)

	if st, r := ticketCall[struct{}](t, e, "POST", "/admin/programs", buyer, programBody); st != 403 || r.Code != 10003 {
		t.Fatalf("viewer creates a program: %d %+v", st, r)
	}
	for _, bad := range []string{`{`, `[]`, `{"name":"x"}`,
		`{"name":"x","categories":[{"category_id":1,"name":"A","price":1,"rows":1000,"cols":5}],"per_order_max":1,"per_user_max":1}`,
		`{"name":"x","categories":[{"category_id":1,"name":"A","price":-1,"rows":1,"cols":5}],"per_order_max":1,"per_user_max":1}`,
		`{"name":"x","categories":[{"category_id":1,"name":"A","price":1,"rows":1,"cols":5}],"per_order_max":5,"per_user_max":1}`} {
		if st, r := ticketCall[struct{}](t, e, "POST", "/admin/programs", admin, bad); st != 400 || r.Code != 10001 {
			t.Fatalf("bad program %s: %d %+v", bad, st, r)
		}
	}
	st, pr := ticketCall[struct {
		ProgramID int64 `json:"program_id"`
	}](t, e, "POST", "/admin/programs", admin, programBody)
	if st != 200 || pr.Data.ProgramID <= 0 {
		t.Fatalf("create program: %d %+v", st, pr)
	}
	prog := pr.Data.ProgramID
	view := func() ticket.View {
		t.Helper()
		st, r := ticketCall[ticket.View](t, e, "GET", fmt.Sprintf("/programs/%d", prog), buyer, "")
		for st == 429 && r.Code == proto.CodeRateLimited { // polled faster than a client may read it
			time.Sleep(time.Second / gateway.ProgramReadsPerSecond)
			st, r = ticketCall[ticket.View](t, e, "GET", fmt.Sprintf("/programs/%d", prog), buyer, "")
		}
		if st != 200 {
			t.Fatalf("get program: %d %+v", st, r)
		}
		return r.Data
	}
	if v := view(); len(v.Categories) != 2 || v.Categories[0].Remaining != 10 || len(v.Seats) != 14 || v.Seats[0].Status != 1 {
		t.Fatalf("program view %+v", v)
	}
	if st, r := ticketCall[struct{}](t, e, "GET", "/programs/abc", buyer, ""); st != 400 || r.Code != 10001 {
		t.Fatalf("bad id: %d %+v", st, r)
	}
	if st, r := ticketCall[struct{}](t, e, "GET", "/programs/999", buyer, ""); st != 404 || r.Code != 10004 {
		t.Fatalf("unknown program: %d %+v", st, r)
	}
	if st, _ := ticketCall[struct{}](t, e, "GET", fmt.Sprintf("/programs/%d", prog), "", ""); st != 401 {
		t.Fatalf("no token: %d", st)
	}

	place := func(tok, body string) (int, ticketReply[ticket.Order]) {
		t.Helper()
		return ticketCall[ticket.Order](t, e, "POST", "/tickets/orders", tok, body)
	}
	// A provider-paid order: pay at the mock provider, which calls the webhook.
	st, o := place(buyer, fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":2,"req_id":"h1"}`, prog))
	if st != 200 || o.Data.Status != "PENDING_PAY" || o.Data.PayURL == "" || o.Data.Amount != 760 || len(o.Data.SeatIDs) != 2 {
		t.Fatalf("place: %d %+v", st, o)
	}
	// The provider is asked for the price in cents (760 coins = 76 元):
	// pay_amount, the pay order and its pay_url agree.
	var payOrder ticketReply[pay.Order]
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(e.node)+"/api/v1/pay/orders/"+o.Data.OrderID, buyer, "", &payOrder); st != 200 ||
		payOrder.Data.Amount != 760*pay.CentsPerCoin || o.Data.PayAmount != payOrder.Data.Amount || !strings.Contains(o.Data.PayURL, "amount=7600&") {
		t.Fatalf("pay order of a 760-coin ticket order: %d %+v, pay_amount %d, pay_url %s", st, payOrder.Data, o.Data.PayAmount, o.Data.PayURL)
	}
	if _, again := place(buyer, fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":2,"req_id":"h1"}`, prog)); again.Data.OrderID != o.Data.OrderID {
		t.Fatalf("same req_id gave %+v", again)
	}
	// An unpaid ticket order does not count towards the recharge orders'
	// open-order bound (pay.max_open_orders_per_user, 1 here).
	e.createOrder(t, 700, 1, "recharge-while-a-ticket-is-unpaid")
	resp, err := http.Post(o.Data.PayURL, "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("pay: %v %v", err, resp)
	}
	resp.Body.Close()
	orderStatus := func(tok, id string) string {
		_, r := ticketCall[ticket.Order](t, e, "GET", "/tickets/orders/"+id, tok, "")
		return r.Data.Status
	}
	nodetest.Eventually(t, 10*time.Second, func() bool { return orderStatus(buyer, o.Data.OrderID) == "PAID" }, "order not PAID")
	// The order is durable first, then its seats move in memory: poll.
	nodetest.Eventually(t, 5*time.Second, func() bool { return view().Categories[0].Sold == 2 }, "seats not sold")
	if v := view(); v.Categories[0].Sold != 2 || v.Categories[0].Remaining != 8 || v.Categories[0].Locked != 0 {
		t.Fatalf("after payment %+v", v.Categories[0])
	}
	if st, r := ticketCall[struct{}](t, e, "GET", "/tickets/orders/"+o.Data.OrderID, other, ""); st != 404 || r.Code != 10004 {
		t.Fatalf("another user reads the order: %d %+v", st, r)
	}
	// A second order paid by a signed notify delivered twice.
	_, o2 := place(buyer, fmt.Sprintf(`{"program_id":%d,"seat_ids":["2-1-1"],"req_id":"h2"}`, prog))
	po := pay.Order{OrderID: o2.Data.OrderID}
	// Its coin amount is not what the provider charged: refused, nothing sold.
	body, sig := signedEvent(e, po, "tkt-evt-coins", o2.Data.Amount)
	if st, b := e.post(t, sig, body); st != 409 || !strings.Contains(b, "10409") {
		t.Fatalf("notify of the coin amount: %d %s", st, b)
	}
	body, sig = signedEvent(e, po, "tkt-evt-1", o2.Data.PayAmount)
	for k := 0; k < 2; k++ {
		if st, b := e.post(t, sig, body); st != 200 || b != "success" {
			t.Fatalf("notify: %d %s", st, b)
		}
	}
	if s := orderStatus(buyer, o2.Data.OrderID); s != "PAID" {
		t.Fatalf("notified order %s", s)
	}
	if v := view(); v.Categories[1].Sold != 1 {
		t.Fatalf("category B %+v", v.Categories[1])
	}
	if b := e.balance(t, 700); b != 0 {
		t.Fatalf("a ticket payment credited coins: %d", b)
	}
	// 40003 and 40004.
	if st, r := place(other, fmt.Sprintf(`{"program_id":%d,"seat_ids":["2-1-1"],"req_id":"x"}`, prog)); st != 409 || r.Code != 40003 {
		t.Fatalf("taken seat: %d %+v", st, r)
	}
	if st, r := place(other, fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":5,"req_id":"x"}`, prog)); st != 400 || r.Code != 40004 {
		t.Fatalf("over per_order_max: %d %+v", st, r)
	}
	if st, r := place(buyer, fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":4,"req_id":"h3"}`, prog)); st != 400 || r.Code != 40004 {
		t.Fatalf("over per_user_max: %d %+v", st, r)
	}
	if st, r := place(other, `{"program_id":"x"}`); st != 400 || r.Code != 10001 {
		t.Fatalf("bad body: %d %+v", st, r)
	}
	// Cancel: buyer only, PENDING_PAY (or CANCELLED already) only.
	_, o3 := place(other, fmt.Sprintf(`{"program_id":%d,"seat_ids":["1-2-5"],"req_id":"c1"}`, prog))
	if st, r := ticketCall[struct{}](t, e, "POST", "/tickets/orders/"+o3.Data.OrderID+"/cancel", buyer, ""); st != 404 || r.Code != 10004 {
		t.Fatalf("someone else cancels: %d %+v", st, r)
	}
	if st, r := ticketCall[ticket.Order](t, e, "POST", "/tickets/orders/"+o3.Data.OrderID+"/cancel", other, ""); st != 200 || r.Data.Status != "CANCELLED" {
		t.Fatalf("cancel: %d %+v", st, r)
	}
	// A retried cancel (its answer lost) answers the cancelled order.
	if st, r := ticketCall[ticket.Order](t, e, "POST", "/tickets/orders/"+o3.Data.OrderID+"/cancel", other, ""); st != 200 || r.Code != 0 || r.Data.Status != "CANCELLED" || r.Data.OrderID != o3.Data.OrderID {
		t.Fatalf("cancel twice: %d %+v", st, r)
	}
	if st, r := ticketCall[struct{}](t, e, "POST", "/tickets/orders/"+o.Data.OrderID+"/cancel", buyer, ""); st != 409 || r.Code != 40002 {
		t.Fatalf("cancel a paid order: %d %+v", st, r)
	}
	// Coins with a coupon: the saga answers PAID.
	if st, r := ticketCall[struct{}](t, e, "POST", "/admin/coupons", buyer, `{"user_id":701,"amount":80}`); st != 403 || r.Code != 10003 {
		t.Fatalf("viewer grants a coupon: %d %+v", st, r)
	}
	_, cp := ticketCall[ticket.Coupon](t, e, "POST", "/admin/coupons", admin, `{"user_id":701,"amount":80}`)
	if cp.Data.ID == "" {
		t.Fatalf("coupon %+v", cp)
	}
	// With a req_id: sent again, the first coupon; another amount, 10409.
	_, g1 := ticketCall[ticket.Coupon](t, e, "POST", "/admin/coupons", admin, `{"user_id":701,"amount":5,"req_id":"grant-1"}`)
	if _, g2 := ticketCall[ticket.Coupon](t, e, "POST", "/admin/coupons", admin, `{"user_id":701,"amount":5,"req_id":"grant-1"}`); g1.Data.ID == "" || g2.Data != g1.Data {
		t.Fatalf("a grant sent twice: %+v then %+v", g1, g2)
	}
	if st, r := ticketCall[struct{}](t, e, "POST", "/admin/coupons", admin, `{"user_id":701,"amount":6,"req_id":"grant-1"}`); st != 409 || r.Code != 10409 {
		t.Fatalf("the req_id again for another amount: %d %+v", st, r)
	}
	if st, r := place(other, fmt.Sprintf(`{"program_id":%d,"seat_ids":["1-2-5"],"req_id":"k1","pay":"coins","coupon_id":%q}`, prog, cp.Data.ID)); st != 409 || r.Code != 20001 {
		t.Fatalf("coins without coins: %d %+v", st, r)
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(e.node)+"/api/v1/dev/credit", "", `{"user_id":701,"amount":500,"req_id":"t1"}`, nil); st != 200 {
		t.Fatalf("credit %d", st)
	}
	st, k := place(other, fmt.Sprintf(`{"program_id":%d,"seat_ids":["1-2-5"],"req_id":"k2","pay":"coins","coupon_id":%q}`, prog, cp.Data.ID))
	if st != 200 || k.Data.Status != "PAID" || k.Data.Amount != 300 {
		t.Fatalf("coins order: %d %+v", st, k)
	}
	if b := e.balance(t, 701); b != 200 {
		t.Fatalf("balance %d after a 300-coin ticket", b)
	}
	if st, r := place(buyer, fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":1,"req_id":"k3","coupon_id":%q}`, prog, cp.Data.ID)); st != 400 || r.Code != 40005 {
		t.Fatalf("someone else's coupon: %d %+v", st, r)
	}
	persisttest.CheckConservation(t, e.node.Ledger)
	resp, err = http.Get(nodetest.HTTPURL(e.node) + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`liveedge_ticket_orders_total{node="gw-1",outcome="paid"} 1`,
		`liveedge_ticket_orders_total{node="gw-1",outcome="sold_out"} 1`,
		`liveedge_ticket_orders_closed_total{node="gw-1",reason="cancel"} 1`,
		`liveedge_ticket_saga_compensations_total{node="gw-1",step="seats"} 1`} {
		if !strings.Contains(string(m), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// The smaller HTTP run of the concurrency test (the 10,000-buyer run is
// in-process in edge/ticket): 2,000 buyers over real HTTP for 200 seats,
// exactly 200 seats taken, none twice.
func TestTicketHTTPConcurrentBuyers(t *testing.T) {
	e := startPay(t, mockpay.Config{}, nil)
	admin := nodetest.Token(t, e.node, 1, gateway.RoleAdmin)
	_, pr := ticketCall[struct {
		ProgramID int64 `json:"program_id"`
	}](t, e, "POST", "/admin/programs", admin,
		`{"name":"Hot","categories":[{"category_id":1,"name":"A","price":100,"rows":10,"cols":20}],"per_order_max":2,"per_user_max":2}`)
	prog := pr.Data.ProgramID
	const buyers = 2000
	toks := make([]string, buyers)
	for i := range toks {
		toks[i] = nodetest.Token(t, e.node, int64(10_000+i), gateway.RoleViewer)
	}
	var (
		mu    sync.Mutex
		owner = map[string]string{}
		codes = map[int]int{}
		wg    sync.WaitGroup
		sem   = make(chan struct{}, 64)
	)
	for i := 0; i < buyers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			body := fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":%d,"req_id":"b%d"}`, prog, 1+i%2, i)
			if i%4 == 3 {
				body = fmt.Sprintf(`{"program_id":%d,"seat_ids":["1-%d-%d"],"req_id":"b%d"}`, prog, 1+i%10, 1+i%20, i)
			}
			_, r := ticketCall[ticket.Order](t, e, "POST", "/tickets/orders", toks[i], body)
			mu.Lock()
			defer mu.Unlock()
			codes[r.Code]++
			for _, s := range r.Data.SeatIDs {
				if prev, dup := owner[s]; dup {
					t.Errorf("seat %s in orders %s and %s", s, prev, r.Data.OrderID)
				}
				owner[s] = r.Data.OrderID
			}
		}()
	}
	wg.Wait()
	if len(owner) != 200 || codes[0]+codes[40003] != buyers {
		t.Fatalf("%d seats taken, codes %v", len(owner), codes)
	}
	_, v := ticketCall[ticket.View](t, e, "GET", fmt.Sprintf("/programs/%d", prog), admin, "")
	if c := v.Data.Categories[0]; c.Locked != 200 || c.Remaining != 0 || c.Sold != 0 {
		t.Fatalf("category %+v", c)
	}
}

// tickets.pay_timeout through a real node: an unpaid order closes by
// itself and frees its seats; its payment arriving afterwards through the
// webhook is refunded (order REFUNDED, pay order PAY_BACK), not sold.
func TestTicketHTTPTimeoutThenLatePayment(t *testing.T) {
	e := startPay(t, mockpay.Config{}, func(c *configs.Config) { c.Tickets.PayTimeout = configs.Duration(time.Second) })
	admin := nodetest.Token(t, e.node, 1, gateway.RoleAdmin)
	buyer := nodetest.Token(t, e.node, 800, gateway.RoleViewer)
	_, pr := ticketCall[struct {
		ProgramID int64 `json:"program_id"`
	}](t, e, "POST", "/admin/programs", admin, programBody)
	st, o := ticketCall[ticket.Order](t, e, "POST", "/tickets/orders", buyer,
		fmt.Sprintf(`{"program_id":%d,"category_id":2,"count":3,"req_id":"late"}`, pr.Data.ProgramID))
	if st != 200 || o.Data.Status != "PENDING_PAY" {
		t.Fatalf("place %d %+v", st, o)
	}
	remaining := func() int {
		_, v := ticketCall[ticket.View](t, e, "GET", fmt.Sprintf("/programs/%d", pr.Data.ProgramID), buyer, "")
		return v.Data.Categories[1].Remaining
	}
	if r := remaining(); r != 1 {
		t.Fatalf("remaining %d", r)
	}
	status := func() string {
		_, r := ticketCall[ticket.Order](t, e, "GET", "/tickets/orders/"+o.Data.OrderID, buyer, "")
		return r.Data.Status
	}
	nodetest.Eventually(t, 10*time.Second, func() bool { return status() == "CANCELLED" }, "unpaid order not closed")
	nodetest.Eventually(t, 5*time.Second, func() bool { return remaining() == 4 }, "seats not released")
	body, sig := signedEvent(e, pay.Order{OrderID: o.Data.OrderID}, "late-evt", o.Data.PayAmount)
	for k := 0; k < 2; k++ {
		if st, b := e.post(t, sig, body); st != 200 || b != "success" {
			t.Fatalf("late notify %d %s", st, b)
		}
	}
	if s := status(); s != "REFUNDED" {
		t.Fatalf("late-paid order %s", s)
	}
	if po := e.order(t, o.Data.OrderID); po.Status != pay.StatusPayBack {
		t.Fatalf("pay order %s", po.Status)
	}
	if r := remaining(); r != 4 {
		t.Fatalf("a late payment took seats: remaining %d", r)
	}
}

// A user reads program views at most gateway.ProgramReadsPerSecond a second
// (bursts of gateway.ProgramReadBurst): beyond, 429 10429 — a viewer
// looping on a big program's megabyte of seats costs the node nothing more
// (it sent and, between nodes, gzipped a megabyte per request). Another
// user is not held back by it, nor is an admin held to it.
func TestProgramReadsRateLimitedPerUser(t *testing.T) {
	e := startPay(t, mockpay.Config{}, nil)
	admin := nodetest.Token(t, e.node, 1, gateway.RoleAdmin)
	looper := nodetest.Token(t, e.node, 710, gateway.RoleViewer)
	other := nodetest.Token(t, e.node, 711, gateway.RoleViewer)
	st, pr := ticketCall[struct {
		ProgramID int64 `json:"program_id"`
	}](t, e, "POST", "/admin/programs", admin, programBody)
	if st != 200 {
		t.Fatalf("create program: %d %+v", st, pr)
	}
	path := fmt.Sprintf("/programs/%d", pr.Data.ProgramID)
	limited := 0
	for range gateway.ProgramReadBurst + 5 {
		st, r := ticketCall[ticket.View](t, e, "GET", path, looper, "")
		switch {
		case st == 200 && len(r.Data.Seats) == 14:
		case st == 429 && r.Code == proto.CodeRateLimited:
			limited++
		default:
			t.Fatalf("read: %d %+v", st, r)
		}
	}
	if limited == 0 {
		t.Fatalf("%d reads in a row, none limited", gateway.ProgramReadBurst+5)
	}
	if st, r := ticketCall[ticket.View](t, e, "GET", path, other, ""); st != 200 || len(r.Data.Seats) != 14 {
		t.Fatalf("another user's read: %d %+v", st, r)
	}
	for i := range 3 * gateway.ProgramReadBurst { // an operator's dashboard: not held to it
		if st, r := ticketCall[ticket.View](t, e, "GET", path, admin, ""); st != 200 || len(r.Data.Seats) != 14 {
			t.Fatalf("admin read %d: %d %+v", i, st, r)
		}
	}
}
