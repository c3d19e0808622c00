package gateway

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

// While the shared wallet is not ready (Redis lost its data; the rebuild is
// bringing the rains' one-per-user places and the payment req_id bindings
// back), neither a place nor a binding is taken, confirmed or read: "retry" —
// a claim meanwhile could hand out what the rebuild is about to restore.
func TestClaimsAndBindingsWaitForTheRebuild(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	state := func(s string) {
		t.Helper()
		if err := rdb.Do(ctx, rdb.B().Hset().Key(persist.SharedMetaKey).FieldValue().FieldValue("gen", "g7").FieldValue("state", s).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	n := &Node{Redis: rdb}
	binds := payReqClaims{rdb: rdb}
	until := time.Now().Add(time.Minute).UnixMilli()
	for _, s := range []string{"", "rebuilding"} {
		if s != "" {
			state(s)
		}
		if _, _, err := n.claimRain(ctx, "CODE", 7, until, "n1:a:1", nil); !errors.Is(err, redpacket.ErrClaimsUnavailable) {
			t.Fatalf("a rain place with the wallet %q: %v, want unavailable", s, err)
		}
		if _, err := binds.Claim(7, "req", 100); err == nil {
			t.Fatalf("a req_id binding with the wallet %q: taken", s)
		}
		if _, err := binds.Confirm(7, "req", 100); err == nil {
			t.Fatalf("a req_id confirm with the wallet %q: done", s)
		}
		// A read of a binding cannot say "none" either (it may be on its
		// way back): an order refused at the bound answers "retry".
		if _, err := binds.Bound(7, "req"); err == nil {
			t.Fatalf("a req_id binding read with the wallet %q: answered", s)
		}
	}
	state("ready")
	if ok, gen, err := n.claimRain(ctx, "CODE", 7, until, "n1:a:1", nil); !ok || gen != "g7" || err != nil {
		t.Fatalf("a rain place once ready: %v %q %v, want taken in generation g7", ok, gen, err)
	}
	if ok, gen, err := n.claimRain(ctx, "CODE", 7, until, "n1:a:2", nil); ok || gen != "" || err != nil {
		t.Fatalf("the same place again: %v %q %v, want taken", ok, gen, err)
	}
	if prev, err := binds.Claim(7, "req", 100); prev != 0 || err != nil {
		t.Fatalf("a binding once ready: %d %v", prev, err)
	}
	if bound, err := binds.Confirm(7, "req", 100); bound != 100 || err != nil {
		t.Fatalf("its confirm: %d %v", bound, err)
	}
	if bound, err := binds.Bound(7, "req"); bound != 100 || err != nil {
		t.Fatalf("its read: %d %v", bound, err)
	}
	if bound, err := binds.Bound(7, "other"); bound != 0 || err != nil {
		t.Fatalf("a req_id never bound: %d %v", bound, err)
	}
}

// A grab whose one-per-user place was taken before Redis lost its data,
// and whose grant reaches the wallet only after the rebuild, gets no
// packet there (its grant is pinned to the generation its place was taken
// in: 50000 retry, nothing moved); its user's next grab gets one packet and
// none more. Before, the grant landed in the rebuilt generation, which has
// no place for it (the grab was neither a grant on disk nor one in doubt
// when the nodes contributed), and the user's next grab took a second
// packet. A real shared wallet on a real Redis, emptied by FLUSHALL.
func TestGrabAcrossARedisLossGetsOnePacket(t *testing.T) {
	const u, total, count = 100, 1000, 10
	rs := redistest.Start(t)
	rdb := rs.Client(t)
	ctx := context.Background()
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	n := &Node{Redis: rdb, Store: st}
	w, err := persist.NewSharedWallet(st, rdb, persist.SharedConfig{Node: "n1", Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Contribute: n.contributeRainClaims, ContributedPrefixes: []string{rainClaimPrefix}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	ready := func() {
		t.Helper()
		rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := w.WaitReady(rctx); err != nil {
			t.Fatal("shared wallet not ready")
		}
	}
	ready()
	if _, err := w.Apply(persist.Op{User: rpAnchor, ReqID: "seed", Postings: []persist.Posting{{User: rpAnchor, Delta: 10_000, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	metaGen := func() string {
		g, _ := rdb.Do(ctx, rdb.B().Hget().Key(persist.SharedMetaKey).Field("gen").Build()).ToString()
		return g
	}
	held, release := make(chan string, 1), make(chan struct{})
	var first sync.Once
	rt := router.NewLocal("n1", router.LocalConfig{})
	rt.OpenRoom(rpRoom)
	svc, err := redpacket.New(st, w, rt, redpacket.Config{Node: "n1", CodeTag: -1, OnePerUser: true,
		AnchorOf: func(int64) (int64, bool, error) { return rpAnchor, true, nil },
		InRoom:   func(room, _ int64) (bool, error) { return room == rpRoom, nil },
		Claim: func(ctx context.Context, code string, user, until int64, token string, prev []string) (bool, string, error) {
			ok, gen, err := n.claimRain(ctx, code, user, until, token, prev)
			if ok && user == u {
				first.Do(func() { held <- gen; <-release }) // the grab waits here (a lease, a full wallet queue)
			}
			return ok, gen, err
		},
		Unclaim: n.unclaimRain, RoomRun: n.runRainInRoom, RoomDone: n.rainDoneInRoom,
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	n.rains.Store(svc)
	v, perr := svc.Create(rpAnchor, rpRoom, total, count, 2*time.Second)
	if perr != nil {
		t.Fatal(perr)
	}
	code := v.Code
	if _, perr := svc.Prepare(rpAnchor, code); perr != nil {
		t.Fatal(perr)
	}
	if _, perr := svc.Start(rpAnchor, code); perr != nil {
		t.Fatal(perr)
	}

	type answer struct {
		rep redpacket.GrabReply
		err *proto.Error
	}
	answered := make(chan answer, 1)
	go func() {
		rep, perr := svc.Grab(u, code)
		answered <- answer{rep, perr}
	}()
	before := <-held
	if err := rdb.Do(ctx, rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	// The wallet notices (its watcher) and rebuilds a new generation from
	// the ledger; the grab goes on only once that one serves.
	deadline := time.Now().Add(20 * time.Second)
	for g := metaGen(); g == "" || g == before || !w.Ready(); g = metaGen() {
		if time.Now().After(deadline) {
			t.Fatalf("no new generation ready after FLUSHALL (meta gen %q, before %q)", g, before)
		}
		time.Sleep(20 * time.Millisecond)
	}
	close(release)
	a := <-answered
	packets := int64(0)
	if a.err == nil {
		packets += a.rep.Amount
		t.Logf("the grab across the loss was granted %d", a.rep.Amount)
	} else if a.err.Code != proto.CodeInternal {
		t.Fatalf("the grab across the loss: %v, want a packet or 50000", a.err)
	}
	grants := 0
	if a.err == nil {
		grants++
	}
	// The user grabs until told they have had their packet.
	for i := 0; ; i++ {
		rep, perr := svc.Grab(u, code)
		if perr != nil && perr.Code == proto.CodeRedPacketTaken {
			break
		}
		if perr != nil {
			t.Fatalf("grab %d after the rebuild: %v", i+1, perr)
		}
		grants++
		packets += rep.Amount
		if i > 3 {
			break
		}
	}
	if grants != 1 {
		t.Fatalf("user %d was granted %d packets (%d coins), want one", u, grants, packets)
	}
	var view redpacket.View
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if view, perr = svc.Get(code); perr != nil {
			t.Fatal(perr)
		}
		if view.State == redpacket.StateFinished {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rain not settled: %+v", view)
		}
	}
	if view.GrantedCount != 1 || view.GrantedAmount != packets || view.GrantedAmount+view.Refunded != total {
		t.Fatalf("settled %+v, want one grant of %d and the rest refunded (total %d)", view, packets, total)
	}
	if bal, err := w.Balance(u); err != nil || bal != packets {
		t.Fatalf("user's balance %d %v, want %d", bal, err, packets)
	}
	if bal, err := w.Balance(rpAnchor); err != nil || bal != 10_000-total+view.Refunded {
		t.Fatalf("anchor's balance %d %v, want %d", bal, err, 10_000-total+view.Refunded)
	}
}
