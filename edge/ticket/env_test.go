package ticket

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

const testSecret = "ticket-test-pay-secret-0123456789"

// clock is an injected clock: real time plus an offset tests move forward.
type clock struct{ off atomic.Int64 }

func (c *clock) now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *clock) advance(d time.Duration) { c.off.Add(int64(d)) }

// env is a real single-node stack on a temp dir: Pebble, the Ledger, the pay
// centre and the ticket service wired as the node wires them.
type env struct {
	t      testing.TB
	dir    string
	clock  *clock
	cfg    Config
	store  *persist.Store
	ledger *persist.Ledger
	pay    *pay.Service
	svc    *Service
	redis  string         // "" = coupons in Pebble; else SharedCoupons in this redis-server
	noBiz  bool           // open leaves the service unregistered with the pay centre (a node starting)
	rdb    rueidis.Client // with redis: the client, reopened with the node
	router *router.Local  // the pushes' router, reopened with the node

	provider string // the pay centre's provider ("" = none: its queries fail)
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	return openEnv(t, t.TempDir(), cfg)
}

// newSharedEnv is newEnv with the coupons of a cluster: SharedCoupons in a
// throwaway real redis-server (one per test).
func newSharedEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	return openSharedEnv(t, t.TempDir(), startCouponRedis(t), cfg)
}

// startCouponRedis starts a throwaway redis-server whose shared wallet
// generation is ready (SharedCoupons are usable only then): a real
// persist.SharedWallet of one node, on a disk of its own, builds it and
// closes. The tests' coins stay in their env's Ledger.
func startCouponRedis(t testing.TB) string {
	t.Helper()
	addr := redistest.Start(t).Addr
	w, err := persist.NewSharedWallet(openStore(t), newRedisClient(t, addr), persist.SharedConfig{Node: "gen", Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return addr
}

// openSharedEnv is newSharedEnv on an existing data directory and Redis.
func openSharedEnv(t testing.TB, dir, redisAddr string, cfg Config) *env {
	t.Helper()
	e := &env{t: t, dir: dir, clock: &clock{}, cfg: cfg, redis: redisAddr}
	e.open()
	t.Cleanup(e.close)
	return e
}

// openEnv is newEnv on an existing data directory.
func openEnv(t testing.TB, dir string, cfg Config) *env {
	t.Helper()
	e := &env{t: t, dir: dir, clock: &clock{}, cfg: cfg}
	e.open()
	t.Cleanup(e.close)
	return e
}

func (e *env) open() {
	e.t.Helper()
	var err error
	if e.store, err = persist.Open(e.dir); err != nil {
		e.t.Fatal(err)
	}
	if e.ledger, err = persist.OpenLedger(e.store, persist.LedgerConfig{IdemMemoryBytes: 1 << 20}); err != nil {
		e.t.Fatal(err)
	}
	r := router.NewLocal("t", router.LocalConfig{})
	e.router = r
	if e.pay, err = pay.New(e.store, e.ledger, r, pay.Config{Node: "t", WorkerID: 1, Secrets: []string{testSecret},
		ProviderURL: cmp.Or(e.provider, "http://provider.invalid"), NotifyURL: "http://node.invalid/api/v1/pay/notify",
		ReconcileEvery: time.Hour, Now: e.clock.now, Log: quietLog()}); err != nil {
		e.t.Fatal(err)
	}
	cfg := e.cfg
	cfg.Now, cfg.Log = e.clock.now, quietLog()
	if e.redis != "" {
		if e.rdb, err = rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{e.redis}, DisableCache: true}); err != nil {
			e.t.Fatal(err)
		}
		cfg.Coupons = NewSharedCoupons(e.rdb, e.store)
	}
	if cfg.SweepEvery == 0 {
		cfg.SweepEvery = time.Hour // tests call CloseExpired themselves
	}
	if e.svc, err = New(e.store, e.ledger, e.pay, r, cfg); err != nil {
		e.t.Fatal(err)
	}
	if !e.noBiz {
		e.pay.RegisterBusiness(Biz, e.svc)
	}
}

func (e *env) close() {
	if e.store == nil {
		return
	}
	e.svc.Close()
	e.pay.Close()
	e.ledger.Close()
	_ = e.store.Close()
	e.store = nil
	if e.rdb != nil {
		e.rdb.Close()
		e.rdb = nil
	}
}

func (e *env) reopen() {
	e.t.Helper()
	e.close()
	e.open()
}

func (e *env) program(cats []CategoryDef, perOrder, perUser int) int64 {
	e.t.Helper()
	id, err := e.svc.CreateProgram(ProgramDef{Name: "show", Categories: cats, PerOrderMax: perOrder, PerUserMax: perUser})
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

func (e *env) credit(user, amount int64) {
	e.t.Helper()
	if _, err := e.ledger.Apply(persist.Op{User: user, ReqID: fmt.Sprintf("seed-%d-%d", user, amount),
		Postings: []persist.Posting{{User: user, Delta: amount, Reason: persist.ReasonDev}}}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) balance(user int64) int64 {
	e.t.Helper()
	b, err := e.ledger.Balance(user)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// counts checks free + locked + sold = seats in every category of program
// and returns the program's totals.
func (e *env) counts(program int64) (free, locked, sold int) {
	e.t.Helper()
	v, err := e.svc.Program(program)
	if err != nil {
		e.t.Fatal(err)
	}
	byStatus := map[uint8]int{}
	for _, st := range v.Seats {
		byStatus[st.Status]++
	}
	for _, c := range v.Categories {
		if c.Remaining+c.Locked+c.Sold != c.Rows*c.Cols {
			e.t.Fatalf("category %d: free %d + locked %d + sold %d != %d seats", c.ID, c.Remaining, c.Locked, c.Sold, c.Rows*c.Cols)
		}
		free, locked, sold = free+c.Remaining, locked+c.Locked, sold+c.Sold
	}
	if byStatus[SeatFree] != free || byStatus[SeatLocked] != locked || byStatus[SeatSold] != sold {
		e.t.Fatalf("seat list %v disagrees with the counts %d/%d/%d", byStatus, free, locked, sold)
	}
	return free, locked, sold
}

// notify delivers a signed provider event for order id through the pay
// centre's webhook handler; amount is cents, as the pay order's (a ticket
// order's PayAmount, not its Amount in coins).
func (e *env) notify(orderID, eventID string, amount int64) int {
	e.t.Helper()
	body, _ := proto.Marshal(pay.Event{EventID: eventID, OrderID: orderID, Amount: amount, Status: "SUCCESS", PaidAt: e.clock.now().UnixMilli()})
	st, _ := e.pay.Notify("mock", pay.Sign(testSecret, e.clock.now(), body), body)
	return st
}

func (e *env) order(id string) Order {
	e.t.Helper()
	oid, _ := pay.ParseOrderID(id)
	o, err := e.svc.load1(oid)
	if err != nil {
		e.t.Fatal(err)
	}
	return *o
}

func (e *env) conservation() {
	e.t.Helper()
	persisttest.CheckConservation(e.t, e.ledger)
}

func codeOf(err error) int {
	if err == nil {
		return 0
	}
	return proto.AsError(err).Code
}

func wantCode(t testing.TB, err error, code int) {
	t.Helper()
	if c := codeOf(err); c != code {
		t.Fatalf("got code %d (%v), want %d", c, err, code)
	}
}
