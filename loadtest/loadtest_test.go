package loadtest_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/loadtest"
)

func TestFanoutInProcess(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := loadtest.Run(ctx, loadtest.Config{
		Scenario: loadtest.Fanout,
		WS:       []string{nodetest.WSURL(n)},
		HTTP:     []string{nodetest.HTTPURL(n)},
		Conns:    50,
		Ramp:     500,
		Duration: 2 * time.Second,
		Rate:     5,
		Drain:    3 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	res.WriteSummary(testWriter{t})
	if res.Conns != 50 || res.Viewers != 49 || res.Talkers != 1 {
		t.Fatalf("connections %d viewers %d publishers %d", res.Conns, res.Viewers, res.Talkers)
	}
	if res.PushesSent < 5 || res.SendErrors != 0 || res.Errors != 0 {
		t.Fatalf("sent %d, send errors %d, errors %d %v", res.PushesSent, res.SendErrors, res.Errors, res.ErrorSamples)
	}
	if res.Gaps != 0 || res.Duplicates != 0 || res.Resyncs != 0 {
		t.Fatalf("gaps %d duplicates %d resyncs %d", res.Gaps, res.Duplicates, res.Resyncs)
	}
	if res.Deliveries != res.Viewers*res.PushesSent || res.Missing != 0 {
		t.Fatalf("deliveries %d, want %d × %d", res.Deliveries, res.Viewers, res.PushesSent)
	}
	// every viewer joined before the first chat: each is expected to get all
	if res.Published != res.PushesSent || res.Expected != res.Viewers*res.PushesSent || res.NotExpected != 0 || res.LostViewers != 0 {
		t.Fatalf("published %d, expected %d, not expected %d, lost viewers %d", res.Published, res.Expected, res.NotExpected, res.LostViewers)
	}
	if res.P50Ms <= 0 || res.P99Ms < res.P50Ms || res.MaxMs < res.P99Ms {
		t.Fatalf("latency p50 %v p99 %v max %v", res.P50Ms, res.P99Ms, res.MaxMs)
	}
	path := filepath.Join(t.TempDir(), "out.json")
	if err := res.WriteJSON(path); err != nil {
		t.Fatal(err)
	}
	back, err := loadtest.ReadJSON(path)
	if err != nil {
		t.Fatal(err)
	}
	if back.Deliveries != res.Deliveries || back.P99Ms != res.P99Ms || len(back.LatencyBuckets) == 0 {
		t.Fatalf("JSON round trip: %+v", back)
	}
	m := loadtest.Merge([]*loadtest.Result{back, back}, 0, 0, 0)
	// each process accounts its own viewers: the expected deliveries add up
	if m.Deliveries != 2*res.Deliveries || m.Expected != 2*res.Expected || m.Missing != 0 || m.P50Ms != res.P50Ms {
		t.Fatalf("merge: %+v", m)
	}
}

// TestLateJoinerProcess: two processes of one run (-procs) as loadgen runs
// them, sharing the record of what was published. The second has no
// publisher, joins while the chats flow and ends its own run phase long
// before the publisher stops: it waits for the record and for the chats
// still on their way to its viewers, and what was numbered before its
// viewers joined is not expected of them — nothing is lost. (Counted as
// viewers × chats sent, as loadgen did, its viewers "missed" every chat
// before they joined and, in a storm, those in flight when it stopped.)
func TestLateJoinerProcess(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	room, err := loadtest.OpenRoom(ctx, http.DefaultClient, nodetest.HTTPURL(n), 11)
	if err != nil {
		t.Fatal(err)
	}
	published := filepath.Join(t.TempDir(), "published.json")
	base := loadtest.Config{Scenario: loadtest.Fanout, WS: []string{nodetest.WSURL(n)}, HTTP: []string{nodetest.HTTPURL(n)},
		Room: room, Ramp: 1000, Rate: 5, PublishedFile: published}
	pubCfg := base
	pubCfg.Conns, pubCfg.Duration, pubCfg.Drain, pubCfg.UserBase = 3, 3*time.Second, 5*time.Second, 3_000_000_000
	lateCfg := base
	lateCfg.Conns, lateCfg.Duration, lateCfg.Drain, lateCfg.UserBase = 20, 300*time.Millisecond, 15*time.Second, 3_100_000_000
	lateCfg.NoPublish = true
	var pub, late *loadtest.Result
	var pubErr, lateErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		pub, pubErr = loadtest.Run(ctx, pubCfg)
	}()
	time.Sleep(2 * time.Second) // the publisher's ramp, its 1 s settle and ~1 s of chats
	late, lateErr = loadtest.Run(ctx, lateCfg)
	<-done
	if pubErr != nil || lateErr != nil {
		t.Fatal(pubErr, lateErr)
	}
	pub.WriteSummary(testWriter{t})
	late.WriteSummary(testWriter{t})
	if late.Published != pub.Published || pub.Published < 10 || pub.Published != pub.PushesSent {
		t.Fatalf("published %d / %d, sent %d", late.Published, pub.Published, pub.PushesSent)
	}
	if late.NotExpectedBeforeJoin == 0 || late.Expected == 0 || late.Expected+late.NotExpected != late.Viewers*late.Published {
		t.Fatalf("late viewers: expected %d, not expected %d (before join %d) of %d × %d", late.Expected, late.NotExpected, late.NotExpectedBeforeJoin, late.Viewers, late.Published)
	}
	m := loadtest.Merge([]*loadtest.Result{pub, late}, 0, 0, 0)
	m.WriteSummary(testWriter{t})
	if m.Missing != 0 || m.LostViewers != 0 || m.Deliveries != m.Expected || m.Gaps != 0 || m.Duplicates != 0 || m.Errors != 0 {
		t.Fatalf("merged: delivered %d of %d expected, lost %d, gaps %d, duplicates %d, errors %d %v",
			m.Deliveries, m.Expected, m.Missing, m.Gaps, m.Duplicates, m.Errors, m.ErrorSamples)
	}
	if m.Deliveries >= m.Viewers*m.PushesSent {
		t.Fatalf("the late viewers got chats from before they joined: %d deliveries, %d × %d", m.Deliveries, m.Viewers, m.PushesSent)
	}
}

func TestIdleInProcess(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := loadtest.Run(ctx, loadtest.Config{
		Scenario:  loadtest.Idle,
		WS:        []string{nodetest.WSURL(n)},
		HTTP:      []string{nodetest.HTTPURL(n)},
		Conns:     50,
		Ramp:      1000,
		Duration:  time.Second,
		Heartbeat: 200 * time.Millisecond,
		NodePID:   os.Getpid(), // the node runs in this process
	})
	if err != nil {
		t.Fatal(err)
	}
	res.WriteSummary(testWriter{t})
	if res.Conns != 50 || res.ConnErrors != 0 || res.Errors != 0 || res.Disconnects != 0 {
		t.Fatalf("connections %d, failed %d, errors %d %v, disconnects %d", res.Conns, res.ConnErrors, res.Errors, res.ErrorSamples, res.Disconnects)
	}
	if res.NodeRSSAfter <= 0 || res.LoadgenRSSAfter <= 0 {
		t.Fatalf("RSS not measured: %+v", res)
	}
}

func TestRefusesRemote(t *testing.T) {
	_, err := loadtest.Run(context.Background(), loadtest.Config{WS: []string{"ws://192.0.2.1:8081/ws"}})
	if err == nil {
		t.Fatal("a non-loopback address was accepted")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func TestGiftInProcess(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := loadtest.Run(ctx, loadtest.Config{
		Scenario: loadtest.Gift,
		WS:       []string{nodetest.WSURL(n)},
		HTTP:     []string{nodetest.HTTPURL(n)},
		Conns:    20,
		Ramp:     1000,
		Duration: 1500 * time.Millisecond,
		Rate:     100, // 5/s per sender, under the node's 20/s
		SrcIPs:   3,   // 127.0.0.1..3
	})
	if err != nil {
		t.Fatal(err)
	}
	res.WriteSummary(testWriter{t})
	if res.Conns != 20 || res.ConnErrors != 0 || res.Errors != 0 {
		t.Fatalf("connections %d, failed %d, errors %d %v", res.Conns, res.ConnErrors, res.Errors, res.ErrorSamples)
	}
	if res.Requests < 100 || res.Replies != res.Requests || res.Refused != 0 {
		t.Fatalf("sent %d, answered %d, refused %d %v", res.Requests, res.Replies, res.Refused, res.RefusedCodes)
	}
	if res.Conserved == nil || !*res.Conserved {
		t.Fatalf("conservation not checked or broken: %s", res.ConservationNote)
	}
	if res.OfferedRate != 100 || res.RepliesPerSec <= 0 || res.P50Ms <= 0 || res.P99Ms < res.P50Ms {
		t.Fatalf("offered %v, replies/s %v, p50 %v p99 %v", res.OfferedRate, res.RepliesPerSec, res.P50Ms, res.P99Ms)
	}
}

func TestGrabInProcess(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	for _, tc := range []struct {
		name                 string
		anchor               int64
		packets              int
		granted, noneLeft    int64
		total, grantedAmount int64
	}{
		{"storm", 7, 20, 20, 10, 1000, 1000}, // 30 grabbers, 20 packets: 10 find none left
		{"refund", 8, 40, 30, 0, 4000, -1},   // 30 grabbers, 40 packets: 10 refunded at the end
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			res, err := loadtest.Run(ctx, loadtest.Config{
				Scenario:  loadtest.Grab,
				WS:        []string{nodetest.WSURL(n)},
				HTTP:      []string{nodetest.HTTPURL(n)},
				Conns:     30,
				Ramp:      1000,
				Duration:  2 * time.Second, // the rain's duration (slack for a busy machine)
				Anchor:    tc.anchor,
				RainCount: tc.packets,
				RainTotal: tc.total,
				SrcIPs:    2,
			})
			if err != nil {
				t.Fatal(err)
			}
			res.WriteSummary(testWriter{t})
			if res.Conns != 30 || res.Errors != 0 {
				t.Fatalf("connections %d, errors %d %v", res.Conns, res.Errors, res.ErrorSamples)
			}
			if res.Replies != tc.granted || res.RefusedCodes[30003] != tc.noneLeft ||
				(tc.grantedAmount >= 0 && res.GrantedAmount != tc.grantedAmount) {
				t.Fatalf("granted %d packets / %d coins, refused %v", res.Replies, res.GrantedAmount, res.RefusedCodes)
			}
			if res.Conserved == nil || !*res.Conserved {
				t.Fatalf("conservation not checked or broken: %s", res.ConservationNote)
			}
		})
	}
}

// nodeConns reads the node's open WebSocket connections from /metrics.
func nodeConns(t *testing.T, base string) int {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "liveedge_connections{") {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
	}
	t.Fatal("no liveedge_connections in /metrics")
	return 0
}

// The raw idle client against a node with a 2 s heartbeat (silent for 4 s:
// closed with 4402): every connection joins, pings every second and is held
// through a 6-s hold — longer than the silence the node allows — without a
// disconnect; the node sees them all. (A shorter heartbeat lost connections
// to stalls of the race-instrumented node beside other tests on 2 cores.)
func TestIdleRawInProcess(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.Heartbeat = configs.Duration(2 * time.Second)
	n := nodetest.Start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const conns = 300
	var seen atomic.Int64
	go func() { // the node's count in the middle of the hold
		for ctx.Err() == nil && seen.Load() < conns {
			time.Sleep(200 * time.Millisecond)
			if v := nodeConnsQuiet(nodetest.HTTPURL(n)); v > seen.Load() {
				seen.Store(v)
			}
		}
	}()
	res, err := loadtest.Run(ctx, loadtest.Config{
		Scenario: loadtest.Idle,
		Client:   loadtest.ClientRaw,
		WS:       []string{nodetest.WSURL(n)},
		HTTP:     []string{nodetest.HTTPURL(n)},
		Conns:    conns,
		Ramp:     3000,
		Duration: 6 * time.Second,
		SrcIPs:   2,
		NodePID:  os.Getpid(),
		// tokens signed here, as an app backend would (the other
		// scenarios' tests take them from the dev endpoint)
		TokenSecret: n.Config.Auth.JWTSecret,
	})
	if err != nil {
		t.Fatal(err)
	}
	res.WriteSummary(testWriter{t})
	if res.Client != loadtest.ClientRaw || res.Conns != conns || res.ConnErrors != 0 || res.Errors != 0 {
		t.Fatalf("client %q connections %d, failed %d, errors %d %v", res.Client, res.Conns, res.ConnErrors, res.Errors, res.ErrorSamples)
	}
	if res.HeldMin != conns || res.HeldEnd != conns || res.Disconnects != 0 || res.HoldDisconnects != 0 || res.PingTimeouts != 0 {
		t.Fatalf("held min %d end %d, disconnects %d (%d in the hold) %v, ping timeouts %d",
			res.HeldMin, res.HeldEnd, res.Disconnects, res.HoldDisconnects, res.DisconnectReasons, res.PingTimeouts)
	}
	// 6 s at one ping a second: about 6 each
	if res.Pings < 4*conns {
		t.Fatalf("%d pings from %d connections in %.1f s", res.Pings, conns, res.RunSeconds)
	}
	if res.JoinP50Ms <= 0 || res.JoinMaxMs < res.JoinP99Ms || len(res.JoinBuckets) == 0 {
		t.Fatalf("join latency p50 %v p99 %v max %v", res.JoinP50Ms, res.JoinP99Ms, res.JoinMaxMs)
	}
	if seen.Load() != conns {
		t.Fatalf("the node saw at most %d connections", seen.Load())
	}
	if res.NodeRSSAfter <= 0 || res.LoadgenRSSAfter <= 0 || res.NodeRSSEnd <= 0 || res.NodeRSSEndPerConn == 0 {
		t.Fatalf("RSS not measured: %+v", res)
	}
	// every connection closed at the end
	deadline := time.Now().Add(5 * time.Second)
	for nodeConns(t, nodetest.HTTPURL(n)) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the node still has %d connections after the run", nodeConns(t, nodetest.HTTPURL(n)))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Without heartbeats the node closes each connection after 2 × 300 ms
// (4402): the raw client counts every such disconnect, by reason, reconnects
// and re-joins.
func TestIdleRawCountsDisconnects(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.Heartbeat = configs.Duration(300 * time.Millisecond)
	n := nodetest.Start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := loadtest.Run(ctx, loadtest.Config{
		Scenario:  loadtest.Idle,
		Client:    loadtest.ClientRaw,
		WS:        []string{nodetest.WSURL(n)},
		HTTP:      []string{nodetest.HTTPURL(n)},
		Conns:     50,
		Ramp:      1000,
		Duration:  2 * time.Second,
		Heartbeat: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	res.WriteSummary(testWriter{t})
	if res.Conns == 0 || res.Pings != 0 {
		t.Fatalf("connections %d, pings %d", res.Conns, res.Pings)
	}
	if res.HoldDisconnects < 50 || res.DisconnectReasons["4402"] < 50 || res.HoldReconnects < 25 || res.Reconnects < res.HoldReconnects {
		t.Fatalf("disconnects %d (%d in the hold) %v, reconnects %d (%d in the hold)",
			res.Disconnects, res.HoldDisconnects, res.DisconnectReasons, res.Reconnects, res.HoldReconnects)
	}
	if res.HeldMin >= 50 {
		t.Fatalf("held min %d: the closed connections were counted as held", res.HeldMin)
	}
}

// A connection counts as held only once joined: joins refused (no such
// room) leave nothing held, every connection given up as a connect error.
func TestIdleRawJoinRefused(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := loadtest.Run(ctx, loadtest.Config{
		Scenario: loadtest.Idle,
		Client:   loadtest.ClientRaw,
		WS:       []string{nodetest.WSURL(n)},
		HTTP:     []string{nodetest.HTTPURL(n)},
		Room:     987654321,
		Conns:    10,
		Ramp:     1000,
		Duration: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	res.WriteSummary(testWriter{t})
	if res.Conns != 0 || res.ConnErrors != 10 || res.HeldEnd != 0 || res.Errors < 10 {
		t.Fatalf("held %d (end %d), given up %d, errors %d %v", res.Conns, res.HeldEnd, res.ConnErrors, res.Errors, res.ErrorSamples)
	}
}

func nodeConnsQuiet(base string) int64 {
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "liveedge_connections{") {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			return int64(v)
		}
	}
	return 0
}

// The parent's side of a money run over processes: shares (here in this
// process) check their own users; MoneyTotals checks the sums — and catches
// a share that misreports its users' coins or a share that is missing.
func TestMoneyTotals(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	for _, scenario := range []string{loadtest.Gift, loadtest.Grab} {
		t.Run(scenario, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cfg := loadtest.Config{Scenario: scenario, WS: []string{nodetest.WSURL(n)}, HTTP: []string{nodetest.HTTPURL(n)},
				Conns: 20, Ramp: 1000, Duration: 2 * time.Second, Rate: 100, Anchor: 9, RainCount: 15, StartAt: time.Now().Add(2 * time.Second)}
			if scenario == loadtest.Grab {
				cfg.Anchor = 10
			}
			room, err := loadtest.OpenRoom(ctx, http.DefaultClient, cfg.HTTP[0], cfg.Anchor)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Room = room
			if err := cfg.Normalize(); err != nil {
				t.Fatal(err)
			}
			mt, err := loadtest.NewMoneyTotals(ctx, cfg, room)
			if err != nil {
				t.Fatal(err)
			}
			parts := make([]*loadtest.Result, 2)
			errs := make([]error, 2)
			done := make(chan int)
			for i := range parts {
				share := cfg
				share.Conns, share.Rate, share.MoneyShare, share.RainCode = 10, 50, true, mt.RainCode()
				share.UserBase = cfg.UserBase + int64(i)*1000
				go func() {
					parts[i], errs[i] = loadtest.Run(ctx, share)
					done <- i
				}()
			}
			if scenario == loadtest.Grab {
				// As loadgen's parent: the rain starts just before the
				// shares' common start (started with the test's set-up, a
				// slow set-up under -race left the shares a rain that was
				// over: 0 grants). A grab before the start is refused and
				// retried.
				time.Sleep(time.Until(cfg.StartAt) - 200*time.Millisecond)
				if err := mt.StartRain(ctx); err != nil {
					t.Fatal(err)
				}
			}
			<-done
			<-done
			for i, p := range parts {
				if errs[i] != nil {
					t.Fatal(errs[i])
				}
				if p.Conserved == nil || !*p.Conserved || p.Errors != 0 {
					t.Fatalf("share %d: %v %q, errors %v", i, p.Conserved, p.ConservationNote, p.ErrorSamples)
				}
			}
			res := loadtest.Merge(parts, 0, 0, 0)
			mt.Check(ctx, res, parts, 0)
			t.Log(res.ConservationNote)
			if res.Conserved == nil || !*res.Conserved || res.Replies == 0 {
				t.Fatalf("totals: %v %q", res.Conserved, res.ConservationNote)
			}
			bad := *res
			bad.UsersCoins++
			if mt.Check(ctx, &bad, parts, 0); *bad.Conserved {
				t.Fatalf("a misreported share passed: %q", bad.ConservationNote)
			}
			short := *res
			if mt.Check(ctx, &short, parts, 1); *short.Conserved {
				t.Fatalf("a missing share passed: %q", short.ConservationNote)
			}
		})
	}
}

// A token signed by the loadgen (-token-secret) is one the node accepts.
func TestMintTokenVerifies(t *testing.T) {
	const secret = "a-test-secret-of-thirty-two-bytes!"
	tok, err := loadtest.MintToken(secret, 42, "viewer", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	id, err := gateway.NewAuth(secret).Verify(tok)
	if err != nil || id.UserID != 42 || id.Role != "viewer" {
		t.Fatalf("verify: %+v %v", id, err)
	}
	if _, err := gateway.NewAuth(secret + "x").Verify(tok); err == nil {
		t.Fatal("verified with another secret")
	}
}

// A chat rate past the node's per-user chat limit is refused before any
// connection (its chats would be refused as 10429, not measured), for every
// scenario with a publisher, unless the node runs without the limit.
func TestChatRateAboveTheLimitRefused(t *testing.T) {
	for _, c := range []loadtest.Config{
		{Scenario: loadtest.Fanout, Rate: 50},
		{Scenario: loadtest.Chat, ChatRate: 10},
		{Scenario: loadtest.ReconnectStorm, KillPID: 999999, Rate: 10},
	} {
		c.Conns = 10
		refused := c
		if err := refused.Normalize(); err == nil || !strings.Contains(err.Error(), "LIVEEDGE_LIMITS_CHAT_PER_SECOND=0") {
			t.Errorf("%s at %.0f/s: %v, want refused at the chat limit", c.Scenario, max(c.Rate, c.ChatRate), err)
		}
		c.NoChatLimit = true
		if err := c.Normalize(); err != nil {
			t.Errorf("%s at %.0f/s with NoChatLimit: %v", c.Scenario, max(c.Rate, c.ChatRate), err)
		}
	}
}
