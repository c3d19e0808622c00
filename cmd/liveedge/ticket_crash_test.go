package main

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
)

type ticketOrder struct {
	OrderID string   `json:"order_id"`
	Status  string   `json:"status"`
	SeatIDs []string `json:"seat_ids"`
	Amount  int64    `json:"amount"`
}

// postTicket places a ticket order; ok false = no answer (connection cut).
func postTicket(client *http.Client, httpAddr, tok, body string) (code int, o ticketOrder, ok bool) {
	req, _ := http.NewRequest("POST", "http://"+httpAddr+"/api/v1/tickets/orders", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := client.Do(req)
	if err != nil {
		return 0, o, false
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, o, false
	}
	var env struct {
		Code int         `json:"code"`
		Data ticketOrder `json:"data"`
	}
	if proto.Unmarshal(b, &env) != nil {
		return 0, o, false
	}
	return env.Code, env.Data, true
}

// kill -9 the node binary during a storm of coins ticket orders (each a
// saga: lock seats → debit coins → confirm), restart it: no order is left
// PLACING; every acknowledged order is PAID with its seats sold; a replay
// of every request whose answer was lost returns a settled outcome (PAID,
// or an error with nothing kept); the sold seats are exactly the seats of
// the PAID orders; each buyer paid exactly for their PAID orders; the
// ledger conserves coins.
func TestKill9DuringTicketSagaStorm(t *testing.T) {
	const buyers, credit, price = 48, 100_000, 10
	bin := binary(t)
	httpAddr, wsAddr, data := freeAddr(t), freeAddr(t), t.TempDir()
	env := nodeEnv(httpAddr, wsAddr, data)
	p := start(t, "", env, bin)
	waitReady(t, p, httpAddr)
	admin := devToken(t, httpAddr, 1, "admin")
	var prog struct {
		Data struct {
			ProgramID int64 `json:"program_id"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/admin/programs", admin,
		fmt.Sprintf(`{"name":"storm","categories":[{"category_id":1,"name":"A","price":%d,"rows":40,"cols":50}],"per_order_max":2,"per_user_max":100}`, price),
		&prog); st != 200 {
		t.Fatalf("program: %d", st)
	}
	toks := make([]string, buyers)
	for i := range toks {
		u := int64(100 + i)
		toks[i] = devToken(t, httpAddr, u, "viewer")
		if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/dev/credit", "",
			fmt.Sprintf(`{"user_id":%d,"amount":%d,"req_id":"seed"}`, u, credit), nil); st != 200 {
			t.Fatalf("credit: %d", st)
		}
	}
	type attempt struct {
		buyer int
		body  string
		acked *ticketOrder
	}
	var (
		mu       sync.Mutex
		attempts []*attempt
		acked    int
		wg       sync.WaitGroup
		stop     = make(chan struct{})
	)
	client := &http.Client{Timeout: 5 * time.Second}
	for i := 0; i < buyers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				a := &attempt{buyer: i, body: fmt.Sprintf(`{"program_id":%d,"category_id":1,"count":%d,"req_id":"s%d-%d","pay":"coins"}`,
					prog.Data.ProgramID, 1+k%2, i, k)}
				mu.Lock()
				attempts = append(attempts, a)
				mu.Unlock()
				code, o, ok := postTicket(client, httpAddr, toks[i], a.body)
				if !ok {
					return // the node died: this attempt's outcome is unknown
				}
				if code == 0 {
					if o.Status != "PAID" {
						t.Errorf("acknowledged coins order %+v", o)
					}
					mu.Lock()
					a.acked = &o
					acked++
					mu.Unlock()
				}
			}
		}(i)
	}
	nodetest.Eventually(t, 60*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return acked >= 200 }, "storm too slow")
	if err := syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	close(stop)
	wg.Wait()
	t.Logf("killed after %d acknowledged orders of %d attempts", acked, len(attempts))

	p2 := start(t, "", env, bin)
	waitReady(t, p2, httpAddr)
	paid := map[string]ticketOrder{}
	spent := make([]int64, buyers)
	for _, a := range attempts {
		var o ticketOrder
		if a.acked != nil {
			var out struct {
				Data ticketOrder `json:"data"`
			}
			if st := nodetest.DoJSON(t, "GET", "http://"+httpAddr+"/api/v1/tickets/orders/"+a.acked.OrderID, toks[a.buyer], "", &out); st != 200 {
				t.Fatalf("acknowledged order %s lost: %d", a.acked.OrderID, st)
			}
			o = out.Data
			if o.Status != "PAID" {
				t.Fatalf("acknowledged order %s is %s after the restart", o.OrderID, o.Status)
			}
		} else {
			code, r, ok := postTicket(client, httpAddr, toks[a.buyer], a.body) // the same req_id
			if !ok {
				t.Fatalf("replay %s: no answer", a.body)
			}
			if code != 0 {
				continue // settled as a failure: nothing kept (checked by the sums below)
			}
			o = r
			if o.Status != "PAID" {
				t.Fatalf("replayed order %+v not settled", o)
			}
		}
		paid[o.OrderID] = o
		spent[a.buyer] += o.Amount
	}
	var view struct {
		Data struct {
			Categories []struct {
				Remaining, Locked, Sold int
			} `json:"categories"`
			Seats []struct {
				SeatID string `json:"seat_id"`
				Status int    `json:"status"`
			} `json:"seats"`
		} `json:"data"`
	}
	nodetest.DoJSON(t, "GET", fmt.Sprintf("http://%s/api/v1/programs/%d", httpAddr, prog.Data.ProgramID), admin, "", &view)
	status := map[string]int{}
	for _, s := range view.Data.Seats {
		status[s.SeatID] = s.Status
	}
	seats := 0
	for _, o := range paid {
		for _, s := range o.SeatIDs {
			if status[s] != 3 {
				t.Fatalf("seat %s of PAID order %s has status %d", s, o.OrderID, status[s])
			}
			seats++
		}
	}
	c := view.Data.Categories[0]
	if c.Sold != seats || c.Locked != 0 || c.Remaining+c.Sold != 2000 {
		t.Fatalf("after the restart: %+v, PAID orders hold %d seats (none may stay locked)", c, seats)
	}
	for i, tok := range toks {
		var w struct {
			Data struct {
				Balance int64 `json:"balance"`
			} `json:"data"`
		}
		nodetest.DoJSON(t, "GET", "http://"+httpAddr+"/api/v1/wallet", tok, "", &w)
		if w.Data.Balance != credit-spent[i] {
			t.Fatalf("buyer %d: balance %d, want %d − %d", i, w.Data.Balance, credit, spent[i])
		}
	}
	_ = p2.cmd.Process.Signal(syscall.SIGTERM)
	<-p2.done
	persisttest.CheckConservationDir(t, data)
}
