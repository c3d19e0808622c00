package limit

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
)

// A shared bound counts a key's open items on every node: two bounds (two
// nodes, each its own client) on one Redis take max items between them; an
// item taken again is not counted twice; a drop (through either node) or an
// item's deadline frees its place; another key has its own; Redis down is
// an error (the caller refuses), never a silent take.
func TestHeldCountsAcrossNodes(t *testing.T) {
	srv := redistest.Start(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	a := NewHeld(srv.Client(t), "test", 3, log)
	b := NewHeld(srv.Client(t), "test", 3, log)
	t.Cleanup(a.Close)
	t.Cleanup(b.Close)
	take := func(h *Held, key uint64, item string, ttl time.Duration) bool {
		t.Helper()
		ok, err := h.Take(key, item, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	taken := 0
	for i, item := range []string{"1", "2", "3", "4", "5", "6"} {
		if take([]*Held{a, b}[i%2], 7, item, time.Minute) {
			taken++
		}
	}
	if taken != 3 {
		t.Fatalf("%d of 6 items taken across two nodes, want 3", taken)
	}
	if !take(b, 7, "1", time.Minute) {
		t.Fatal("an item held already was refused")
	}
	if n, _ := a.Held(7); n != 3 {
		t.Fatalf("held %d, want 3", n)
	}
	if !take(a, 8, "1", time.Minute) {
		t.Fatal("another key is bounded")
	}
	b.Drop(7, "2") // taken through a
	waitHeld(t, a, 7, 2)
	if !take(a, 7, "4", time.Second) {
		t.Fatal("refused after a drop")
	}
	if take(b, 7, "5", time.Minute) {
		t.Fatal("taken past the bound")
	}
	waitHeld(t, a, 7, 2) // "4" passed its deadline
	if !take(b, 7, "5", time.Minute) {
		t.Fatal("refused after an item's deadline")
	}
	// Items open already (a node's start) are kept whatever the bound, an
	// item held already keeping its deadline; drops queued at Close are
	// made before it returns.
	if !a.TryKeep(7, "6", time.Minute) || !a.TryKeep(7, "5", time.Millisecond) {
		t.Fatal("an empty queue refused a keep")
	}
	waitHeld(t, b, 7, 4)
	// Made in their order: a keep after a drop keeps, a drop after a keep
	// drops.
	a.Drop(7, "1")
	a.TryKeep(7, "1", time.Minute)
	for _, item := range []string{"3", "5", "6", "1"} {
		a.Drop(7, item)
		a.TryKeep(7, "x", time.Minute)
		a.Drop(7, "x")
	}
	a.Close()
	if n, err := b.Held(7); n != 0 || err != nil {
		t.Fatalf("held %d (%v) after drops queued before Close, want 0", n, err)
	}
	var off *Held
	if ok, err := off.Take(1, "x", time.Minute); !ok || err != nil {
		t.Fatal("a nil bound refused")
	}
	off.Drop(1, "x")
	srv.Stop()
	if ok, err := b.Take(9, "x", time.Minute); ok || err == nil {
		t.Fatalf("Redis down: taken %v, err %v; want an error", ok, err)
	}
}

func waitHeld(t *testing.T, h *Held, key uint64, want int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		n, err := h.Held(key)
		if err == nil && n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("held %d (%v), want %d", n, err, want)
		}
	}
}

// A Take whose reply was lost (Redis ran it, then looked unreachable for 3 s)
// is a "retry" to the caller, and its place is given back by Check itself,
// once Redis answers again — not left counting until its deadline.
func TestHeldCheckDropsATakeWhoseReplyWasLost(t *testing.T) {
	srv := redistest.Start(t)
	px := redistest.StartProxy(t, srv.Addr)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	h := NewHeld(srv.Client(t), "test", 2, log) // direct: reads
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{px.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	lossy := NewHeld(c, "test", 2, log)
	t.Cleanup(h.Close)
	t.Cleanup(lossy.Close)
	refused := proto.Errorf(proto.CodeRateLimited, "bound")
	// Load the scripts first: a lost EVALSHA of an unloaded script is a
	// NOSCRIPT that ran nothing.
	if err := lossy.Check(5, "warm", time.Minute, refused); err != nil {
		t.Fatal(err)
	}
	lossy.Drop(5, "warm")
	waitHeld(t, h, 5, 0)
	px.LoseReply("EVALSHA", 3*time.Second)
	if err := lossy.Check(5, "a", time.Minute, refused); err == nil || err == refused {
		t.Fatalf("a lost reply answered %v, want a retry", err)
	}
	if px.Fired() != 1 {
		t.Fatal("no reply was lost")
	}
	// The proxy hands the take to Redis as it cuts the client: it lands
	// within moments (and the drop cannot, while Redis looks unreachable).
	for deadline := time.Now().Add(time.Second); ; time.Sleep(5 * time.Millisecond) {
		if n, err := h.Held(5); n == 1 && err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the take whose reply was lost did not reach Redis")
		}
	}
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if n, err := h.Held(5); n == 0 && err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the place of a take whose reply was lost still counts 15 s on")
		}
	}
}

// Batches go as EVALSHA in one round trip each: the script is loaded once
// (Redis answered NOSCRIPT), not before every batch, and again only after
// Redis lost it (SCRIPT FLUSH: the ops are still made, in order).
func TestHeldLoadsItsScriptOnlyWhenRedisLacksIt(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	h := NewHeld(srv.Client(t), "test", 5, slog.New(slog.NewTextHandler(io.Discard, nil)))
	t.Cleanup(h.Close)
	loads := func() int {
		t.Helper()
		info, err := rdb.Do(context.Background(), rdb.B().Info().Section("commandstats").Build()).ToString()
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(info, "\n") {
			if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_script|load:calls="); ok {
				n, _ := strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
				return n
			}
		}
		return 0
	}
	items := []string{"1", "2", "3", "4", "5"}
	for _, item := range items {
		if ok, err := h.Take(7, item, time.Minute); !ok || err != nil {
			t.Fatalf("take %s: %v %v", item, ok, err)
		}
	}
	for i, item := range items { // a batch each
		h.Drop(7, item)
		waitHeld(t, h, 7, len(items)-i-1)
	}
	if n := loads(); n != 1 {
		t.Fatalf("SCRIPT LOAD %d times for %d batches, want once", n, len(items))
	}
	if err := rdb.Do(context.Background(), rdb.B().ScriptFlush().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	h.TryKeep(7, "a", time.Minute)
	h.TryKeep(7, "b", time.Minute)
	h.Drop(7, "a")
	member := func(item string) bool {
		t.Helper()
		err := rdb.Do(context.Background(), rdb.B().Zscore().Key(h.key(7)).Member(item).Build()).Error()
		if err != nil && !rueidis.IsRedisNil(err) {
			t.Fatal(err)
		}
		return err == nil
	}
	for deadline := time.Now().Add(5 * time.Second); member("a") || !member("b"); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after the flush: a held %v, b held %v; want b only (keep a, keep b, drop a, in order)", member("a"), member("b"))
		}
	}
	if n := loads(); n != 2 {
		t.Fatalf("SCRIPT LOAD %d times, want 2 (once more after the flush)", n)
	}
}
