package gateway_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// chatNodes starts gw-1, reaching Redis through a fault proxy, and gw-2,
// reaching it directly, their chat claims in flight lasting ttl; opens a
// room that user 10 joins on both nodes (a on gw-1, b on gw-2) and user 11
// on gw-2 (got records its pushes); and sends a chat through gw-1 (its
// sequence script loaded, the room busy there).
func chatNodes(t *testing.T, ttl time.Duration) (n1 *gateway.Node, px *redistest.Proxy, room int64, a, b *clientsdk.Client, got *pushLog) {
	t.Helper()
	rds, nats := redistest.Start(t), natstest.Start(t)
	px = redistest.StartProxy(t, rds.Addr)
	peers := []string{"gw-1", "gw-2"}
	c1 := clusterNodeConfig(t, "gw-1", peers, rds, nats)
	c1.Redis.Addr = px.Addr
	n1 = nodetest.Start(t, c1)
	n2 := nodetest.Start(t, clusterNodeConfig(t, "gw-2", peers, rds, nats))
	n1.WS.ShortenChatClaims(ttl)
	n2.WS.ShortenChatClaims(ttl)
	room = nodetest.OpenRoom(t, n2, 1, 3)
	got = &pushLog{}
	a, b = sdkDial(t, n1, 10, nil, nil), sdkDial(t, n2, 10, nil, nil)
	receiver := sdkDial(t, n2, 11, got, nil)
	ctx := context.Background()
	for _, c := range []*clientsdk.Client{a, b, receiver} {
		if _, err := c.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Chat(ctx, room, "warm"); err != nil {
		t.Fatal(err)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool { return len(chatsOf(t, got)) == 1 }, "the first chat not received")
	return n1, px, room, a, b, got
}

// roomChat is a chat push received: its mid and text.
type roomChat struct{ mid, text string }

func chatsOf(t *testing.T, got *pushLog) []roomChat {
	t.Helper()
	var out []roomChat
	for _, p := range got.snapshot() {
		if p.Biz != proto.BizChat {
			continue
		}
		var d proto.ChatPush
		if err := proto.Unmarshal(p.Data, &d); err != nil {
			t.Fatal(err)
		}
		out = append(out, roomChat{p.Mid, d.Text})
	}
	return out
}

// chatUntil sends the chat through c until it is answered something other
// than 10409 (its req_id in flight).
func chatUntil(t *testing.T, c *clientsdk.Client, room int64, text, req string) (string, error) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		mid, err := c.ChatOnce(ctx, room, text, req)
		cancel()
		if e := proto.AsError(err); e == nil || e.Code != proto.CodeConflict || time.Now().After(deadline) {
			return mid, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// settled sends a chat through a (gw-1) behind whatever its sequencer still
// holds and waits until it is received: the room's pushes before it are then
// all in.
func settled(t *testing.T, a *clientsdk.Client, room int64, got *pushLog) []roomChat {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _ = a.Chat(ctx, room, "after") // may be answered "not confirmed": it still goes out
	nodetest.Eventually(t, 15*time.Second, func() bool {
		return slices.ContainsFunc(chatsOf(t, got), func(c roomChat) bool { return c.text == "after" })
	}, "the last chat not received: %v", chatsOf(t, got))
	return chatsOf(t, got)
}

// A chat with a req_id whose sequencer batch is retried (Redis slow for the
// room's counter on its node) past its claim's TTL is never numbered once a
// retry may claim the req_id anew: Redis refuses its batch after half the
// claim's TTL (by its own clock, so an attempt held on the way is refused
// too), and the retry through the other node posts the chat once. Before,
// the batch was retried until Redis answered: the held attempt numbered the
// first chat after the retry had claimed the req_id — posted twice.
func TestChatReqIDNotPostedOnceItsClaimMayLapse(t *testing.T) {
	const ttl = 3 * time.Second // numbered within 1.5 s or never
	_, px, room, a, b, got := chatNodes(t, ttl)
	px.Slow(fmt.Sprintf("le:r:{%d}:seq", room), 2500*time.Millisecond) // each attempt reaches Redis 2.5 s late
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := a.ChatOnce(ctx, room, "once", "r1"); proto.AsError(err) == nil || proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("the chat through gw-1: %v, want 50000 not confirmed", err)
	}
	mid, err := chatUntil(t, b, room, "once", "r1") // 10409 until the claim lapses
	if err != nil {
		t.Fatalf("the retry through gw-2: %v", err)
	}
	px.Slow("", 0)
	chats := settled(t, a, room, got)
	want := []roomChat{chats[0], {mid, "once"}, {chats[len(chats)-1].mid, "after"}}
	if !slices.Equal(chats, want) {
		t.Fatalf("room chats %v, want %v: the req_id's chat once", chats, want)
	}
	if m, err := a.ChatOnce(ctx, room, "once", "r1"); err != nil || m != mid {
		t.Fatalf("another retry through gw-1: %q %v, want %q", m, err, mid)
	}
}

// A chat with a req_id answered "not confirmed" whose batch is numbered
// later, while its claim holds, keeps its mid for the req_id: a retry after
// the claim's TTL answers it and posts nothing. Before, the claim stayed
// "in flight" until it lapsed, and the retry then posted the chat again.
func TestChatReqIDNumberedLateKeepsItsMid(t *testing.T) {
	const ttl = 8 * time.Second // numbered within 4 s or never
	_, px, room, a, b, got := chatNodes(t, ttl)
	px.Slow(fmt.Sprintf("le:r:{%d}:seq", room), 2500*time.Millisecond) // past the 2 s call timeout
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := a.ChatOnce(ctx, room, "late", "r2"); proto.AsError(err) == nil || proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("the chat through gw-1: %v, want 50000 not confirmed", err)
	}
	var first string
	nodetest.Eventually(t, 10*time.Second, func() bool {
		for _, c := range chatsOf(t, got) {
			if c.text == "late" {
				first = c.mid
			}
		}
		return first != ""
	}, "the chat never went out")
	px.Slow("", 0)
	time.Sleep(time.Until(start.Add(ttl + 200*time.Millisecond))) // the claim would have lapsed
	if m, err := chatUntil(t, b, room, "late", "r2"); err != nil || m != first {
		t.Fatalf("the retry through gw-2 after the claim's TTL: %q %v, want the first mid %q", m, err, first)
	}
	chats := settled(t, a, room, got)
	want := []roomChat{chats[0], {first, "late"}, {chats[len(chats)-1].mid, "after"}}
	if !slices.Equal(chats, want) {
		t.Fatalf("room chats %v, want %v: the req_id's chat once", chats, want)
	}
}

// A chat with a req_id given up before its room's sequencer took it (queued
// behind a batch Redis is slow to number, past its wait) was never sent: it
// is answered "retry" and its claim released, so a retry through another
// node posts it at once — once. Before, it was answered "may still be sent"
// and its req_id held (10409) until the claim lapsed.
func TestChatReqIDNeverQueuedReleasesItsClaim(t *testing.T) {
	const ttl = time.Minute
	n1, px, room, a, b, got := chatNodes(t, ttl)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := sdkDial(t, n1, 12, nil, nil) // the blocker's sender (a's reader is held with its chat)
	if _, err := c.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	// The chat is held right after its claim (Redis answering at once)
	// until the room's sequencer is stuck on a blocker's batch, Redis slow
	// for it; and once its wait ended, until Redis is fast again for its
	// claim's release.
	blocked := make(chan error, 1)
	n1.WS.PauseChat("r3", func() {
		px.Slow(fmt.Sprintf("le:r:{%d}:seq", room), 2500*time.Millisecond) // past the 2 s call timeout
		go func() {
			_, err := c.Chat(ctx, room, "blocker")
			blocked <- err
		}()
		// Answered once its batch, taken, timed out: the sequencer
		// retries it meanwhile.
		if err := <-blocked; proto.AsError(err) == nil || proto.AsError(err).Code != proto.CodeInternal {
			t.Errorf("the blocker: %v, want 50000 not confirmed", err)
		}
	}, func() { px.Slow("", 0) })
	_, err := a.ChatOnce(ctx, room, "once", "r3") // queued behind the blocker's retries: given up
	if e := proto.AsError(err); e == nil || e.Code != proto.CodeInternal || e.Msg != "temporarily unavailable, retry" {
		t.Fatalf("the chat through gw-1: %v, want 50000 temporarily unavailable (never sent)", err)
	}
	mid, err := b.ChatOnce(ctx, room, "once", "r3")
	if err != nil {
		t.Fatalf("the retry through gw-2 at once: %v, want it sent (its claim released)", err)
	}
	chats := settled(t, a, room, got)
	var once, blockers []string
	for _, c := range chats {
		switch c.text {
		case "once":
			once = append(once, c.mid)
		case "blocker":
			blockers = append(blockers, c.mid)
		}
	}
	if !slices.Equal(once, []string{mid}) || len(blockers) != 1 {
		t.Fatalf("room chats %v: want the req_id's chat once (%q) and the blocker once", chats, mid)
	}
}
