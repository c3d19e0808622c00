package pay

import (
	"errors"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
	"github.com/liveedge/liveedge/router"
)

// The confirmed req_id bindings on disk: listed within the window (and an
// hour's slack) of a rebuild's start, pruned a day after it.
func TestReqBindingsOnDiskWindowAndPrune(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.UnixMilli(100 * 3_600_000)
	s := &Service{store: st, cfg: Config{Now: func() time.Time { return now }, Log: slog.Default()}}
	for i, age := range []time.Duration{time.Minute, 25 * time.Hour, 26*time.Hour + time.Minute, 48*time.Hour + time.Minute, 50 * time.Hour} {
		s.markBound(Order{OrderID: strconv.Itoa(i + 1), UserID: 7, ReqID: "r" + strconv.Itoa(i+1), CreatedAt: now.Add(-age).UnixMilli()})
	}
	list := func() []string {
		var got []string
		err := ReqBindingsOnDisk(st, now, func(user int64, req string, id, at int64) error {
			if user != 7 || req != "r"+strconv.FormatInt(id, 10) {
				t.Fatalf("binding %d: user %d req %q", id, user, req)
			}
			got = append(got, req)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := list(); !slices.Equal(got, []string{"r2", "r1"}) { // oldest first
		t.Fatalf("bindings listed %v, want [r2 r1]", got)
	}
	s.pruneBound()
	var left []string
	_ = st.Scan(prefixReqBound, func(k, v []byte) error { left = append(left, string(v)); return nil })
	if len(left) != 4 || slices.ContainsFunc(left, func(v string) bool { return v == `{"user":7,"req_id":"r5"}` }) {
		t.Fatalf("records left after the prune: %v, want the four younger than 49 h", left)
	}
}

// confirmAll is a ReqClaims that binds every req_id to the first order that
// asks (the cluster's Redis bindings, in memory).
type confirmAll struct {
	mu    sync.Mutex
	bound map[string]int64
}

func (c *confirmAll) Claim(user int64, req string, id int64) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := strconv.FormatInt(user, 10) + "/" + req
	if prev, ok := c.bound[k]; ok && prev != id {
		return prev, nil
	}
	c.bound[k] = id
	return 0, nil
}

func (c *confirmAll) Confirm(user int64, req string, id int64) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := strconv.FormatInt(user, 10) + "/" + req
	if prev, ok := c.bound[k]; ok {
		return prev, nil
	}
	c.bound[k] = id
	return id, nil
}

func (c *confirmAll) Release(int64, string, int64) error { return nil }

func (c *confirmAll) Bound(user int64, req string) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bound[strconv.FormatInt(user, 10)+"/"+req], nil
}

// A retry of an order made through another node is pointed at that order
// even where a new order would be refused now (here: this node's worker
// lease not held; the account frozen or the product withdrawn since the
// same): before, the answer to one req_id depended on the node asked —
// the order through the first, 50000 or 20004 through another.
func TestRetryThroughAnotherNodeNotRefusedByNewOrderRules(t *testing.T) {
	claims := &confirmAll{bound: map[string]int64{}}
	open := func(node string, held bool) *Service {
		st, l := persisttest.OpenLedger(t)
		svc, err := New(st, l, router.NewLocal(node, router.LocalConfig{}), Config{Node: node,
			Secrets: []string{"bound-test-secret-0123456789abcdef"}, ReconcileEvery: time.Hour, ReqClaims: claims,
			WorkerHeld: func() bool { return held }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(svc.Close)
		return svc
	}
	a, b := open("a", true), open("b", false)
	o, err := a.CreateOrder(7, CreateReq{ProductID: 1, ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.CreateOrder(7, CreateReq{ProductID: 1, ReqID: "r1"})
	var el *OrderElsewhere
	if !errors.As(err, &el) || strconv.FormatInt(el.ID, 10) != o.OrderID {
		t.Fatalf("the retry through the other node: %v, want order %s (made through the first)", err, o.OrderID)
	}
	if _, err := b.CreateOrder(7, CreateReq{ProductID: 1, ReqID: "r2"}); err == nil || errors.As(err, &el) {
		t.Fatalf("a new order through a node without its worker lease: %v, want refused", err)
	}
}

// A crash between the confirm of an order's req_id and its disk record (the
// record a rebuild restores the binding from): the node restarts, and
// concurrent replays of the req_id answer the one order and write the
// record back, once.
func TestBoundRecordWrittenBackOnReplayAfterACrash(t *testing.T) {
	st, l := persisttest.OpenLedger(t)
	claims := &confirmAll{bound: map[string]int64{}}
	open := func() *Service {
		svc, err := New(st, l, router.NewLocal("req", router.LocalConfig{}), Config{Node: "req",
			Secrets: []string{"bound-test-secret-0123456789abcdef"}, ReconcileEvery: time.Hour, ReqClaims: claims})
		if err != nil {
			t.Fatal(err)
		}
		return svc
	}
	svc := open()
	o, err := svc.CreateOrder(7, CreateReq{ProductID: 1, ReqID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	bound := func() []int64 {
		var ids []int64
		if err := ReqBindingsOnDisk(st, time.Now(), func(user int64, req string, id, at int64) error {
			ids = append(ids, id)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return ids
	}
	id, _ := strconv.ParseInt(o.OrderID, 10, 64)
	if got := bound(); !slices.Equal(got, []int64{id}) {
		t.Fatalf("bound records %v, want [%d]", got, id)
	}
	svc.Close()
	if err := st.Delete(reqBoundKey(o.CreatedAt, id)); err != nil { // the crash: confirmed, not recorded
		t.Fatal(err)
	}
	svc = open()
	defer svc.Close()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if again, err := svc.CreateOrder(7, CreateReq{ProductID: 1, ReqID: "r1"}); err != nil || again.OrderID != o.OrderID {
				t.Errorf("replay after the restart: %+v %v, want order %s", again, err, o.OrderID)
			}
		}()
	}
	wg.Wait()
	if got := bound(); !slices.Equal(got, []int64{id}) {
		t.Fatalf("bound records after the replays %v, want [%d]", got, id)
	}
}

// An order whose creating write is in flight is "not found" to Get, even
// though Pebble already shows its record (a batch is readable before its
// fsync): in a cluster another node fetches the order of a pending req_id
// binding and would hand it out before it is durable — and a crash then
// leaves an order the user pays for on no disk. (The write's window cannot
// be held open from a test; the record is put as that window shows it.)
func TestGetDoesNotAnswerAnOrderBeingMade(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s := &Service{store: st, open: map[int64]openOrder{}, cfg: Config{Log: slog.Default()}}
	const id = 12345
	v, _ := proto.Marshal(Order{OrderID: strconv.Itoa(id), UserID: 7, Status: StatusPaying})
	s.making = map[int64]struct{}{id: {}}
	if err := st.Put(orderKey(id), v); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(id); proto.AsError(err).Code != proto.CodeNotFound {
		t.Fatalf("Get of an order being made: %v, want 10004", err)
	}
	s.madeOrNot(id)
	if o, err := s.Get(id); err != nil || o.OrderID != strconv.Itoa(id) {
		t.Fatalf("Get once made: %+v %v", o, err)
	}
}
