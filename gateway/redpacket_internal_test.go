package gateway

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

// rpNode is a red-packet service on its own Pebble and ledger whose
// one-per-user places and room keys are this node's, in a real Redis
// (claimRain, runRainInRoom…: the scripts a cluster runs); a test wraps
// them (edit) to lose a reply or fail a call around the real one.
type rpNode struct {
	svc *redpacket.Service
	l   *persist.Ledger
	st  *persist.Store
	rdb rueidis.Client
	n   *Node
}

const rpRoom, rpAnchor = 7, 1

func startRPNode(t *testing.T, wallet func(*persist.Ledger) persist.Wallet, edit func(n *Node, c *redpacket.Config)) *rpNode {
	t.Helper()
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	// The shared wallet's generation is ready (no rebuild under way).
	if err := rdb.Do(ctx, rdb.B().Hset().Key(persist.SharedMetaKey).FieldValue().FieldValue("gen", "g1").FieldValue("state", "ready").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	st, l := persisttest.OpenLedger(t)
	n := &Node{Redis: rdb}
	rt := router.NewLocal("n1", router.LocalConfig{})
	rt.OpenRoom(rpRoom)
	cfg := redpacket.Config{Node: "n1", CodeTag: -1, OnePerUser: true,
		AnchorOf: func(int64) (int64, bool, error) { return rpAnchor, true, nil },
		InRoom:   func(room, _ int64) (bool, error) { return room == rpRoom, nil },
		Claim:    n.claimRain, Unclaim: n.unclaimRain, RoomRun: n.runRainInRoom, RoomDone: n.rainDoneInRoom,
	}
	if edit != nil {
		edit(n, &cfg)
	}
	var w persist.Wallet = l
	if wallet != nil {
		w = wallet(l)
	}
	svc, err := redpacket.New(st, w, rt, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	if _, err := l.Apply(persist.Op{Postings: []persist.Posting{{User: rpAnchor, Delta: 10_000, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	return &rpNode{svc: svc, l: l, st: st, rdb: rdb, n: n}
}

// prepared makes a prepared rain of total coins in count packets lasting d.
func (p *rpNode) prepared(t *testing.T, total int64, count int, d time.Duration) string {
	t.Helper()
	v, err := p.svc.Create(rpAnchor, rpRoom, total, count, d)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.svc.Prepare(rpAnchor, v.Code); err != nil {
		t.Fatal(err)
	}
	return v.Code
}

// finished waits for rain code to be settled.
func (p *rpNode) finished(t *testing.T, code string) redpacket.View {
	t.Helper()
	var v redpacket.View
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if v, err = p.svc.Get(code); err != nil {
			t.Fatal(err)
		}
		if v.State == redpacket.StateFinished {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("rain %s not settled: %+v", code, v)
		}
	}
}

// startUntil starts rain code, retrying while the room is another rain's
// (10409), for up to 5 s.
func (p *rpNode) startUntil(t *testing.T, code string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, err := p.svc.Start(rpAnchor, code)
		if err == nil {
			return
		}
		if proto.AsError(err).Code != proto.CodeConflict || time.Now().After(deadline) {
			t.Fatalf("start %s: %v", code, err)
		}
	}
}

// A start whose room check ran in Redis but whose reply was lost fails
// (50000) and gives the room back: another rain of the room starts. Before,
// the room's key named the rain that never ran until its end plus 10
// minutes, and every other start in the room was 10409. A release Redis
// does not answer is retried — also the one of a rain that ended.
func TestRoomGivenBackWhenItsStartFails(t *testing.T) {
	var lost atomic.Value // the code whose next room check loses its reply
	lost.Store("")
	var failDone atomic.Int32 // room releases that fail, as Redis down
	p := startRPNode(t, nil, func(n *Node, c *redpacket.Config) {
		c.RoomRun = func(ctx context.Context, room int64, code string, until int64) (bool, error) {
			ok, err := n.runRainInRoom(ctx, room, code, until)
			if err == nil && lost.CompareAndSwap(code, "") {
				return false, context.DeadlineExceeded // ran; its reply lost
			}
			return ok, err
		}
		c.RoomDone = func(ctx context.Context, room int64, code string) error {
			if failDone.Add(-1) >= 0 {
				return errors.New("redis: connection refused")
			}
			return n.rainDoneInRoom(ctx, room, code)
		}
	})
	const total = 1000
	a, b := p.prepared(t, total, 10, time.Second), p.prepared(t, total, 10, time.Second)
	lost.Store(a)
	failDone.Store(1)
	if _, err := p.svc.Start(rpAnchor, a); proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("start with its room check's reply lost: %v, want 50000", err)
	}
	p.startUntil(t, b) // the room's key released (its first release failed)
	failDone.Store(1)
	p.finished(t, b)   // nobody grabbed: all refunded; its release fails once
	p.startUntil(t, a) // the rain whose start failed starts now
	if v := p.finished(t, a); v.Refunded != total {
		t.Fatalf("rain %s: %+v", a, v)
	}
	key, err := p.rdb.Do(context.Background(), p.rdb.B().Get().Key(rainRoomKey(rpRoom)).Build()).ToString()
	for deadline := time.Now().Add(5 * time.Second); err == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		key, err = p.rdb.Do(context.Background(), p.rdb.B().Get().Key(rainRoomKey(rpRoom)).Build()).ToString()
	}
	if !rueidis.IsRedisNil(err) {
		t.Fatalf("the room's running rain after both ended: %q %v", key, err)
	}
	persisttest.CheckConservation(t, p.l)
	if bal, _ := p.l.Balance(rpAnchor); bal != 10_000 {
		t.Fatalf("anchor balance %d after two rains nobody grabbed, want 10000", bal)
	}
}

// grantsOf reads rain code's durable grants on p: user → amount (a user
// granted twice fails the test).
func (p *rpNode) grantsOf(t *testing.T, code string) map[int64]int64 {
	t.Helper()
	out := map[int64]int64{}
	err := p.st.Scan([]byte("rec/rpgrant/"+code+"/"), func(_, v []byte) error {
		var g struct {
			User   int64 `json:"user"`
			Amount int64 `json:"amount"`
		}
		if err := proto.Unmarshal(v, &g); err != nil {
			return err
		}
		if _, dup := out[g.User]; dup {
			t.Errorf("user %d granted two packets", g.User)
		}
		out[g.User] = g.Amount
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// settled waits for rain code (total coins) to be settled and checks the
// money: the durable grants are exactly want's users (each answered the
// amount want names, 0: any), each credited once, Σ grants + refund = total,
// the ledger's audit holds.
func (p *rpNode) settled(t *testing.T, code string, total int64, want map[int64]int64) {
	t.Helper()
	v := p.finished(t, code)
	grants := p.grantsOf(t, code)
	var sum int64
	for u, a := range grants {
		w, ok := want[u]
		if !ok || w != 0 && w != a {
			t.Fatalf("user %d granted %d; answered %v", u, a, want)
		}
		if bal, _ := p.l.Balance(u); bal != a {
			t.Fatalf("user %d granted %d, balance %d", u, a, bal)
		}
		sum += a
	}
	if len(grants) != len(want) || sum != v.GrantedAmount || sum+v.Refunded != total {
		t.Fatalf("grants %v (want %v users), view %+v, total %d", grants, want, v, total)
	}
	persisttest.CheckConservation(t, p.l)
	if bal, _ := p.l.Balance(rpAnchor); bal != 10_000-sum {
		t.Fatalf("anchor balance %d, granted %d of 10000", bal, sum)
	}
}

// placed reports whether user has a place in rain code's set in Redis.
func (p *rpNode) placed(t *testing.T, code string, user int64) bool {
	t.Helper()
	in, err := p.rdb.Do(context.Background(), p.rdb.B().Sismember().Key(rainClaimKey(code)).Member(strconv.FormatInt(user, 10)).Build()).AsBool()
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// waitUnplaced waits (5 s at most) for user's place in rain code to be
// given back: a grab of theirs on any other node is served.
func (p *rpNode) waitUnplaced(t *testing.T, code string, user int64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); p.placed(t, code, user); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("user %d's place in %s never given back", user, code)
		}
	}
}

// A grab whose one-per-user claim ran in Redis but whose reply was lost (a
// timeout) fails (50000) and granted nothing: the user's next grab gets a
// packet, and one only. Before, the place stayed taken: every later grab of
// the user, on any node, was 30002 for the whole rain, nothing granted. The
// place is given back in Redis too (another node serves the user).
func TestGrabAfterALostClaimReply(t *testing.T) {
	const u, v, w = 100, 101, 102
	var lose sync.Map // users whose next claim loses its reply
	lose.Store(int64(u), true)
	lose.Store(int64(w), true)
	p := startRPNode(t, nil, func(n *Node, c *redpacket.Config) {
		c.Claim = func(ctx context.Context, code string, user, until int64, token string, prev []string) (bool, string, error) {
			ok, gen, err := n.claimRain(ctx, code, user, until, token, prev)
			if _, l := lose.LoadAndDelete(user); l && err == nil {
				return false, "", context.DeadlineExceeded // ran; its reply lost
			}
			return ok, gen, err
		}
	})
	const total = 1000
	code := p.prepared(t, total, 10, 2*time.Second)
	if _, err := p.svc.Start(rpAnchor, code); err != nil {
		t.Fatal(err)
	}
	for _, user := range []int64{u, w} {
		if _, perr := p.svc.Grab(user, code); perr == nil || perr.Code != proto.CodeInternal {
			t.Fatalf("user %d's grab, its claim's reply lost: %v, want 50000", user, perr)
		}
	}
	got, perr := p.svc.Grab(u, code)
	if perr != nil {
		t.Fatalf("the user's grab after a lost claim reply: %v, want a packet", perr)
	}
	if _, perr := p.svc.Grab(u, code); perr == nil || perr.Code != proto.CodeRedPacketTaken {
		t.Fatalf("a second packet for the user: %v, want 30002", perr)
	}
	gv, perr := p.svc.Grab(v, code)
	if perr != nil {
		t.Fatal(perr)
	}
	p.waitUnplaced(t, code, w) // w did not come back here
	if !p.placed(t, code, u) || !p.placed(t, code, v) {
		t.Fatal("a granted user has no place")
	}
	p.settled(t, code, total, map[int64]int64{u: got.Amount, v: gv.Amount})
}

// unavailableGrant refuses the first grant op of each of users as the
// shared wallet does while it is unavailable: nothing moved.
type unavailableGrant struct {
	*persist.Ledger
	users sync.Map // user → true until their first grant is refused
}

func (w *unavailableGrant) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	if _, first := w.users.LoadAndDelete(op.User); first && strings.HasPrefix(op.ReqID, "rp:") {
		done(persist.Result{}, persist.ErrWalletUnavailable)
		return
	}
	w.Ledger.ApplyAsync(op, done)
}

// A grab whose grant the wallet refused as unavailable (nothing moved) and
// whose place's release then failed (Redis still down) leaves the user free
// to grab: at once on this node, and elsewhere once the release, retried,
// lands. Before, the failed release was only logged and the place stayed
// until an hour after the rain: 30002, nothing granted.
func TestGrabAfterAnUnavailableGrantAndAFailedRelease(t *testing.T) {
	const u, v, x = 100, 101, 102
	w := &unavailableGrant{}
	w.users.Store(int64(u), true)
	w.users.Store(int64(x), true)
	var fails sync.Map // user → releases that still fail
	fails.Store(int64(u), 3)
	fails.Store(int64(x), 3)
	p := startRPNode(t, func(l *persist.Ledger) persist.Wallet { w.Ledger = l; return w }, func(n *Node, c *redpacket.Config) {
		c.Unclaim = func(ctx context.Context, code string, user int64, token string) error {
			if k, ok := fails.Load(user); ok && k.(int) > 0 {
				fails.Store(user, k.(int)-1)
				return errors.New("redis: connection refused")
			}
			return n.unclaimRain(ctx, code, user, token)
		}
	})
	const total = 1000
	code := p.prepared(t, total, 10, 2*time.Second)
	if _, err := p.svc.Start(rpAnchor, code); err != nil {
		t.Fatal(err)
	}
	for _, user := range []int64{u, x} {
		if _, perr := p.svc.Grab(user, code); perr == nil || perr.Code != proto.CodeInternal {
			t.Fatalf("user %d's grab, the wallet unavailable: %v, want 50000", user, perr)
		}
	}
	got, perr := p.svc.Grab(u, code)
	if perr != nil {
		t.Fatalf("the user's grab after an unavailable grant and a failed release: %v, want a packet", perr)
	}
	if _, perr := p.svc.Grab(u, code); perr == nil || perr.Code != proto.CodeRedPacketTaken {
		t.Fatalf("a second packet for the user: %v, want 30002", perr)
	}
	gv, perr := p.svc.Grab(v, code)
	if perr != nil {
		t.Fatal(perr)
	}
	p.waitUnplaced(t, code, x) // its release retried past three failures
	p.settled(t, code, total, map[int64]int64{u: got.Amount, v: gv.Amount})
}

// The place scripts: a place is held by the attempt that took it; only the
// attempt named as prev (one of the same node that granted nothing) is
// replaced; a release by an attempt that no longer holds it changes
// nothing; a place rebuilt from a grant (no attempt) is never taken back.
func TestRainPlacesHeldByTheirAttempt(t *testing.T) {
	p := startRPNode(t, nil, nil)
	ctx, n := context.Background(), p.n
	until := time.Now().Add(time.Minute).UnixMilli()
	claim := func(token string, prev ...string) bool {
		t.Helper()
		ok, gen, err := n.claimRain(ctx, "CODE", 7, until, token, prev)
		if err != nil {
			t.Fatal(err)
		}
		if ok != (gen == "g1") {
			t.Fatalf("claim %s: %v in generation %q, want g1 when taken", token, ok, gen)
		}
		return ok
	}
	if !claim("a:1") {
		t.Fatal("a free place not taken")
	}
	if claim("b:1") || claim("b:2", "b:1") {
		t.Fatal("a place held by another attempt taken")
	}
	if !claim("a:2", "a:1") {
		t.Fatal("a place not taken back from the attempt named")
	}
	if !claim("a:3", "x:9", "a:2") {
		t.Fatal("a place not taken back from one of the attempts named")
	}
	if err := n.unclaimRain(ctx, "CODE", 7, "a:1"); err != nil || !p.placed(t, "CODE", 7) {
		t.Fatalf("a release by an attempt that no longer holds the place: %v, placed %v", err, p.placed(t, "CODE", 7))
	}
	if err := n.unclaimRain(ctx, "CODE", 7, "a:3"); err != nil || p.placed(t, "CODE", 7) {
		t.Fatalf("a release by its holder: %v, placed %v", err, p.placed(t, "CODE", 7))
	}
	// Rebuilt from a grant (contributeRainClaims: the set, no attempt).
	if err := p.rdb.Do(ctx, p.rdb.B().Sadd().Key(rainClaimKey("CODE")).Member("7").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if claim("c:1") || claim("c:2", "a:2") {
		t.Fatal("a rebuilt place taken")
	}
}
