package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// kill -9 the node while grabbers storm a red-packet rain, restart it: the
// rain resumes (its pool is the split minus the durable grants), is drained
// and settles; every grab answered ok is credited exactly once, nothing is
// granted twice, Σ granted + refunded = T, and conservation holds.
func TestKill9DuringRedPacketRain(t *testing.T) {
	const anchor, packets, total = 1, 600, 60_000
	const users, workers = 8, 4
	bin := binary(t)
	httpAddr, wsAddr, data := freeAddr(t), freeAddr(t), t.TempDir()
	env := nodeEnv(httpAddr, wsAddr, data, "LIVEEDGE_REDPACKET_ONE_PER_USER=false", "LIVEEDGE_REDPACKET_GRAB_INTERVAL=0s")
	p := start(t, "", env, bin)
	waitReady(t, p, httpAddr)
	atok := devToken(t, httpAddr, anchor, "anchor")
	room := openRoom(t, httpAddr, atok)
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":%d,"req_id":"seed"}`, anchor, total), nil); st != 200 {
		t.Fatalf("credit: %d", st)
	}
	var rain struct {
		Data redpacket.View `json:"data"`
	}
	api := "http://" + httpAddr + "/api/v1"
	if st := nodetest.DoJSON(t, "POST", fmt.Sprintf("%s/rooms/%d/redpackets", api, room), atok,
		fmt.Sprintf(`{"total_amount":%d,"total_count":%d,"duration_s":600}`, total, packets), &rain); st != 200 {
		t.Fatalf("create: %d", st)
	}
	code := rain.Data.Code
	for _, step := range []string{"prepare", "start"} {
		if st := nodetest.DoJSON(t, "POST", api+"/redpackets/"+code+"/"+step, atok, "", nil); st != 200 {
			t.Fatalf("%s: %d", step, st)
		}
	}

	var mu sync.Mutex
	acked := map[int64][]int64{} // user → amounts answered ok
	nAcked := 0
	grabAll := func(wsAddr string, stop <-chan struct{}, untilEmpty bool) []*clientsdk.Client {
		var clients []*clientsdk.Client
		var wg sync.WaitGroup
		for u := int64(100); u < 100+users; u++ {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + wsAddr + "/ws", Token: devToken(t, httpAddr, u, "viewer"), RequestTimeout: 2 * time.Second})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			clients = append(clients, c)
			if _, err := c.Join(context.Background(), room); err != nil {
				t.Fatal(err)
			}
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func(u int64) {
					defer wg.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						g, err := c.Grab(context.Background(), code)
						var pe *proto.Error
						switch {
						case err == nil:
							mu.Lock()
							acked[u] = append(acked[u], g.Amount)
							nAcked++
							mu.Unlock()
						case errors.Is(err, clientsdk.ErrClosed):
							return
						case untilEmpty && errors.As(err, &pe) && pe.Code == proto.CodeRedPacketEmpty:
							return
						}
					}
				}(u)
			}
		}
		if untilEmpty {
			wg.Wait()
		} else {
			go func() { <-stop; wg.Wait() }()
		}
		return clients
	}
	stop := make(chan struct{})
	clients := grabAll(wsAddr, stop, false)
	nodetest.Eventually(t, 30*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return nAcked >= 100 }, "grabs too slow")
	if err := syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	close(stop)
	for _, c := range clients {
		_ = c.Close()
	}
	mu.Lock()
	before := nAcked
	mu.Unlock()
	t.Logf("killed after %d acknowledged grabs", before)

	p2 := start(t, "", env, bin)
	waitReady(t, p2, httpAddr)
	if st := nodetest.DoJSON(t, "GET", api+"/redpackets/"+code, atok, "", &rain); st != 200 || rain.Data.State != redpacket.StateRunning ||
		rain.Data.GrantedCount < before || rain.Data.Nodes[0].Left != packets-rain.Data.GrantedCount {
		t.Fatalf("after the restart: %d %+v (acknowledged %d)", st, rain.Data, before)
	}
	for _, c := range grabAll(wsAddr, make(chan struct{}), true) {
		_ = c.Close()
	}
	nodetest.Eventually(t, 30*time.Second, func() bool {
		nodetest.DoJSON(t, "GET", api+"/redpackets/"+code, atok, "", &rain)
		return rain.Data.State == redpacket.StateFinished
	}, "rain not finished: %+v", rain.Data)
	if v := rain.Data; v.GrantedCount != packets || v.GrantedAmount+v.Refunded != total {
		t.Fatalf("settled %+v", v)
	}
	var credited, count int64
	for u := int64(100); u < 100+users; u++ {
		got := map[int64]int{}
		for _, tr := range allTrades(t, httpAddr, devToken(t, httpAddr, u, "viewer")) {
			if tr.Reason == persist.ReasonRedPacket && tr.Ref == "redpacket "+code {
				got[tr.Delta]++
				credited += tr.Delta
				count++
			}
		}
		for _, a := range acked[u] {
			if got[a]--; got[a] < 0 {
				t.Fatalf("user %d: an acknowledged grant of %d is not credited (once)", u, a)
			}
		}
	}
	if count != packets || credited != total {
		t.Fatalf("%d credits of Σ %d, want %d of Σ %d", count, credited, packets, total)
	}
	_ = p2.cmd.Process.Signal(syscall.SIGTERM)
	<-p2.done
	cr, db, bal := persisttest.CheckConservationDir(t, data)
	if cr != 2*total || db != total || bal != total {
		t.Fatalf("ledger sums: credits %d debits %d balances %d", cr, db, bal)
	}
}
