package gateway_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// A chat sent again with its req_id is posted once: the retry (through
// another connection of the same user, as after a reconnect) answers the
// first mid and the room gets one push; 16 concurrent sends of one req_id
// through 4 connections post once (the others answer its mid or 10409 "still
// being sent"); another
// user's same req_id, or another req_id, is another chat; a chat refused
// (not in the room) leaves no trace, so its retry after joining is sent; a
// req_id over 64 bytes is 10001.
func TestChatReqIDPostsOnce(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 1, 3)
	var got pushLog
	ctx := context.Background()
	sender := sdkDial(t, n, 10, nil, nil)
	again := sdkDial(t, n, 10, nil, nil) // the same user, another connection
	other := sdkDial(t, n, 12, nil, nil)
	receiver := sdkDial(t, n, 11, &got, nil)
	for _, c := range []*clientsdk.Client{sender, again, other, receiver} {
		if _, err := c.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	mid, err := sender.ChatOnce(ctx, room, "hello", "r1")
	if err != nil {
		t.Fatal(err)
	}
	if m, err := again.ChatOnce(ctx, room, "hello", "r1"); err != nil || m != mid {
		t.Fatalf("the retry: %q %v, want the first mid %q", m, err, mid)
	}
	// 16 sends of one req_id at once through 4 connections of the user (one
	// connection handles its chats in turn).
	conns := []*clientsdk.Client{sender, again, sdkDial(t, n, 10, nil, nil), sdkDial(t, n, 10, nil, nil)}
	for _, c := range conns[2:] {
		if _, err := c.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	mids := make([]string, 16)
	errs := make([]error, 16)
	for i := range mids {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			mids[i], errs[i] = conns[i%len(conns)].ChatOnce(ctx, room, "storm", "r2")
		}(i)
	}
	wg.Wait()
	stormMid := ""
	for i := range mids {
		switch e := proto.AsError(errs[i]); {
		case errs[i] == nil && (stormMid == "" || mids[i] == stormMid):
			stormMid = mids[i]
		case e != nil && e.Code == proto.CodeConflict:
		default:
			t.Fatalf("concurrent send %d: %q %v", i, mids[i], errs[i])
		}
	}
	if m, err := other.ChatOnce(ctx, room, "mine", "r1"); err != nil || m == mid {
		t.Fatalf("another user's r1: %q %v", m, err)
	}
	if m, err := sender.ChatOnce(ctx, room, "next", "r3"); err != nil || m == mid {
		t.Fatalf("another req_id: %q %v", m, err)
	}
	if _, err := sender.ChatOnce(ctx, room, "x", strings.Repeat("r", proto.MaxChatReqID+1)); proto.AsError(err) == nil || proto.AsError(err).Code != proto.CodeBadRequest {
		t.Fatalf("a long req_id: %v", err)
	}
	late := sdkDial(t, n, 13, nil, nil)
	if _, err := late.ChatOnce(ctx, room, "before joining", "r4"); proto.AsError(err) == nil || proto.AsError(err).Code != proto.CodeForbidden {
		t.Fatalf("not in the room: %v", err)
	}
	if _, err := late.Join(ctx, room); err != nil {
		t.Fatal(err)
	}
	if _, err := late.ChatOnce(ctx, room, "before joining", "r4"); err != nil {
		t.Fatalf("the refused chat's retry: %v", err)
	}
	// The room got: hello, storm, mine, next, before joining — once each.
	want := []string{"hello", "storm", "mine", "next", "before joining"}
	nodetest.Eventually(t, 5*time.Second, func() bool { return len(got.snapshot()) >= len(want) },
		"receiver got %d of %d chats", len(got.snapshot()), len(want))
	time.Sleep(200 * time.Millisecond) // a duplicate would arrive meanwhile
	items := got.snapshot()
	var texts []string
	for _, p := range items {
		var d proto.ChatPush
		if err := proto.Unmarshal(p.Data, &d); err != nil {
			t.Fatal(err)
		}
		texts = append(texts, d.Text)
	}
	if strings.Join(texts, "|") != strings.Join(want, "|") {
		t.Fatalf("room pushes %q, want %q", texts, want)
	}
	if items[0].Mid != mid || items[1].Mid != stormMid {
		t.Fatalf("mids %s %s, want %s %s", items[0].Mid, items[1].Mid, mid, stormMid)
	}
}
