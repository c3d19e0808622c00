package pay_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

// A node's unpaid orders count across the cluster again after it restarts:
// Redis had lost their places meanwhile, and the restarted node keeps them
// again from its disk, so another node refuses the user's order past the
// bound. A refusal by the order rate takes no place (before, the place
// taken first stayed until its drop reached Redis).
func TestOpenOrdersKeptAgainAtStart(t *testing.T) {
	srv := redistest.Start(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	const secret = "held-test-secret-0123456789abcdef"
	const user = 9
	type node struct {
		st  *persist.Store
		l   *persist.Ledger
		h   *limit.Held
		svc *pay.Service
	}
	open := func(dir, name string, perMinute int) *node {
		st, err := persist.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		l, err := persist.NewLedger(st, nil)
		if err != nil {
			t.Fatal(err)
		}
		h := limit.NewHeld(srv.Client(t), "payopen", 2, log)
		svc, err := pay.New(st, l, router.NewLocal(name, router.LocalConfig{}), pay.Config{Node: name, Secrets: []string{secret},
			ReconcileEvery: time.Hour, MaxOpenPerUser: 2, OrdersPerMinute: perMinute, SharedOpen: h, Log: log})
		if err != nil {
			t.Fatal(err)
		}
		return &node{st, l, h, svc}
	}
	closeNode := func(n *node) {
		n.svc.Close()
		n.h.Close()
		n.l.Close()
		_ = n.st.Close()
	}
	dirA := t.TempDir()
	a := open(dirA, "a", 0)
	for _, req := range []string{"1", "2"} {
		if _, err := a.svc.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: req}); err != nil {
			t.Fatal(err)
		}
	}
	closeNode(a)
	rdb := srv.Client(t)
	if err := rdb.Do(context.Background(), rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	a = open(dirA, "a", 0)
	t.Cleanup(func() { closeNode(a) })
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if n, err := a.h.Held(user); err == nil && n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the restarted node did not keep its two open orders again")
		}
	}
	b := open(t.TempDir(), "b", 1)
	t.Cleanup(func() { closeNode(b) })
	if _, err := b.svc.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "3"}); proto.AsError(err).Code != proto.CodeRateLimited {
		t.Fatalf("a third unpaid order through another node: %v, want 10429", err)
	}
	// Another user's second order within the minute is refused by b's order
	// rate (1 a minute) before any place is asked for.
	other := int64(user + 1)
	if _, err := b.svc.CreateOrder(other, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "x"}); err != nil {
		t.Fatal(err)
	}
	takes := b.h.Takes()
	if _, err := b.svc.CreateOrder(other, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "y"}); proto.AsError(err).Code != proto.CodeRateLimited {
		t.Fatalf("over the order rate: %v, want 10429", err)
	}
	if n := b.h.Takes() - takes; n != 0 {
		t.Fatalf("an order refused by the rate asked for %d places, want none", n)
	}
}

// Redis losing its data while a node runs loses the places of its unpaid
// orders; KeepOpenPlaces (the node calls it when the shared state was
// rebuilt) keeps them again, so the bound holds again without a restart.
func TestOpenOrdersKeptAgainAfterRedisLoss(t *testing.T) {
	srv := redistest.Start(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	const user = 9
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	l, err := persist.NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	h := limit.NewHeld(srv.Client(t), "payopen", 2, log)
	t.Cleanup(h.Close)
	svc, err := pay.New(st, l, router.NewLocal("a", router.LocalConfig{}), pay.Config{Node: "a", Secrets: []string{"held-test-secret-0123456789abcdef"},
		ReconcileEvery: time.Hour, MaxOpenPerUser: 2, SharedOpen: h, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	for _, req := range []string{"1", "2"} {
		if _, err := svc.CreateOrder(user, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: req}); err != nil {
			t.Fatal(err)
		}
	}
	rdb := srv.Client(t)
	if err := rdb.Do(context.Background(), rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if n, err := h.Held(user); n != 0 || err != nil {
		t.Fatalf("held %d (%v) after the loss", n, err)
	}
	svc.KeepOpenPlaces()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if n, err := h.Held(user); err == nil && n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the two open orders' places were not kept again")
		}
	}
}
