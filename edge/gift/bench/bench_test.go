package bench

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cockroachdb/pebble"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/persist/redistest"
)

// Smoke tests: the benchmarks' own code at a tiny scale, so plain `go test`
// catches a broken benchmark in a few seconds.

func TestWorkloadShapes(t *testing.T) {
	hot := hotWorkload()
	hotN, streaks := 0, 0
	for i, s := range hot.seq {
		if s.sender < senderBase+hotSenders {
			hotN++
			if s.gift != comboIdx {
				t.Fatalf("hot gift %d is not the combo gift", i)
			}
			if i == 0 || hot.seq[i-1].sender != s.sender {
				streaks++
			}
		}
	}
	if got := float64(hotN) / float64(len(hot.seq)); got < 0.099 || got > 0.101 {
		t.Errorf("hot share %.4f, want 0.10", got)
	}
	// Streaks of comboLen (two streaks of the same sender may touch).
	if avg := float64(hotN) / float64(streaks); avg < comboLen || avg > comboLen*1.02 {
		t.Errorf("average combo streak %.2f, want %d", avg, comboLen)
	}
	spread := spreadWorkload()
	seen := map[int64]bool{}
	for _, s := range spread.seq {
		seen[s.sender] = true
		if roomOf(s.sender) == s.sender {
			t.Fatal("sender is its own receiver")
		}
	}
	if len(seen) != coldSenders {
		t.Errorf("spread workload uses %d senders, want %d", len(seen), coldSenders)
	}
}

func smallWorkload() *workload {
	w := spreadWorkload()
	w.name = "small"
	w.senders = w.senders[:50]
	w.seq = w.seq[:0]
	for i := range 5000 {
		w.seq = append(w.seq, slot{sender: w.senders[i%50], gift: uint8(i % len(catalogue))})
	}
	return w
}

func TestSeedDebit(t *testing.T) {
	srv := redistest.Start(t)
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	db, err := pebble.Open(t.TempDir(), &pebble.Options{Logger: quietLogger{}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s := newSeedDebit(rdb, db)
	if s.redisPID = redisPID(srv.Addr); s.redisPID == 0 {
		t.Error("redis-server's pid not found (its CPU time will not be reported)")
	}
	ctx := context.Background()
	const user = senderBase + 1
	if err := s.credit(ctx, []int64{user}, 100); err != nil {
		t.Fatal(err)
	}
	g := giftOp{sender: user, receiver: 1, room: 1, giftID: 22, price: 90}
	if err := s.debit(ctx, g); err != nil {
		t.Fatal(err)
	}
	if err := s.debit(ctx, g); !errors.Is(err, errSeedInsufficient) {
		t.Fatalf("second 90-coin gift on 10 coins: %v, want insufficient", err)
	}
	// Lock busy: the seed sleeps and retries (sleep replaced: it frees the lock).
	if err := rdb.Do(ctx, rdb.B().Set().Key(seedLockKey(user)).Value("1").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	var slept []time.Duration
	s.sleep = func(_ context.Context, d time.Duration) error {
		slept = append(slept, d)
		return rdb.Do(ctx, rdb.B().Del().Key(seedLockKey(user)).Build()).Error()
	}
	if err := s.debit(ctx, giftOp{sender: user, price: 1}); err != nil {
		t.Fatal(err)
	}
	if len(slept) != 1 || slept[0] < 500*time.Millisecond || slept[0] >= time.Second {
		t.Fatalf("slept %v, want one sleep in [0.5 s, 1 s)", slept)
	}
	bal, err := rdb.Do(ctx, rdb.B().Get().Key(seedBalKey(user)).Build()).AsInt64()
	if err != nil || bal != 9 {
		t.Fatalf("balance %d (%v), want 9", bal, err)
	}
	s.close()
	if n := s.tradeID.Load(); n != 2 {
		t.Fatalf("%d DB rows written, want 2", n)
	}
}

func TestDebitLoopSmoke(t *testing.T) {
	w := smallWorkload()
	for _, name := range []string{"seed", "liveedge"} {
		var sys debiter
		if name == "seed" {
			sys, _ = startSeed(t, w)
		} else {
			sys, _ = startLiveEdge(t, w)
		}
		res := runClosedLoop(sys, w, 8, 100*time.Millisecond, 300*time.Millisecond, "t-")
		if res.ok == 0 || res.fail != 0 || res.lat.n != int(res.ok) {
			t.Errorf("%s: %d ok, %d failed, %d latencies", name, res.ok, res.fail, res.lat.n)
		}
	}
}

// The hot users' loop holds the mix: 10 % of the gifts are hot, within the
// lag the token queue allows.
func TestHotUsersLoopHoldsTheMix(t *testing.T) {
	w := hotUsersWorkload()
	sys, _ := startLiveEdge(t, w)
	res, hot := runHotUsers(sys, w, 16, 200*time.Millisecond, time.Second, "t-")
	if res.ok == 0 || res.fail != 0 || res.lat.n != int(res.ok) {
		t.Fatalf("%d ok, %d failed, %d latencies", res.ok, res.fail, res.lat.n)
	}
	share := float64(hot.ok) / float64(res.ok)
	// The queue lets either side run ahead by up to 2·conc gifts.
	slack := 2 * 16 / float64(res.ok)
	if share < 0.1-slack || share > 0.1+slack {
		t.Errorf("hot share %.4f of %d gifts, want 0.10 ± %.4f", share, res.ok, slack)
	}
	if hot.lat.n != int(hot.ok) {
		t.Errorf("%d hot gifts, %d hot latencies", hot.ok, hot.lat.n)
	}
}

func TestWSSmoke(t *testing.T) {
	k := knobs{warmup: 100 * time.Millisecond, measure: 300 * time.Millisecond, conns: 4, window: 2, rooms: 2, client: "inproc"}
	echo := func() (*gateway.Node, clients) { return nil, startEchoClients(t, k) }
	liveedge := func(batch bool) func() (*gateway.Node, clients) {
		return func() (*gateway.Node, clients) { return startLiveEdgeWS(t, k, batch) }
	}
	echoRes := runSmoke(t, echo, 0)
	closed := runSmoke(t, liveedge(false), 0)
	open := runSmoke(t, liveedge(false), 200)
	batched := runSmoke(t, liveedge(true), 0)
	noWallet := runSmoke(t, func() (*gateway.Node, clients) { return startLiveEdgeWSWallet(t, k, false, &instantWallet{}) }, 200)
	k.client = "proc" // the clients in a child process, as the benchmark runs them by default
	proc := runSmoke(t, echo, 0)
	procOpen := runSmoke(t, liveedge(false), 200)
	for name, r := range map[string]wsResult{"echo": echoRes, "liveedge": closed, "liveedge open loop": open,
		"liveedge batch": batched, "liveedge, no wallet": noWallet, "echo, client process": proc, "liveedge open loop, client process": procOpen} {
		if r.ok == 0 || r.fail != 0 {
			t.Errorf("%s: %d ok, %d failed", name, r.ok, r.fail)
		}
		if r.cpu <= 0 {
			t.Errorf("%s: no CPU time measured", name)
		}
	}
	if d := echoRes.repBytes / closed.repBytes; d < 0.95 || d > 1.05 {
		t.Errorf("echo reply %.1f B, LiveEdge reply %.1f B: sizes differ", echoRes.repBytes, closed.repBytes)
	}
}

func runSmoke(t *testing.T, start func() (*gateway.Node, clients), rate float64) wsResult {
	node, cl := start()
	defer cl.close()
	res := cl.run(rate)
	if node != nil {
		checkNode(t, node, cl)
	}
	return res
}
