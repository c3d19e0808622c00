package clientsdk_test

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// events records one client's pushes and state events.
type events struct {
	mu     sync.Mutex
	pushes []clientsdk.Push
	states []clientsdk.StateEvent
}

func (e *events) push(p clientsdk.Push) {
	e.mu.Lock()
	e.pushes = append(e.pushes, p)
	e.mu.Unlock()
}

func (e *events) state(s clientsdk.StateEvent) {
	e.mu.Lock()
	e.states = append(e.states, s)
	e.mu.Unlock()
}

// chats returns the chat pushes of room.
func (e *events) chats(room int64) []clientsdk.Push {
	e.mu.Lock()
	defer e.mu.Unlock()
	var ps []clientsdk.Push
	for _, p := range e.pushes {
		if p.Biz == proto.BizChat && p.Room == room {
			ps = append(ps, p)
		}
	}
	return ps
}

func (e *events) count(s clientsdk.State) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, x := range e.states {
		if x.State == s {
			n++
		}
	}
	return n
}

// clusterNodeConfig is node id of a cluster on redis and nats (PROTOCOL §8).
func clusterNodeConfig(t *testing.T, id string, rds *redistest.Server, nats *natstest.Server) configs.Config {
	c := nodetest.Config(t)
	c.Node.ID = id
	c.Cluster.Enabled = true
	c.NATS.Embedded = false
	c.NATS.URL = nats.URL
	c.Wallet.Mode = "shared"
	c.Wallet.Nodes = []string{"gw-1", "gw-2"}
	c.Redis.Addr = rds.Addr
	return c
}

// Two real nodes sharing one Redis and one NATS. A client with both URLs
// joins a room on one node and receives chats; that node shuts down; chats are
// published through the other node while the client is away; the client
// reconnects to the other node, re-joins with since and gets exactly the
// missed chats, in order, with consecutive offsets, then the new ones.
func TestRealClusterReconnectToOtherNodeRecovers(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	byURL := map[string]*gateway.Node{}
	for _, id := range []string{"gw-1", "gw-2"} {
		n := nodetest.Start(t, clusterNodeConfig(t, id, rds, nats))
		byURL[nodetest.WSURL(n)] = n
	}
	urls := make([]string, 0, 2)
	for u := range byURL {
		urls = append(urls, u)
	}
	slices.Sort(urls)
	any := byURL[urls[0]]
	room := nodetest.OpenRoom(t, any, 1, 1)
	quiet := nodetest.OpenRoom(t, any, 2, 1) // no push before the viewer goes away
	ctx := context.Background()

	// The viewer: both URLs, a token gate that holds its reconnect until
	// the test has published what it must miss.
	var ev events
	gate := make(chan struct{})
	var tokens sync.Map
	calls := 0
	var callsMu sync.Mutex
	viewer, err := clientsdk.Dial(ctx, clientsdk.Config{
		URLs: urls,
		TokenFunc: func(ctx context.Context) (string, error) {
			callsMu.Lock()
			calls++
			n := calls
			callsMu.Unlock()
			if n > 1 {
				select {
				case <-gate:
				case <-ctx.Done():
					return "", ctx.Err()
				}
			}
			if tok, ok := tokens.Load(11); ok {
				return tok.(string), nil
			}
			tok := nodetest.Token(t, any, 11, gateway.RoleViewer)
			tokens.Store(11, tok)
			return tok, nil
		},
		ReconnectMin: 20 * time.Millisecond,
		ReconnectMax: 200 * time.Millisecond,
		OnPush:       ev.push,
		OnState:      ev.state,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = viewer.Close() })
	first := viewer.URL()
	other := urls[0]
	if other == first {
		other = urls[1]
	}
	// The sender stays on the other node.
	sender, err := clientsdk.Dial(ctx, clientsdk.Config{URL: other, Token: nodetest.Token(t, any, 10, gateway.RoleViewer)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sender.Close() })
	j, err := viewer.JoinInfo(ctx, room)
	if err != nil {
		t.Fatal(err)
	}
	if jq, err := viewer.JoinInfo(ctx, quiet); err != nil || jq.Off != 0 || jq.Ep == "" {
		t.Fatalf("join of a room without pushes: %+v, %v", jq, err)
	}
	for _, r := range []int64{room, quiet} {
		if _, err := sender.Join(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	chatIn := func(room int64, from, to int) {
		t.Helper()
		for i := from; i <= to; i++ {
			if _, err := sender.Chat(ctx, room, chatText(i)); err != nil {
				t.Fatalf("chat %d: %v", i, err)
			}
		}
	}
	chat := func(from, to int) { t.Helper(); chatIn(room, from, to) }
	chat(1, 5)
	nodetest.Eventually(t, 10*time.Second, func() bool { return len(ev.chats(room)) == 5 },
		"viewer got %d of 5 chats before the node went away", len(ev.chats(room)))

	// The viewer's node shuts down (close 1001); chats 6..10 go out meanwhile.
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if err := byURL[first].Shutdown(sctx); err != nil {
		t.Logf("shutdown: %v", err)
	}
	cancel()
	nodetest.Eventually(t, 10*time.Second, func() bool { return ev.count(clientsdk.StateDisconnected) == 1 },
		"viewer disconnected")
	chat(6, 10)
	chatIn(quiet, 1, 3)
	close(gate)
	nodetest.Eventually(t, 10*time.Second, func() bool { return ev.count(clientsdk.StateConnected) == 2 },
		"viewer reconnected")
	if viewer.URL() != other {
		t.Fatalf("viewer reconnected to %s, want the other node %s", viewer.URL(), other)
	}
	chat(11, 12)
	nodetest.Eventually(t, 10*time.Second, func() bool { return len(ev.chats(room)) >= 12 },
		"viewer got %d of 12 chats", len(ev.chats(room)))
	if err := viewer.Ping(ctx); err != nil { // anything duplicated would be in by now
		t.Fatal(err)
	}
	ps := ev.chats(room)
	if len(ps) != 12 {
		t.Fatalf("viewer got %d chats, want 12", len(ps))
	}
	ep := ps[0].Ep // a room without pushes yet has no epoch (join reply "ep":"")
	if j.Ep != "" && j.Ep != ep {
		t.Fatalf("join reply ep %q, pushes ep %q", j.Ep, ep)
	}
	for i, p := range ps {
		var d proto.ChatPush
		if err := proto.Unmarshal(p.Data, &d); err != nil {
			t.Fatal(err)
		}
		if d.Text != chatText(i+1) || p.Off != j.Off+int64(i)+1 || p.Ep != ep || p.Ep == "" {
			t.Fatalf("chat %d: text %q off %d ep %q, want %q off %d ep %q", i, d.Text, p.Off, p.Ep,
				chatText(i+1), j.Off+int64(i)+1, ep)
		}
	}
	// The quiet room was re-joined with since {0, its epoch}: the three
	// chats missed are replayed (TestRealClusterRecoverFromBeforeFirstPush).
	ev.mu.Lock()
	var resyncs []clientsdk.StateEvent
	for _, e := range ev.states {
		if e.State == clientsdk.StateRoomResync {
			resyncs = append(resyncs, e)
		}
	}
	ev.mu.Unlock()
	if qs := ev.chats(quiet); len(qs) != 3 || len(resyncs) != 0 {
		t.Fatalf("quiet room: %d chats, resync events %+v; want the 3 missed chats replayed", len(qs), resyncs)
	}
	st := viewer.Stats()
	if st.Duplicates != 0 || st.OffsetDuplicates != 0 || st.Reconnects != 1 {
		t.Fatalf("stats %+v", st)
	}
	if pos, _ := viewer.RoomPosition(room); pos != (proto.Position{Off: j.Off + 12, Ep: ep}) {
		t.Fatalf("position %+v", pos)
	}
}

func chatText(i int) string { return "m" + strconv.Itoa(i) }

// Cluster mode: a client that joined a room before its first push and
// re-joins after pushes 1..N (all still kept) gets them replayed, not a
// resync: the node gives the room its epoch when it first subscribes, so the
// first join's reply already carries it (PROTOCOL §3: recovered:false only
// when the pushes are no longer kept).
func TestRealClusterRecoverFromBeforeFirstPush(t *testing.T) {
	n := nodetest.Start(t, clusterNodeConfig(t, "gw-1", redistest.Start(t), natstest.Start(t)))
	room := nodetest.OpenRoom(t, n, 1, 1)
	ctx := context.Background()
	var ev events
	late, err := clientsdk.Dial(ctx, clientsdk.Config{URL: nodetest.WSURL(n), Token: nodetest.Token(t, n, 11, gateway.RoleViewer), OnPush: ev.push})
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	sender, err := clientsdk.Dial(ctx, clientsdk.Config{URL: nodetest.WSURL(n), Token: nodetest.Token(t, n, 10, gateway.RoleViewer)})
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	j, err := sender.JoinInfo(ctx, room)
	if err != nil || j.Off != 0 || j.Ep == "" {
		t.Fatalf("join of a room without pushes: %+v, %v", j, err)
	}
	for i := 1; i <= 3; i++ {
		if _, err := sender.Chat(ctx, room, chatText(i)); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := late.Request(ctx, proto.TypeJoin, proto.RoomReq{RoomID: room, Since: &proto.Position{Off: 0, Ep: j.Ep}})
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Recovered *bool `json:"recovered"`
	}
	if err := proto.Unmarshal(raw, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Recovered == nil || !*rep.Recovered {
		t.Fatalf("join since {0 %q} with pushes 1..3 kept: reply %s, want recovered:true and the 3 pushes replayed", j.Ep, raw)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool { return len(ev.chats(room)) == 3 }, "3 replayed chats")
}
