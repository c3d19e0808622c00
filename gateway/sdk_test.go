package gateway_test

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// pushLog collects pushes surfaced by an SDK client.
type pushLog struct {
	mu    sync.Mutex
	items []clientsdk.Push
}

func (p *pushLog) add(x clientsdk.Push) {
	p.mu.Lock()
	p.items = append(p.items, x)
	p.mu.Unlock()
}

func (p *pushLog) snapshot() []clientsdk.Push {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]clientsdk.Push(nil), p.items...)
}

func sdkDial(t *testing.T, n *gateway.Node, user int64, log *pushLog, mod func(*clientsdk.Config)) *clientsdk.Client {
	t.Helper()
	cfg := clientsdk.Config{URL: nodetest.WSURL(n), Token: nodetest.Token(t, n, user, gateway.RoleViewer)}
	if log != nil {
		cfg.OnPush = log.add
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := clientsdk.Dial(ctx, cfg)
	if err != nil {
		t.Fatalf("sdk dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Two SDK clients join room R; 1,000 chats from one arrive at the other
// complete and in order.
func TestChatThousandInOrder(t *testing.T) {
	for _, batch := range []bool{true, false} {
		t.Run("batch="+strconv.FormatBool(batch), func(t *testing.T) {
			n := nodetest.Start(t, nodetest.Config(t))
			room := nodetest.OpenRoom(t, n, 1, 3)
			var got pushLog
			sender := sdkDial(t, n, 10, nil, func(c *clientsdk.Config) { c.NoBatch = !batch })
			receiver := sdkDial(t, n, 11, &got, func(c *clientsdk.Config) { c.NoBatch = !batch })
			ctx := context.Background()
			for _, c := range []*clientsdk.Client{sender, receiver} {
				if _, err := c.Join(ctx, room); err != nil {
					t.Fatal(err)
				}
			}
			const chats = 1000
			mids := make([]string, chats)
			for i := 0; i < chats; i++ {
				mid, err := sender.Chat(ctx, room, strconv.Itoa(i))
				if err != nil {
					t.Fatalf("chat %d: %v", i, err)
				}
				mids[i] = mid
			}
			nodetest.Eventually(t, 10*time.Second, func() bool { return len(got.snapshot()) >= chats },
				"receiver got %d of %d chats", len(got.snapshot()), chats)
			items := got.snapshot()
			if len(items) != chats {
				t.Fatalf("receiver got %d pushes, want %d", len(items), chats)
			}
			for i, p := range items {
				var d proto.ChatPush
				if err := proto.Unmarshal(p.Data, &d); err != nil {
					t.Fatal(err)
				}
				if p.Biz != proto.BizChat || p.Room != room || d.From != 10 || d.Text != strconv.Itoa(i) || p.Mid != mids[i] {
					t.Fatalf("push %d: %+v %+v", i, p, d)
				}
			}
		})
	}
}

// The SDK acks reliable pushes by itself, de-duplicates by mid and surfaces
// each push once; an acked push is not resent by the server.
func TestSDKSurfacesReliablePushOnce(t *testing.T) {
	cfg := nodetest.Config(t)
	// Long enough that the client's ack (sent as the frame is read) is in
	// before a resend under -race on a busy machine: a resend before the
	// ack is the protocol working, not the bug this test looks for.
	const resendAfter = time.Second
	cfg.WS.ResendAfter = configsDuration(resendAfter)
	n := nodetest.Start(t, cfg)
	var got pushLog
	c := sdkDial(t, n, 77, &got, nil)
	// The hello is sent before the connection is registered with the
	// router; a request's reply comes after (OnOpen ends first).
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}

	mid, reached := n.Router.SendUser(77, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":5,"delta":5,"reason":"dev"}`), Ack: true})
	if reached != 1 {
		t.Fatalf("reached %d", reached)
	}
	// The same push delivered again (as after a lost ack) is not surfaced twice.
	n.Router.SendUser(77, proto.Push{Mid: mid, Biz: proto.BizWalletCredit, Data: []byte(`{"balance":5,"delta":5,"reason":"dev"}`), Ack: true})
	nodetest.Eventually(t, 5*time.Second, func() bool { return c.Stats().Duplicates >= 1 }, "duplicate not seen")
	time.Sleep(3 * resendAfter) // several resend periods: nothing may be resent after the ack
	items := got.snapshot()
	if len(items) != 1 || items[0].Mid != mid || !items[0].Ack {
		t.Fatalf("surfaced %d pushes: %+v", len(items), items)
	}
	if st := c.Stats(); st.PushesReceived != 2 {
		t.Fatalf("server resent an acked push: received %d frames for one push sent twice", st.PushesReceived)
	}
}
