package gateway

import (
	"context"
	"errors"
	"io"
	"log/slog"
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
	if err := rdb.Do(ctx, rdb.B().Hset().Key(persist.SharedMetaKey).FieldValue().FieldValue("state", "ready").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	st, l := persisttest.OpenLedger(t)
	n := &Node{Redis: rdb}
	rt := router.NewLocal("n1", router.LocalConfig{})
	rt.OpenRoom(rpRoom)
	cfg := redpacket.Config{Node: "n1", CodeTag: -1, OnePerUser: true,
		AnchorOf: func(int64) (int64, bool) { return rpAnchor, true },
		InRoom:   func(room, _ int64) bool { return room == rpRoom },
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
