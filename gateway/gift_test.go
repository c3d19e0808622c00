package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

const heartGift = 24 // 爱心气泡, price 1

func devCredit(t *testing.T, n *gateway.Node, user, amount int64) {
	t.Helper()
	var out struct {
		Code int `json:"code"`
	}
	st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":%d}`, user, amount), &out)
	if st != 200 || out.Code != 0 {
		t.Fatalf("dev credit: %d %d", st, out.Code)
	}
}

func giftReq(room, receiver int64, giftID int64, count int, req string) map[string]any {
	return map[string]any{"room_id": room, "gift_id": giftID, "receiver_id": receiver, "count": count, "req_id": req}
}

func sendGift(ctx context.Context, c *clientsdk.Client, d map[string]any) (gift.Reply, error) {
	var rep gift.Reply
	b, err := c.Request(ctx, proto.TypeGift, d)
	if err != nil {
		return rep, err
	}
	err = proto.Unmarshal(b, &rep)
	return rep, err
}

func giftConfig(t *testing.T) *gateway.Node {
	cfg := nodetest.Config(t)
	cfg.Limits.GiftPerSecond = 0
	cfg.WS.MaxConnsPerUser = 16 // TestGiftStormNeverOverdraws: one sender on 10 connections
	return nodetest.Start(t, cfg)
}

// One user with balance 500 sends 1,000 concurrent 1-coin gifts from several
// connections: exactly 500 succeed, the balance ends at 0 and never below,
// 500 failure notices (biz 5557), 500 gift debits in the ledger.
func TestGiftStormNeverOverdraws(t *testing.T) {
	n := giftConfig(t)
	room := nodetest.OpenRoom(t, n, 1, 0)
	const sender, receiver = 100, 1
	devCredit(t, n, sender, 500)

	const conns, perConn = 10, 100
	var failMu sync.Mutex
	failMids := map[string]bool{}
	clients := make([]*clientsdk.Client, conns)
	for i := range clients {
		clients[i] = sdkDial(t, n, sender, nil, func(c *clientsdk.Config) {
			c.OnPush = func(p clientsdk.Push) {
				if p.Biz == proto.BizGiftFailed {
					failMu.Lock()
					failMids[p.Mid] = true
					failMu.Unlock()
				}
			}
		})
		if _, err := clients[i].Join(context.Background(), room); err != nil {
			t.Fatal(err)
		}
	}
	var ok, poor atomic.Int64
	var wg sync.WaitGroup
	for i, c := range clients {
		for j := 0; j < perConn; j++ {
			wg.Add(1)
			go func(c *clientsdk.Client, k int) {
				defer wg.Done()
				_, err := sendGift(context.Background(), c, giftReq(room, receiver, heartGift, 1, fmt.Sprintf("storm-%d", k)))
				var pe *proto.Error
				switch {
				case err == nil:
					ok.Add(1)
				case errors.As(err, &pe) && pe.Code == proto.CodeInsufficientBalance:
					poor.Add(1)
				default:
					t.Errorf("gift %d: %v", k, err)
				}
			}(c, i*perConn+j)
		}
	}
	wg.Wait()
	if ok.Load() != 500 || poor.Load() != 500 {
		t.Fatalf("ok %d insufficient %d", ok.Load(), poor.Load())
	}
	if b, _ := n.Ledger.Balance(sender); b != 0 {
		t.Fatalf("balance %d", b)
	}
	nFail := func() int {
		failMu.Lock()
		defer failMu.Unlock()
		return len(failMids)
	}
	nodetest.Eventually(t, 10*time.Second, func() bool { return nFail() == 500 }, "failure notices: want 500")
	if k := nFail(); k != 500 {
		t.Fatalf("failure notices %d", k)
	}
	trades, _ := n.Ledger.Trades(sender, 0, 10000)
	gifts := 0
	for _, tr := range trades {
		if tr.Reason == persist.ReasonGift {
			gifts++
			if tr.Delta != -1 || tr.Balance < 0 {
				t.Fatalf("bad trade %+v", tr)
			}
		}
	}
	if gifts != 500 {
		t.Fatalf("ledger has %d gift debits", gifts)
	}
	if recv, _ := n.Ledger.Tally(gift.TallyReceived, receiver); recv != 500 {
		t.Fatalf("receiver tally %d", recv)
	}
	c, d, b := persisttest.CheckConservation(t, n.Ledger)
	if c != 500 || d != 500 || b != 0 {
		t.Fatalf("credits %d debits %d balances %d", c, d, b)
	}
}

// The same req_id sent 50 times concurrently debits once and returns the
// same reply each time.
func TestGiftSameReqIDOnce(t *testing.T) {
	n := giftConfig(t)
	room := nodetest.OpenRoom(t, n, 1, 0)
	devCredit(t, n, 200, 1000)
	c := sdkDial(t, n, 200, nil, nil)
	if _, err := c.Join(context.Background(), room); err != nil {
		t.Fatal(err)
	}
	replies := make([]gift.Reply, 50)
	var wg sync.WaitGroup
	for i := range replies {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := sendGift(context.Background(), c, giftReq(room, 1, 25, 1, "once")) // 保时捷, 500
			if err != nil {
				t.Error(err)
			}
			replies[i] = r
		}(i)
	}
	wg.Wait()
	for _, r := range replies {
		if r != replies[0] || r.Balance != 500 || r.OrderID == "" {
			t.Fatalf("replies differ: %+v vs %+v", r, replies[0])
		}
	}
	if b, _ := n.Ledger.Balance(200); b != 500 {
		t.Fatalf("balance %d", b)
	}
	persisttest.CheckConservation(t, n.Ledger)
	// Every answered gift frame is timed (liveedge_gift_seconds).
	if got := metricValue(t, n, "liveedge_gift_seconds_count"); got != 50 {
		t.Fatalf("liveedge_gift_seconds_count = %v, want 50", got)
	}
}

// The receiver gets biz 5556 reliably; the room sees the effect, merged into
// a combo when the same gift repeats quickly; failures go to the sender only.
func TestGiftEffectsAndFailures(t *testing.T) {
	n := giftConfig(t)
	const anchor, sender, watcher = 1, 300, 301
	room := nodetest.OpenRoom(t, n, anchor, 0)
	devCredit(t, n, sender, 200)
	var anchorLog, watchLog, senderLog pushLog
	a := sdkDial(t, n, anchor, &anchorLog, nil)
	w := sdkDial(t, n, watcher, &watchLog, nil)
	s := sdkDial(t, n, sender, &senderLog, nil)
	ctx := context.Background()
	for _, c := range []*clientsdk.Client{a, w, s} {
		if _, err := c.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 5; i++ {
		if _, err := sendGift(ctx, s, giftReq(room, anchor, 23, 2, fmt.Sprintf("combo-%d", i))); err != nil { // 皇冠 20 × 2
			t.Fatal(err)
		}
	}
	// Receiver: five reliable 5556 pushes (one per gift).
	nodetest.Eventually(t, 5*time.Second, func() bool { return countBiz(anchorLog.snapshot(), proto.BizGift, true) == 5 },
		"receiver 5556: %d", countBiz(anchorLog.snapshot(), proto.BizGift, true))
	// Room: the effect merged (count 10 in total, fewer pushes than gifts).
	nodetest.Eventually(t, 5*time.Second, func() bool { return effectCount(t, watchLog.snapshot()) == 10 },
		"room effect count %d", effectCount(t, watchLog.snapshot()))
	if k := countBiz(watchLog.snapshot(), proto.BizGift, false); k >= 5 {
		t.Logf("no combo merging happened (%d effect pushes)", k)
	}
	if b, _ := n.Ledger.Balance(sender); b != 0 {
		t.Fatalf("balance %d", b)
	}

	cases := []struct {
		d    map[string]any
		code int
	}{
		{giftReq(room, anchor, 23, 1, "poor"), proto.CodeInsufficientBalance},
		{giftReq(room, sender, 24, 1, "self"), proto.CodeGiftToSelf},
		{giftReq(room, anchor, 999, 1, "nogift"), proto.CodeGiftUnavailable},
		{giftReq(room+1000, anchor, 24, 1, "noroom"), proto.CodeForbidden},
		{giftReq(room, anchor, 24, 0, "zero"), proto.CodeBadRequest},
		{giftReq(room, anchor, 24, 100, "many"), proto.CodeBadRequest},
		{map[string]any{"room_id": room, "gift_id": 24, "receiver_id": anchor, "count": 1}, proto.CodeBadRequest},
	}
	for _, tc := range cases {
		_, err := sendGift(ctx, s, tc.d)
		var pe *proto.Error
		if !errors.As(err, &pe) || pe.Code != tc.code {
			t.Fatalf("%v: %v, want %d", tc.d, err, tc.code)
		}
	}
	// Business failures (not malformed frames) also come as reliable 5557 to
	// the sender, and to nobody else.
	nodetest.Eventually(t, 5*time.Second, func() bool { return countBiz(senderLog.snapshot(), proto.BizGiftFailed, true) == 4 },
		"sender 5557: %d", countBiz(senderLog.snapshot(), proto.BizGiftFailed, true))
	if countBiz(watchLog.snapshot(), proto.BizGiftFailed, false)+countBiz(anchorLog.snapshot(), proto.BizGiftFailed, false) != 0 {
		t.Fatal("failure notice leaked to others")
	}
	persisttest.CheckConservation(t, n.Ledger)
}

func countBiz(ps []clientsdk.Push, biz int, ack bool) int {
	k := 0
	for _, p := range ps {
		if p.Biz == biz && p.Ack == ack {
			k++
		}
	}
	return k
}

func effectCount(t *testing.T, ps []clientsdk.Push) int {
	total := 0
	for _, p := range ps {
		if p.Biz == proto.BizGift && !p.Ack {
			var e gift.EffectPush
			if err := proto.Unmarshal(p.Data, &e); err != nil {
				t.Fatal(err)
			}
			total += e.Count
		}
	}
	return total
}

func TestGiftCatalogueAdmin(t *testing.T) {
	n := giftConfig(t)
	base := nodetest.HTTPURL(n)
	var list struct {
		Data struct {
			Gifts []gift.Gift `json:"gifts"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "GET", base+"/api/v1/gifts", "", "", &list); st != 200 || len(list.Data.Gifts) != len(gift.Seed) {
		t.Fatalf("catalogue: %d %d", st, len(list.Data.Gifts))
	}
	admin := nodetest.Token(t, n, 9, gateway.RoleAdmin)
	viewer := nodetest.Token(t, n, 10, gateway.RoleViewer)
	body := `{"gift_id":40,"name":"火箭","price":100,"svga_url":"https://x/40.svga"}`
	if st := nodetest.DoJSON(t, "POST", base+"/api/v1/admin/gifts", viewer, body, nil); st != 403 {
		t.Fatalf("viewer create: %d", st)
	}
	if st := nodetest.DoJSON(t, "POST", base+"/api/v1/admin/gifts", admin, body, nil); st != 200 {
		t.Fatalf("create: %d", st)
	}
	if st := nodetest.DoJSON(t, "POST", base+"/api/v1/admin/gifts", admin, body, nil); st != 409 {
		t.Fatalf("duplicate create: %d", st)
	}
	if st := nodetest.DoJSON(t, "PUT", base+"/api/v1/admin/gifts/40", admin, `{"status":0}`, nil); st != 200 {
		t.Fatalf("disable: %d", st)
	}
	if g, ok := n.Gifts.Catalogue().Get(40); !ok || g.Status != gift.StatusDisabled || g.Price != 100 {
		t.Fatalf("after disable: %+v", g)
	}
	if st := nodetest.DoJSON(t, "PUT", base+"/api/v1/admin/gifts/41", admin, `{"status":0}`, nil); st != 404 {
		t.Fatalf("update unknown: %d", st)
	}
	if st := nodetest.DoJSON(t, "PUT", base+"/api/v1/admin/gifts/40", admin, `{"price":-1}`, nil); st != 400 {
		t.Fatalf("bad price: %d", st)
	}
}

// pkRooms opens rooms ra (anchor 1) and rb (anchor 2) on a gift node, with
// viewer 50 in ra (its pushes in the log) holding 1,000 coins.
func pkRooms(t *testing.T) (n *gateway.Node, ra, rb int64, va *clientsdk.Client, logA *pushLog) {
	t.Helper()
	n = giftConfig(t)
	ra = nodetest.OpenRoom(t, n, 1, 0)
	rb = nodetest.OpenRoom(t, n, 2, 0)
	logA = &pushLog{}
	va = sdkDial(t, n, 50, logA, nil)
	if _, err := va.Join(context.Background(), ra); err != nil {
		t.Fatal(err)
	}
	devCredit(t, n, 50, 1000)
	return n, ra, rb, va, logA
}

func TestPKScoresAndEndsOnce(t *testing.T) {
	n, ra, rb, va, logA := pkRooms(t)
	ctx := context.Background()
	var out struct {
		Data struct {
			PKID string `json:"pk_id"`
		} `json:"data"`
	}
	out.Data.PKID = invitePKAccepted(t, n, 1, 2, ra, rb, 1)
	d := giftReq(ra, 1, 23, 1, "pk1")
	d["pk"] = true
	if _, err := sendGift(ctx, va, d); err != nil {
		t.Fatal(err)
	}
	var final []pkProgress
	nodetest.Eventually(t, 5*time.Second, func() bool {
		final = pkPushes(logA, out.Data.PKID)
		return len(final) > 0 && final[len(final)-1].Over
	}, "no final PK push")
	if last := checkPKEndsOnce(t, final); last.Winner != ra || last.Scores[fmt.Sprint(ra)] != 20 {
		t.Fatalf("final %+v", last)
	}
}

// pkProgress is the d of biz 5558.
type pkProgress struct {
	PKID   string           `json:"pk_id"`
	Seq    int64            `json:"seq"`
	Over   bool             `json:"over"`
	Winner int64            `json:"winner"`
	Scores map[string]int64 `json:"scores"`
}

// pkPushes returns the biz 5558 pushes of contest id in l, in arrival order.
func pkPushes(l *pushLog, id string) []pkProgress {
	var out []pkProgress
	for _, p := range l.snapshot() {
		var x pkProgress
		if p.Biz == proto.BizPKProgress && proto.Unmarshal(p.Data, &x) == nil && x.PKID == id {
			out = append(out, x)
		}
	}
	return out
}

// checkPKEndsOnce fails unless seq increases along pushes and exactly one
// push, the last, is over; it returns that one.
func checkPKEndsOnce(t *testing.T, pushes []pkProgress) pkProgress {
	t.Helper()
	for i, p := range pushes {
		if i > 0 && p.Seq <= pushes[i-1].Seq {
			t.Fatalf("seq not increasing: %+v", pushes)
		}
		if p.Over != (i == len(pushes)-1) {
			t.Fatalf("over at push %d of %d: %+v", i+1, len(pushes), pushes)
		}
	}
	return pushes[len(pushes)-1]
}

// A PK contest survives a node restart: its scores come back from the PK
// gifts' durable tallies, its sequence keeps increasing across the restart,
// and it ends exactly once with the result of every acknowledged PK gift. A
// contest whose end passed while the node was down ends when it comes back.
func TestPKSurvivesRestart(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.Limits.GiftPerSecond = 0
	n1 := nodetest.Start(t, cfg)
	ra := nodetest.OpenRoom(t, n1, 1, 0)
	rb := nodetest.OpenRoom(t, n1, 2, 0)
	rc := nodetest.OpenRoom(t, n1, 3, 0)
	rd := nodetest.OpenRoom(t, n1, 4, 0)
	const viewer = 50
	devCredit(t, n1, viewer, 1000)
	startPK := func(n *gateway.Node, anchorA, a, b int64, secs int) string {
		return invitePKAccepted(t, n, anchorA, anchorA+1, a, b, secs) // room b's anchor accepts
	}
	ctx := context.Background()
	pkGift := func(c *clientsdk.Client, room int64, anchor int64, req string) {
		d := giftReq(room, anchor, 23, 1, req) // 20 coins
		d["pk"] = true
		if _, err := sendGift(ctx, c, d); err != nil {
			t.Fatal(err)
		}
	}

	long := startPK(n1, 1, ra, rb, 8)
	var log1 pushLog
	v1 := sdkDial(t, n1, viewer, &log1, nil)
	if _, err := v1.Join(ctx, ra); err != nil {
		t.Fatal(err)
	}
	pkGift(v1, ra, 1, "a1")
	pkGift(v1, ra, 1, "a2")
	nodetest.Eventually(t, 5*time.Second, func() bool {
		p := pkPushes(&log1, long)
		return len(p) > 0 && p[len(p)-1].Scores[fmt.Sprint(ra)] == 40
	}, "no PK progress with score 40 before the restart")
	before := pkPushes(&log1, long)
	v1.Close()
	// A contest whose end passes while the node is down (started just before
	// the shutdown, which stops its timer).
	short := startPK(n1, 3, rc, rd, 1)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if err := n1.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	time.Sleep(1200 * time.Millisecond) // the short contest's end passes while the node is down

	n2 := nodetest.Start(t, cfg)
	tok2 := nodetest.Token(t, n2, viewer, gateway.RoleViewer)
	var got struct {
		Data struct {
			Scores map[string]int64 `json:"scores"`
			Over   bool             `json:"over"`
		} `json:"data"`
	}
	nodetest.Eventually(t, 5*time.Second, func() bool {
		st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n2)+"/api/v1/pk/"+short, tok2, "", &got)
		return st == 200 && got.Data.Over
	}, "the contest that ended while the node was down is not over after the restart")
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n2)+"/api/v1/pk/"+long, tok2, "", &got); st != 200 || got.Data.Over || got.Data.Scores[fmt.Sprint(ra)] != 40 || got.Data.Scores[fmt.Sprint(rb)] != 0 {
		t.Fatalf("long contest after restart: %d %+v", st, got.Data)
	}
	var log2 pushLog
	v2 := sdkDial(t, n2, viewer, &log2, nil)
	if _, err := v2.Join(ctx, ra); err != nil {
		t.Fatal(err)
	}
	pkGift(v2, ra, 1, "a3")
	pkGift(v2, ra, 1, "a1") // a retry of a gift from before the restart: no second debit, no second score
	var after []pkProgress
	nodetest.Eventually(t, 15*time.Second, func() bool {
		after = pkPushes(&log2, long)
		return len(after) > 0 && after[len(after)-1].Over
	}, "no final PK push after the restart")
	last := checkPKEndsOnce(t, append(before, after...)) // seq keeps increasing across the restart
	if last.Winner != ra || last.Scores[fmt.Sprint(ra)] != 60 || last.Scores[fmt.Sprint(rb)] != 0 {
		t.Fatalf("final %+v", last)
	}
	if bal, err := n2.Ledger.Balance(viewer); err != nil || bal != 1000-60 {
		t.Fatalf("balance %d (%v), want %d", bal, err, 1000-60)
	}
	persisttest.CheckConservation(t, n2.Ledger)
}
