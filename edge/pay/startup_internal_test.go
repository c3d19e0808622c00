package pay

import (
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

// A start reads the orders open at the last start and those made since,
// not every order ever made (the start-up checkpoint); without a checkpoint
// (a store of an older version) or with a clock behind the last start's, it
// reads them all. Every open order is found either way, and stays payable.
func TestStartReadsOpenOrdersAndThoseMadeSince(t *testing.T) {
	st, led := persisttest.OpenLedger(t)
	const secret = "startup-internal-secret-0123456789abcdef"
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	var offset atomic.Int64
	clock := func() time.Time { return t0.Add(time.Duration(offset.Load())) }
	at := func(d time.Duration) { offset.Store(int64(d)) }
	start := func() *Service {
		t.Helper()
		s, err := New(st, led, router.NewLocal("a", router.LocalConfig{}), Config{Node: "a", Secrets: []string{secret},
			ReconcileEvery: time.Hour, Now: clock})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	openIDs := func(s *Service) []int64 {
		s.openMu.Lock()
		defer s.openMu.Unlock()
		ids := make([]int64, 0, len(s.open))
		for id := range s.open {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		return ids
	}
	notify := func(s *Service, o Order) (int, string) {
		body, _ := proto.Marshal(Event{EventID: "ev-" + o.OrderID, OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS", PaidAt: clock().UnixMilli()})
		return s.Notify("mock", Sign(secret, clock(), body), body)
	}
	pay := func(s *Service, o Order) {
		t.Helper()
		if code, msg := notify(s, o); code != NotifyOK {
			t.Fatalf("notify %s: %d %s", o.OrderID, code, msg)
		}
	}
	id := func(o Order) int64 { n, _ := strconv.ParseInt(o.OrderID, 10, 64); return n }
	create := func(s *Service, user int64, req string) Order {
		t.Helper()
		o, err := s.CreateOrder(user, CreateReq{ProductID: 1, Channel: "mock", ReqID: req})
		if err != nil {
			t.Fatal(err)
		}
		return o
	}
	check := func(s *Service, loaded int, open []int64) {
		t.Helper()
		slices.Sort(open)
		if s.loaded != loaded || !slices.Equal(openIDs(s), open) {
			t.Fatalf("start read %d orders and found open %v, want %d and %v", s.loaded, openIDs(s), loaded, open)
		}
	}
	// credited checks o's buyer holds o's coins exactly once (each buyer
	// here has one order).
	credited := func(o Order) {
		t.Helper()
		if b, err := led.Balance(o.UserID); err != nil || b != o.Coins {
			t.Fatalf("buyer %d holds %d coins (%v), want %d: credited once", o.UserID, b, err, o.Coins)
		}
	}
	// restartAt starts the service at d after t0 and checks what it read.
	restartAt := func(d time.Duration, loaded int, open []int64) *Service {
		t.Helper()
		at(d)
		s := start()
		check(s, loaded, open)
		return s
	}

	// 30 orders, 27 paid.
	s := start()
	var orders []Order
	for u := int64(1); u <= 30; u++ {
		orders = append(orders, create(s, u, "r"+strconv.FormatInt(u, 10)))
	}
	for _, o := range orders[3:] {
		pay(s, o)
	}
	s.Close()
	open := []int64{id(orders[0]), id(orders[1]), id(orders[2])}

	// Three hours later: the first start's checkpoint lists nothing, and
	// every order was made since (within its hour of slack).
	s = restartAt(3*time.Hour, 30, open)
	s.Close()

	// An hour later: only the three open then are read.
	s = restartAt(4*time.Hour, 3, open)
	pay(s, orders[0])
	made := []Order{create(s, 41, "n"), create(s, 42, "n")}
	s.Close()
	open = []int64{id(orders[1]), id(orders[2]), id(made[0]), id(made[1])}

	// A minute later: the three listed (one paid since) and the two made since.
	// Still payable, loaded from the checkpoint's list, and credited once:
	// the provider's notify arrives twice at once.
	s = restartAt(4*time.Hour+time.Minute, 5, open)
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			if code, msg := notify(s, orders[1]); code != NotifyOK {
				t.Errorf("notify %s: %d %s", orders[1].OrderID, code, msg)
			}
		})
	}
	wg.Wait()
	credited(orders[1])
	s.Close()
	open = open[1:]

	// A clock behind the last start's: every order is read. The notify
	// retried after the restart credits nothing more.
	s = restartAt(2*time.Hour, 32, open)
	pay(s, orders[1])
	credited(orders[1])
	s.Close()

	// No checkpoint (a store written by an older version): every order.
	at(5 * time.Hour)
	if err := st.Delete(orderStartKey); err != nil {
		t.Fatal(err)
	}
	s = start()
	check(s, 32, open)
	s.Close()
	// The next start reads the three open: one listed, two (made at 4 h)
	// within the hour before the last start, read again as made since.
	s = restartAt(6*time.Hour, 3, open)
	s.Close()
	// And after a quiet day, only the three listed.
	s = restartAt(30*time.Hour, 3, open)
	for _, o := range []Order{orders[2], made[0], made[1]} {
		pay(s, o)
	}
	s.Close()
	s = restartAt(31*time.Hour, 3, nil) // listed at the last start, all paid since
	s.Close()
	s = restartAt(32*time.Hour, 0, nil)
	// The clock steps back 30 h while the node runs (before its next
	// order): the order's id is still above this start's mark, so the next
	// start finds it.
	at(2 * time.Hour)
	late := create(s, 50, "late")
	s.Close()
	s = restartAt(33*time.Hour, 1, []int64{id(late)})
	s.Close()
	persisttest.CheckConservation(t, led)
}

// A node restarted with its clock set back (here: to the very millisecond
// of its last order) makes no order id again: an id made twice would write
// the new order over the old one.
func TestOrderIDsNeverRepeatAfterAClockSetBack(t *testing.T) {
	st, led := persisttest.OpenLedger(t)
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	start := func() *Service {
		t.Helper()
		s, err := New(st, led, router.NewLocal("a", router.LocalConfig{}), Config{Node: "a",
			Secrets: []string{"startup-internal-secret-0123456789abcdef"}, ReconcileEvery: time.Hour,
			Now: func() time.Time { return t0 }})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := start()
	first, err := s.CreateOrder(7, CreateReq{ProductID: 1, Channel: "mock", ReqID: "first"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = start()
	defer s.Close()
	second, err := s.CreateOrder(7, CreateReq{ProductID: 2, Channel: "mock", ReqID: "second"})
	if err != nil {
		t.Fatal(err)
	}
	a, _ := strconv.ParseInt(first.OrderID, 10, 64)
	b, _ := strconv.ParseInt(second.OrderID, 10, 64)
	if b <= a {
		t.Fatalf("order id %d made after %d, same clock: want a greater one", b, a)
	}
	if got, err := s.Get(a); err != nil || got.ReqID != "first" {
		t.Fatalf("the first order reads %+v, %v", got, err)
	}
}
