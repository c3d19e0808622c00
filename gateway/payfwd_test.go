package gateway

import (
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router/natstest"
)

// forwardsOn serves serve as le.pay.test on a fresh NATS server through a
// payForwards of workers and queue (and payForwardQueueBytes), and returns
// the client connection.
func forwardsOn(t *testing.T, serve func(payFwdReq) payFwdRep, workers, queue int) (*nats.Conn, *payForwards) {
	return forwardsBytesOn(t, serve, workers, queue, payForwardQueueBytes)
}

func forwardsBytesOn(t *testing.T, serve func(payFwdReq) payFwdRep, workers, queue int, queueBytes int64) (*nats.Conn, *payForwards) {
	t.Helper()
	srv := natstest.Start(t)
	nc, err := nats.Connect(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	f := newPayForwards(serve, slog.New(slog.NewTextHandler(io.Discard, nil)), workers, queue, queueBytes)
	if _, err := nc.Subscribe("le.pay.test", f.arrive); err != nil {
		t.Fatal(err)
	}
	return nc, f
}

// Forwarded requests (le.pay.<node>) through a real NATS server: at most
// max run at once, a bounded queue waits for them, a request beyond it is
// answered "busy" at once, one that waited for a worker past most of its
// budget is dropped unanswered (its caller has given up), and every other is
// answered once the workers are free — none is left behind when the workers
// leave.
func TestPayForwardsQueueBusyAndExpiry(t *testing.T) {
	const workers, queue = 4, 8
	release := make(chan struct{})
	var running, most, served atomic.Int32
	nc, f := forwardsOn(t, func(req payFwdReq) payFwdRep {
		n := running.Add(1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		<-release
		running.Add(-1)
		served.Add(1)
		return payFwdRep{Body: req.Op}
	}, workers, queue)

	ask := func(budget time.Duration) (payFwdRep, error) {
		b, _ := proto.Marshal(payFwdReq{Op: "get", BudgetMS: budget.Milliseconds()})
		m, err := nc.Request("le.pay.test", b, min(budget, 3*time.Second))
		if err != nil {
			return payFwdRep{}, err
		}
		var rep payFwdRep
		err = proto.Unmarshal(m.Data, &rep)
		return rep, err
	}
	// workers take a request each and block; queue more wait; one more is busy.
	var wg sync.WaitGroup
	answers := make(chan payFwdRep, workers+queue)
	for i := 0; i < workers+queue; i++ {
		wg.Add(1)
		budget := 10 * time.Second
		if i >= workers+queue-2 {
			budget = 500 * time.Millisecond // these two wait past their budget
		}
		go func() {
			defer wg.Done()
			if rep, err := ask(budget); err == nil {
				answers <- rep
			}
		}()
		// in order: each arrives before the next is sent
		for deadline := time.Now().Add(2 * time.Second); int(running.Load())+len(f.q) < i+1; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("request %d: %d running, %d queued", i, running.Load(), len(f.q))
			}
		}
	}
	rep, err := ask(10 * time.Second)
	if err != nil || rep.Err == nil || rep.Err.Msg != errForwardBusy.Msg {
		t.Fatalf("a request beyond the queue: %+v, %v; want busy at once", rep, err)
	}
	time.Sleep(600 * time.Millisecond) // the two short budgets run out while queued
	close(release)
	wg.Wait()
	close(answers)
	n := 0
	for rep := range answers {
		if rep.Body != "get" || rep.Err != nil {
			t.Fatalf("answer %+v", rep)
		}
		n++
	}
	if n != workers+queue-2 || served.Load() != int32(workers+queue-2) || most.Load() != workers {
		t.Fatalf("%d answered, %d served, at most %d at once; want %d, %d, %d", n, served.Load(), most.Load(), workers+queue-2, workers+queue-2, workers)
	}
	for deadline := time.Now().Add(2 * time.Second); f.running.Load() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d workers still running with nothing queued", f.running.Load())
		}
	}
	// Workers start again for the next request.
	if rep, err := ask(time.Second); err != nil || rep.Body != "get" {
		t.Fatalf("after the workers left: %+v, %v", rep, err)
	}
}

// Many requests at once through one worker and a queue as large: every one
// is answered — a worker ending while a request arrives never strands it —
// and after stop, what arrives is answered "busy" and nothing runs.
func TestPayForwardsNoneStranded(t *testing.T) {
	var served atomic.Int32
	nc, f := forwardsOn(t, func(req payFwdReq) payFwdRep {
		served.Add(1)
		return payFwdRep{Body: req.Op}
	}, 1, 4096)
	b, _ := proto.Marshal(payFwdReq{Op: "get", BudgetMS: 10_000})
	for round := 0; round < 20; round++ {
		var wg sync.WaitGroup
		var bad atomic.Int32
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				m, err := nc.Request("le.pay.test", b, 2*time.Second)
				var rep payFwdRep
				if err != nil || proto.Unmarshal(m.Data, &rep) != nil || rep.Body != "get" {
					bad.Add(1)
				}
			}()
		}
		wg.Wait()
		if bad.Load() != 0 {
			t.Fatalf("round %d: %d of 50 requests not answered", round, bad.Load())
		}
		if w := f.running.Load(); w < 0 || w > 1 {
			t.Fatalf("%d workers counted", w)
		}
	}
	f.stop()
	before := served.Load()
	m, err := nc.Request("le.pay.test", b, 2*time.Second)
	var rep payFwdRep
	if err != nil || proto.Unmarshal(m.Data, &rep) != nil || rep.Err == nil || rep.Err.Msg != errForwardBusy.Msg || served.Load() != before {
		t.Fatalf("after stop: %+v, %v; served %d → %d", rep, err, before, served.Load())
	}
}

// The queue is bounded in bytes too: with room for many requests but not
// for their bytes, a request that would pass the byte budget is "busy" at
// once while a small one still queues, and the budget is given back as the
// requests are served.
func TestPayForwardsQueueBoundedInBytes(t *testing.T) {
	release := make(chan struct{})
	var started atomic.Int32
	nc, f := forwardsBytesOn(t, func(req payFwdReq) payFwdRep {
		started.Add(1)
		<-release
		return payFwdRep{Body: req.Op}
	}, 1, 64, 48<<10)
	request := func(pad int) []byte {
		b, _ := proto.Marshal(payFwdReq{Op: "notify", Body: make([]byte, pad), BudgetMS: 10_000})
		return b
	}
	var wg sync.WaitGroup
	answers := make(chan payFwdRep, 8)
	send := func(b []byte) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, err := nc.Request("le.pay.test", b, 5*time.Second)
			var rep payFwdRep
			if err == nil && proto.Unmarshal(m.Data, &rep) == nil {
				answers <- rep
			}
		}()
	}
	send(request(10)) // the worker takes it and blocks
	for deadline := time.Now().Add(2 * time.Second); started.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first request did not start")
		}
	}
	big := request(20 << 10) // ~27 KiB as JSON (base64)
	send(big)
	for deadline := time.Now().Add(2 * time.Second); len(f.q) < 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the second request was not queued")
		}
	}
	// A second big one would pass 48 KiB: busy at once, nothing queued.
	m, err := nc.Request("le.pay.test", big, 2*time.Second)
	var rep payFwdRep
	if err != nil || proto.Unmarshal(m.Data, &rep) != nil || rep.Err == nil || rep.Err.Msg != errForwardBusy.Msg {
		t.Fatalf("a request past the byte budget: %+v, %v; want busy", rep, err)
	}
	if got := f.bytes.Load(); got != int64(len(big)) {
		t.Fatalf("queued bytes %d, want %d (the one big request)", got, len(big))
	}
	send(request(10)) // a small one still fits
	for deadline := time.Now().Add(2 * time.Second); len(f.q) < 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the small request was not queued beside the big one")
		}
	}
	close(release)
	wg.Wait()
	close(answers)
	n := 0
	for rep := range answers {
		if rep.Err != nil || rep.Body != "notify" {
			t.Fatalf("answer %+v", rep)
		}
		n++
	}
	if n != 3 || f.bytes.Load() != 0 {
		t.Fatalf("%d answered, %d bytes still counted; want 3 and 0", n, f.bytes.Load())
	}
}
