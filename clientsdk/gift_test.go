package clientsdk_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// Gift makes a req_id when the app gives none and returns it on every
// error: a gift whose outcome is unknown (here its context ended while it
// was being sent: it may or may not have reached the node) is retried with
// it and debited once; a refusal carries the app's own req_id and the
// node's code. A real node, the seed catalogue (25: 保时捷, 500 coins).
func TestGiftReqIDForARetry(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 1, 0)
	const sender = 200
	var out struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":1500}`, sender), &out); st != 200 || out.Code != 0 {
		t.Fatalf("dev credit: %d %d", st, out.Code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: nodetest.WSURL(n), Token: nodetest.Token(t, n, sender, gateway.RoleViewer)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	porsche := clientsdk.GiftReq{RoomID: room, GiftID: 25, ReceiverID: 1}
	// gift retries g while the node says the first copy is still being
	// processed (10409), as an app does: with the req_id the first try sent
	// (a new one would debit again).
	gift := func(g clientsdk.GiftReq) (clientsdk.GiftResult, error) {
		for {
			r, err := c.Gift(ctx, g)
			var pe *proto.Error
			var ge *clientsdk.GiftError
			if !errors.As(err, &pe) || pe.Code != proto.CodeConflict || ctx.Err() != nil || !errors.As(err, &ge) {
				return r, err
			}
			g.ReqID = ge.ReqID
			time.Sleep(10 * time.Millisecond)
		}
	}

	first, err := gift(porsche)
	if err != nil || first.Balance != 1000 || first.OrderID == "" {
		t.Fatalf("first gift: %+v, %v", first, err)
	}

	ended, end := context.WithCancel(context.Background())
	end()
	_, err = c.Gift(ended, porsche)
	var ge *clientsdk.GiftError
	if !errors.As(err, &ge) || ge.ReqID == "" || !errors.Is(err, context.Canceled) {
		t.Fatalf("gift with its context ended: %v, want a *GiftError with a req_id wrapping context.Canceled", err)
	}
	retry := porsche
	retry.ReqID = ge.ReqID
	second, err := gift(retry)
	if err != nil || second.Balance != 500 || second.OrderID == "" || second.OrderID == first.OrderID {
		t.Fatalf("retry with req_id %q: %+v, %v (first %+v)", ge.ReqID, second, err, first)
	}
	again, err := gift(retry)
	if err != nil || again != second {
		t.Fatalf("second retry: %+v, %v, want the first answer %+v", again, err, second)
	}

	mine := porsche
	mine.ReqID, mine.Count = "mine-1", 2
	_, err = gift(mine)
	var pe *proto.Error
	if !errors.As(err, &ge) || ge.ReqID != "mine-1" || !errors.As(err, &pe) || pe.Code != proto.CodeInsufficientBalance {
		t.Fatalf("gift of 1,000 with 500: %v, want 20001 with req_id mine-1", err)
	}
	if b, _ := n.Ledger.Balance(sender); b != 500 {
		t.Fatalf("balance %d, want 500 (two gifts of 500)", b)
	}
	persisttest.CheckConservation(t, n.Ledger)
}
