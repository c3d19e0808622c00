package ticket

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

func newRedisClient(t testing.TB, addr string) rueidis.Client {
	t.Helper()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rdb.Close)
	return rdb
}

func noCommit(Coupon, []persist.Record) error { return nil }

// openStore opens a Pebble store in a temp dir, closed with the test.
func openStore(t testing.TB) *persist.Store {
	t.Helper()
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}

// SharedCoupons on a real redis-server, through two clients (two nodes): a
// coupon granted through one is used once cluster-wide under 2 × 50
// concurrent uses by different orders; the holder's retry answers it again;
// only the holder gives it back, idempotently; an order that gave it back
// cannot take it again (a late retry); another user's or an unknown coupon is
// 40005; a failed commit leaves the use for the caller to give back.
func TestSharedCouponsOneUseClusterWide(t *testing.T) {
	addr := startCouponRedis(t)
	nodes := []*SharedCoupons{NewSharedCoupons(newRedisClient(t, addr), openStore(t)), NewSharedCoupons(newRedisClient(t, addr), openStore(t))}
	c := Coupon{ID: "c42", UserID: 7, Amount: 30, CreatedAt: 1234}
	if err := nodes[0].Grant(c); err != nil {
		t.Fatal(err)
	}
	if got, err := nodes[1].Get("c42"); err != nil || got != c {
		t.Fatalf("granted through node 1, read through node 2: %+v %v", got, err)
	}
	_, err := nodes[1].Get("c-none")
	wantCode(t, err, proto.CodeCouponUnusable)
	wantCode(t, nodes[1].Use("c-none", 7, "o0", noCommit), proto.CodeCouponUnusable)
	wantCode(t, nodes[1].Use("c42", 8, "o0", noCommit), proto.CodeCouponUnusable) // another user's

	var wg sync.WaitGroup
	var won atomic.Int64
	var winner atomic.Value
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			order := fmt.Sprintf("o%d", i+1)
			err := nodes[i%2].Use("c42", 7, order, func(got Coupon, recs []persist.Record) error {
				if got.Amount != 30 || got.UsedBy != order || len(recs) != 0 {
					t.Errorf("use by %s: %+v %v", order, got, recs)
				}
				return nil
			})
			switch {
			case err == nil:
				won.Add(1)
				winner.Store(order)
			case proto.AsError(err).Code != proto.CodeCouponUnusable:
				t.Errorf("use by %s: %v", order, err)
			}
		}(i)
	}
	wg.Wait()
	if won.Load() != 1 {
		t.Fatalf("%d uses of a one-use coupon", won.Load())
	}
	holder := winner.Load().(string)
	loser := "o1"
	if holder == loser {
		loser = "o2"
	}
	if err := nodes[0].Use("c42", 7, holder, noCommit); err != nil {
		t.Fatalf("the holder's retry: %v", err)
	}
	back := func(n *SharedCoupons, order string) bool {
		t.Helper()
		var held bool
		if err := n.GiveBack("c42", 7, order, func(h bool, recs []persist.Record) error { held = h; return nil }); err != nil {
			t.Fatal(err)
		}
		return held
	}
	if back(nodes[1], loser) {
		t.Fatal("an order that never held the coupon gave it back")
	}
	if got, _ := nodes[0].Get("c42"); got.UsedBy != holder {
		t.Fatalf("after a loser's give-back: %+v", got)
	}
	if !back(nodes[1], holder) || back(nodes[0], holder) {
		t.Fatal("the holder's give-back: want held once, then not")
	}
	if got, _ := nodes[0].Get("c42"); got.UsedBy != "" {
		t.Fatalf("after the give-back: %+v", got)
	}
	// The holder's use retried late (after its give-back) takes nothing;
	// the loser's give-back (above) bars it as well, even though it never
	// held the coupon: its late use could not take it either.
	wantCode(t, nodes[0].Use("c42", 7, holder, noCommit), proto.CodeCouponUnusable)
	wantCode(t, nodes[0].Use("c42", 7, loser, noCommit), proto.CodeCouponUnusable)
	// A commit that fails: Use answers its error, the coupon is held by the
	// order in Redis until that order gives it back.
	boom := errors.New("order write failed")
	if err := nodes[1].Use("c42", 7, "o-late", func(Coupon, []persist.Record) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("failed commit: %v", err)
	}
	if got, _ := nodes[0].Get("c42"); got.UsedBy != "o-late" {
		t.Fatalf("after a failed commit: %+v", got)
	}
	if !back(nodes[0], "o-late") {
		t.Fatal("the give-back after a failed commit found nothing")
	}
	// Orders of another user (their use is refused: 40005) give back
	// nothing and leave no mark: the coupon's hash does not grow with them.
	rdb := newRedisClient(t, addr)
	fields := func() int64 {
		n, err := rdb.Do(context.Background(), rdb.B().Hlen().Key(sharedCouponKey("c42")).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := fields()
	for i := range 20 {
		if err := nodes[1].GiveBack("c42", 8, "x"+strconv.Itoa(i), func(h bool, _ []persist.Record) error {
			if h {
				t.Error("another user's order held the coupon")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if after := fields(); after != before {
		t.Fatalf("another user's give-backs grew the coupon's hash from %d to %d fields", before, after)
	}
	if err := nodes[0].GiveBack("c-none", 7, "o1", func(h bool, _ []persist.Record) error {
		if h {
			t.Error("an unknown coupon held")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// After Redis lost its data, SharedCoupons are rebuilt with the shared
// wallet (Contribute) and refused until the rebuild is done: a real
// persist.SharedWallet of two nodes, one of which never contributes, keeps
// the generation rebuilding. Meanwhile Get, Grant, Use and GiveBack answer
// "unavailable, retry" and change nothing, though this node's grant is back
// in Redis (its contribution); once the other node contributes the
// generation is ready and the coupon is used once.
func TestSharedCouponsRefusedWhileRebuilding(t *testing.T) {
	addr := startCouponRedis(t)
	rdb := newRedisClient(t, addr)
	store := openStore(t)
	cp := NewSharedCoupons(rdb, store)
	if err := cp.Grant(Coupon{ID: "c1", UserID: 7, Amount: 30, CreatedAt: 1}); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Do(context.Background(), rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	open := func(node string, st *persist.Store, contribute func(time.Time, func(...string) error) error) *persist.SharedWallet {
		t.Helper()
		w, err := persist.NewSharedWallet(st, newRedisClient(t, addr), persist.SharedConfig{
			Node: node, Nodes: []string{"a", "b"}, Log: quietLog(), Contribute: contribute})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(w.Close)
		return w
	}
	wa := open("a", store, cp.Contribute)
	if wa.Ready() {
		t.Fatal("ready with one of two nodes contributed")
	}
	unavailable := func(what string, err error) {
		t.Helper()
		if e := proto.AsError(err); e == nil || e.Code != proto.CodeInternal || !strings.HasSuffix(e.Msg, "retry") {
			t.Fatalf("%s while rebuilding: %v", what, err)
		}
	}
	_, err := cp.Get("c1")
	unavailable("get", err)
	unavailable("grant", cp.Grant(Coupon{ID: "c2", UserID: 7, Amount: 30, CreatedAt: 2}))
	unavailable("use", cp.Use("c1", 7, "o1", noCommit))
	unavailable("give back", cp.GiveBack("c1", 7, "o1", func(bool, []persist.Record) error { return nil }))
	hash, err := rdb.Do(context.Background(), rdb.B().Hgetall().Key(sharedCouponKey("c1")).Build()).AsStrMap()
	if err != nil || len(hash) != 3 || hash["u"] != "7" || hash["a"] != "30" || hash["t"] != "1" {
		t.Fatalf("c1 in Redis while rebuilding: %v %v (want its grant only)", hash, err)
	}
	if n, err := rdb.Do(context.Background(), rdb.B().Exists().Key(sharedCouponKey("c2")).Build()).AsInt64(); err != nil || n != 0 {
		t.Fatalf("a grant refused while rebuilding is in Redis: %d %v", n, err)
	}
	open("b", openStore(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := wa.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if err := cp.Use("c1", 7, "o1", noCommit); err != nil {
		t.Fatalf("use after the rebuild: %v", err)
	}
	wantCode(t, cp.Use("c1", 7, "o2", noCommit), proto.CodeCouponUnusable)
}

// contributed runs cp's contribution and returns its ops, one string each.
func contributed(t *testing.T, cp *SharedCoupons) []string {
	t.Helper()
	var ops []string
	if err := cp.Contribute(time.Time{}, func(op ...string) error {
		ops = append(ops, strings.Join(op, " "))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ops
}

// What a node contributes to the rebuild: each grant's facts; the holder of
// a coupon only for a live order that recorded its use; for an order closed
// or being undone only its give-back mark — also when its give-back is still
// owed (the coupon may be free in Redis and another order's already) or it
// never recorded a use.
func TestSharedCouponsContribution(t *testing.T) {
	store := openStore(t)
	cp := NewSharedCoupons(newRedisClient(t, startCouponRedis(t)), store)
	if err := cp.Grant(Coupon{ID: "c1", UserID: 7, Amount: 30, CreatedAt: 5}); err != nil {
		t.Fatal(err)
	}
	orders := []Order{
		{OrderID: "11", CouponID: "c1", Status: StatusPendingPay, Steps: Steps{CouponUsed: true}},
		{OrderID: "12", CouponID: "c2", Status: StatusPaid, Steps: Steps{CouponUsed: true}},
		{OrderID: "13", CouponID: "c3", Status: StatusCancelled, Steps: Steps{CouponUsed: true}}, // give-back owed
		{OrderID: "14", CouponID: "c3", Status: StatusPaid, Steps: Steps{CouponUsed: true}},      // took it after 13's script
		{OrderID: "15", CouponID: "c4", Status: StatusPlacing, Saga: SagaCompensating, Steps: Steps{CouponUsed: true}},
		{OrderID: "16", CouponID: "c4", Status: StatusCancelled, Saga: SagaCompensated},                            // never recorded a use
		{OrderID: "17", CouponID: "c5", Status: StatusPlacing, Saga: SagaRunning},                                  // its use unrecorded
		{OrderID: "18", CouponID: "c6", Status: StatusCancelled, Steps: Steps{CouponUsed: true, CouponBack: true}}, // given back
		{OrderID: "19", Status: StatusPaid}, // no coupon
		{OrderID: "20", CouponID: "c7", Status: StatusRefunded, Saga: SagaDone, Steps: Steps{CouponUsed: true}}, // refunded
	}
	for i := range orders {
		o := &orders[i]
		o.id, _ = strconv.ParseInt(o.OrderID, 10, 64)
		r := o.record()
		if err := store.Put(r.Key, r.Value); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{
		"hset le:tcoupon:{c1} u 7", "hset le:tcoupon:{c1} a 30", "hset le:tcoupon:{c1} t 5",
		"hset le:tcoupon:{c1} by 11", "hset le:tcoupon:{c2} by 12", "hset le:tcoupon:{c3} b:13 1",
		"hset le:tcoupon:{c3} by 14", "hset le:tcoupon:{c4} b:15 1", "hset le:tcoupon:{c4} b:16 1",
		"hset le:tcoupon:{c6} b:18 1", "hset le:tcoupon:{c7} b:20 1",
	}
	if got := contributed(t, cp); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("contribution:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// A node's contribution waits for its coupon ops under way: a use whose
// script ran is in the contribution as its order's commit recorded it.
func TestSharedCouponsContributionWaitsForAUse(t *testing.T) {
	store := openStore(t)
	cp := NewSharedCoupons(newRedisClient(t, startCouponRedis(t)), store)
	if err := cp.Grant(Coupon{ID: "c1", UserID: 7, Amount: 30, CreatedAt: 5}); err != nil {
		t.Fatal(err)
	}
	inCommit, release := make(chan struct{}), make(chan struct{})
	used := make(chan error, 1)
	go func() {
		used <- cp.Use("c1", 7, "21", func(c Coupon, recs []persist.Record) error {
			close(inCommit)
			<-release
			o := Order{OrderID: "21", id: 21, CouponID: "c1", Status: StatusPendingPay, Steps: Steps{CouponUsed: true}}
			r := o.record()
			return store.Put(r.Key, r.Value)
		})
	}()
	<-inCommit
	ops := make(chan []string, 1)
	go func() { ops <- contributed(t, cp) }()
	select {
	case got := <-ops:
		t.Fatalf("the contribution ran during a use's commit: %q", got)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-used; err != nil {
		t.Fatal(err)
	}
	if got := <-ops; !slices.Contains(got, "hset le:tcoupon:{c1} by 21") {
		t.Fatalf("contribution %q misses the use", got)
	}
}

// Coupons granted before nodes kept their grants on disk (an older version:
// the hash only) are copied to a node's disk at its start, once, and so are
// rebuilt after a Redis loss too.
func TestSharedCouponsBackfill(t *testing.T) {
	rdb := newRedisClient(t, startCouponRedis(t))
	ctx := context.Background()
	if err := rdb.Do(ctx, rdb.B().Hset().Key("le:tcoupon:{old1}").FieldValue().FieldValue("u", "7").FieldValue("a", "30").
		FieldValue("t", "5").FieldValue("by", "99").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	// Half a grant (as a rebuild in progress may leave it): not copied.
	if err := rdb.Do(ctx, rdb.B().Hset().Key("le:tcoupon:{half}").FieldValue().FieldValue("u", "7").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	cp := NewSharedCoupons(rdb, openStore(t))
	if n, err := cp.Backfill(ctx); n != 1 || err != nil {
		t.Fatalf("backfill: %d %v", n, err)
	}
	want := "hset le:tcoupon:{old1} u 7|hset le:tcoupon:{old1} a 30|hset le:tcoupon:{old1} t 5"
	if got := strings.Join(contributed(t, cp), "|"); got != want {
		t.Fatalf("contribution %q, want %q", got, want)
	}
	if n, err := cp.Backfill(ctx); n != 0 || err != nil {
		t.Fatalf("second backfill: %d %v", n, err)
	}
	// Not from a Redis whose wallet is not ready (rebuilding, or lost):
	// refused, and tried again at the next start.
	if err := rdb.Do(ctx, rdb.B().Hset().Key(persist.SharedMetaKey).FieldValue().FieldValue("state", "rebuilding").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	fresh := NewSharedCoupons(rdb, openStore(t))
	if n, err := fresh.Backfill(ctx); n != 0 || err == nil {
		t.Fatalf("backfill while rebuilding: %d %v", n, err)
	}
}

// An owner who keeps placing coins orders with one coupon that fail (too
// few coins) leaves a give-back mark per order in the coupon's Redis hash;
// marks older than couponMarkKeep are pruned, so the hash stays bounded —
// it grew by one field per failed order, for ever. The coupon still works.
func TestCouponGiveBackMarksArePruned(t *testing.T) {
	e := newSharedEnv(t, Config{})
	cs := e.svc.cstore.(*SharedCoupons)
	var off atomic.Int64
	cs.now = func() time.Time { return time.Now().Add(time.Duration(off.Load())) }
	prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: 100, Rows: 1, Cols: 4}}, 1, 4)
	c, err := e.svc.CreateCoupon(1, 30)
	if err != nil {
		t.Fatal(err)
	}
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{e.redis}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	fields := func() int64 {
		n, err := rdb.Do(context.Background(), rdb.B().Hlen().Key(sharedCouponKey(c.ID)).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	fail := func(req string) {
		t.Helper()
		_, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: req, Pay: PayCoins, CouponID: c.ID})
		wantCode(t, err, proto.CodeInsufficientBalance)
	}
	for i := range 40 {
		fail(fmt.Sprint("a", i))
	}
	if n := fields(); n < 40 {
		t.Fatalf("%d fields after 40 give-backs within the hour: recent marks must stay", n)
	}
	off.Store(int64(2 * time.Hour))
	fail("late")
	if n := fields(); n > 3+1 {
		t.Fatalf("%d fields two hours later: marks older than %v not pruned", n, couponMarkKeep)
	}
	e.credit(1, 100)
	o, err := e.svc.Place(1, PlaceReq{ProgramID: prog, CategoryID: 1, Count: 1, ReqID: "paid", Pay: PayCoins, CouponID: c.ID})
	if err != nil || o.Status != StatusPaid || o.Amount != 70 {
		t.Fatalf("%+v %v", o, err)
	}
	e.conservation()
}
