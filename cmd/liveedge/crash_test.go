package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

type giftReply struct {
	OrderID string `json:"order_id"`
	Balance int64  `json:"balance"`
}

// kill -9 the node during a gift storm, restart it: every gift whose reply
// said ok is in the ledger and the balance, none is debited twice (also when
// retried after the restart), and conservation holds. The gifts are PK gifts
// of a running contest: after the restart the contest's score is exactly the
// value of the gifts in the ledger (each acknowledged one counted once).
func TestKill9DuringGiftStorm(t *testing.T) {
	const sender, anchor, credit = 500, 1, 1_000_000
	bin := binary(t)
	httpAddr, wsAddr, data := freeAddr(t), freeAddr(t), t.TempDir()
	env := nodeEnv(httpAddr, wsAddr, data, "LIVEEDGE_LIMITS_GIFT_PER_SECOND=0",
		"LIVEEDGE_WS_MAX_CONNS_PER_USER=16") // one sender on 16 connections
	p := start(t, "", env, bin)
	waitReady(t, p, httpAddr)
	room := openRoom(t, httpAddr, devToken(t, httpAddr, anchor, "anchor"))
	rival := openRoom(t, httpAddr, devToken(t, httpAddr, anchor+1, "anchor"))
	var pk struct {
		Data struct {
			PKID string `json:"pk_id"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/pk", devToken(t, httpAddr, anchor, "anchor"),
		fmt.Sprintf(`{"room_a":%d,"room_b":%d,"duration_s":3600}`, room, rival), &pk); st != 200 || pk.Data.PKID == "" {
		t.Fatalf("start pk: %d", st)
	}
	// The rival room's anchor accepts the invitation: the contest starts.
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/pk/"+pk.Data.PKID+"/accept", devToken(t, httpAddr, anchor+1, "anchor"),
		"", nil); st != 200 {
		t.Fatalf("accept pk: %d", st)
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":%d,"req_id":"seed"}`, sender, credit), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	tok := devToken(t, httpAddr, sender, "viewer")

	var mu sync.Mutex
	okd := map[string]string{} // req_id → order_id of every ok reply
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var clients []*clientsdk.Client
	for i := 0; i < 16; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + wsAddr + "/ws", Token: tok, RequestTimeout: 2 * time.Second})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		if _, err := c.Join(context.Background(), room); err != nil {
			t.Fatal(err)
		}
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(i, w int) {
				defer wg.Done()
				for k := 0; ; k++ {
					select {
					case <-stop:
						return
					default:
					}
					req := fmt.Sprintf("c%d-w%d-%d", i, w, k)
					b, err := c.Request(context.Background(), proto.TypeGift, map[string]any{
						"room_id": room, "gift_id": 23, "receiver_id": anchor, "count": 1 + k%3, "req_id": req, "pk": true})
					if err != nil {
						if errors.Is(err, clientsdk.ErrClosed) {
							return
						}
						continue // disconnected / timed out: outcome unknown, not counted
					}
					var r giftReply
					if proto.Unmarshal(b, &r) == nil {
						mu.Lock()
						okd[req] = r.OrderID
						mu.Unlock()
					}
				}
			}(i, w)
		}
	}
	nodetest.Eventually(t, 30*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(okd) >= 300 },
		"storm too slow")
	if err := syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	close(stop)
	for _, c := range clients {
		_ = c.Close()
	}
	wg.Wait()
	mu.Lock()
	acked := len(okd)
	mu.Unlock()
	t.Logf("killed after %d acknowledged gifts", acked)

	p2 := start(t, "", env, bin)
	waitReady(t, p2, httpAddr)
	// Every acknowledged gift is in the ledger, once.
	trades := allTrades(t, httpAddr, tok)
	byReq := map[string]int{}
	var spent int64
	for _, tr := range trades {
		if tr.Reason != persist.ReasonGift {
			continue
		}
		byReq[tr.ReqID]++
		spent -= tr.Delta
	}
	for req, order := range okd {
		if byReq["gift:"+req] != 1 {
			t.Fatalf("acknowledged gift %s (order %s) is in the ledger %d times", req, order, byReq["gift:"+req])
		}
	}
	for req, k := range byReq {
		if k != 1 {
			t.Fatalf("%s debited %d times", req, k)
		}
	}
	var w struct {
		Data struct {
			Balance int64 `json:"balance"`
		} `json:"data"`
	}
	nodetest.DoJSON(t, "GET", "http://"+httpAddr+"/api/v1/wallet", tok, "", &w)
	if w.Data.Balance != credit-spent {
		t.Fatalf("balance %d, want %d − %d", w.Data.Balance, credit, spent)
	}
	pkScore := func() [2]int64 {
		var out struct {
			Data struct {
				Scores map[string]int64 `json:"scores"` // keyed by room id
				Over   bool             `json:"over"`
			} `json:"data"`
		}
		if st := nodetest.DoJSON(t, "GET", "http://"+httpAddr+"/api/v1/pk/"+pk.Data.PKID, tok, "", &out); st != 200 || out.Data.Over {
			t.Fatalf("pk after restart: %d %+v", st, out.Data)
		}
		return [2]int64{out.Data.Scores[fmt.Sprint(room)], out.Data.Scores[fmt.Sprint(rival)]}
	}
	if sc := pkScore(); sc != [2]int64{spent, 0} {
		t.Fatalf("pk scores after the restart %v, want [%d 0] (the gifts in the ledger)", sc, spent)
	}
	// Retrying acknowledged gifts after the restart replays, never re-debits.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + wsAddr + "/ws", Token: tok})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	retried := 0
	for req, order := range okd {
		b, err := c.Request(ctx, proto.TypeGift, map[string]any{"room_id": room, "gift_id": 23, "receiver_id": anchor, "count": 1, "req_id": req, "pk": true})
		if err != nil {
			t.Fatal(err)
		}
		var r giftReply
		_ = proto.Unmarshal(b, &r)
		if r.OrderID != order {
			t.Fatalf("retry of %s: order %s, first said %s", req, r.OrderID, order)
		}
		if retried++; retried == 50 {
			break
		}
	}
	nodetest.DoJSON(t, "GET", "http://"+httpAddr+"/api/v1/wallet", tok, "", &w)
	if w.Data.Balance != credit-spent {
		t.Fatalf("balance moved on retries: %d", w.Data.Balance)
	}
	if sc := pkScore(); sc != [2]int64{spent, 0} {
		t.Fatalf("pk scores moved on retries: %v, want [%d 0]", sc, spent)
	}
	_ = c.Close()
	_ = p2.cmd.Process.Signal(syscall.SIGTERM)
	<-p2.done

	cr, db, bal := persisttest.CheckConservationDir(t, data)
	if cr != credit || db != spent || bal != credit-spent {
		t.Fatalf("ledger sums: credits %d debits %d balances %d", cr, db, bal)
	}
}

func allTrades(t *testing.T, httpAddr, tok string) []persist.Trade {
	var all []persist.Trade
	cursor := ""
	for {
		var page struct {
			Data struct {
				Trades     []persist.Trade `json:"trades"`
				NextCursor string          `json:"next_cursor"`
			} `json:"data"`
		}
		url := "http://" + httpAddr + "/api/v1/wallet/trades?limit=100"
		if cursor != "" {
			url += "&cursor=" + cursor
		}
		if st := nodetest.DoJSON(t, "GET", url, tok, "", &page); st != 200 {
			t.Fatalf("trades: %d", st)
		}
		all = append(all, page.Data.Trades...)
		if page.Data.NextCursor == "" || len(page.Data.Trades) == 0 {
			return all
		}
		cursor = strings.TrimSpace(page.Data.NextCursor)
	}
}
