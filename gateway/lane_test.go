package gateway_test

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// wsEvent is a frame a tcpWS client read: a reply (its id and code), a
// pong, or the server's close frame.
type wsEvent struct {
	what string // "reply", "pong", "close"
	id   int64
	code int
	at   time.Duration
}

// sendText writes one text frame.
func (w *tcpWS) sendText(s string) {
	w.t.Helper()
	if err := w.write(opText, []byte(s)); err != nil {
		w.t.Fatal(err)
	}
}

// events reads frames until stop says the last one is enough (pushes
// skipped), within timeout.
func (w *tcpWS) events(start time.Time, timeout time.Duration, stop func(wsEvent) bool) []wsEvent {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	var out []wsEvent
	for {
		op, p, err := w.read(time.Until(deadline))
		if err != nil {
			w.t.Fatalf("after %v: %v", out, err)
		}
		var e wsEvent
		switch op {
		case opPong:
			e.what = "pong"
		case opClose:
			e.what = "close"
			if len(p) >= 2 {
				e.code = int(binary.BigEndian.Uint16(p))
			}
		case opText:
			var f struct {
				T    string `json:"t"`
				ID   int64  `json:"id"`
				Code int    `json:"code"`
			}
			if err := json.Unmarshal(p, &f); err != nil {
				w.t.Fatalf("frame %q: %v", p, err)
			}
			if f.T != "reply" {
				continue
			}
			e.what, e.id, e.code = "reply", f.ID, f.Code
		default:
			continue
		}
		e.at = time.Since(start)
		out = append(out, e)
		if stop(e) {
			return out
		}
	}
}

// In a cluster a chat waits on Redis (the shared chat count, its number in
// the room): a ping sent behind it gets its pong at once, not once Redis
// answers; the requests behind the chat are answered after it, in the
// order sent; and a close frame behind a chat is answered once the chat is
// served (the chat is posted, as when it was served on the reader). Before,
// the chat was served on the connection's reader, and the pong waited.
func TestPongNotBehindAChatWaitingOnRedis(t *testing.T) {
	_, n2, px := clusterPairViaProxy(t)
	room := nodetest.OpenRoom(t, n2, 1, 0)
	other := dial(t, n2, 200, nodetest.RawOptions{})
	if f := request(t, other, 1, fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)); f.Code != 0 {
		t.Fatalf("join: %+v", f)
	}
	w := dialTCPWS(t, n2, 100)
	w.sendText(fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room))
	// A chat first: the sequencer's script is loaded into Redis (else the
	// held chat's would be held twice, EVALSHA and then EVAL).
	w.sendText(fmt.Sprintf(`{"t":"chat","id":2,"d":{"room_id":%d,"text":"first"}}`, room))
	ev := w.events(time.Now(), 10*time.Second, func(e wsEvent) bool { return e.id == 2 })
	if len(ev) != 2 || ev[0].code != 0 || ev[1].code != 0 {
		t.Fatalf("join and a chat: %+v", ev)
	}

	// The room's sequencer (a Redis script on its key, which numbers the
	// chat) held, within its 2 s timeout.
	const hold = time.Second
	px.Slow("}:seq", hold)
	t.Cleanup(func() { px.Slow("", 0) })
	start := time.Now()
	w.sendText(fmt.Sprintf(`{"t":"chat","id":3,"d":{"room_id":%d,"text":"slow"}}`, room))
	w.sendText(`{"t":"ping","id":4,"d":{}}`)
	if err := w.write(opPing, []byte("p1")); err != nil {
		t.Fatal(err)
	}
	ev = w.events(start, 20*time.Second, func(e wsEvent) bool { return e.id == 4 })
	if len(ev) != 3 || ev[0].what != "pong" || ev[1].id != 3 || ev[2].id != 4 {
		t.Fatalf("events %+v, want the pong, then the chat's reply, then the ping's", ev)
	}
	if ev[1].code != 0 || ev[2].code != 0 {
		t.Fatalf("replies %+v, want both ok", ev)
	}
	if ev[1].at < hold {
		t.Fatalf("the chat answered after %v: Redis was not held (%d writes held)", ev[1].at, px.Slowed())
	}

	start = time.Now()
	w.sendText(fmt.Sprintf(`{"t":"chat","id":5,"d":{"room_id":%d,"text":"then close"}}`, room))
	if err := w.write(opClose, binary.BigEndian.AppendUint16(nil, 1000)); err != nil {
		t.Fatal(err)
	}
	ev = w.events(start, 20*time.Second, func(e wsEvent) bool { return e.what == "close" })
	if last := ev[len(ev)-1]; last.code != 1000 || last.at < hold {
		t.Fatalf("events %+v, want the close echo 1000 once the chat was served", ev)
	}
	// The chat read before the close was served: the other member has it.
	for {
		f := other.NextOfType("push", 10*time.Second)
		if f.T == "" {
			t.Fatal("the chat sent before the close never reached the room")
		}
		if strings.Contains(string(f.D), "then close") {
			break
		}
	}
}

// With a rain's packets in a Redis list a grab waits on Redis (its RPOP)
// where it is served: a ping behind it gets its pong at once, and a request
// sent behind it is served after the grab's Redis part (its reply may come
// first: the grant is durable later).
func TestPongNotBehindAGrabWaitingOnRedis(t *testing.T) {
	px := redistest.StartProxy(t, redistest.Start(t).Addr)
	cfg := rpConfig(t)
	cfg.Redis.Addr = px.Addr
	cfg.RedPacket.Pool = "redis-list"
	n := nodetest.Start(t, cfg)
	room := nodetest.OpenRoom(t, n, 1, 0)
	devCredit(t, n, 1, 100)
	code := startRain(t, n, 1, room, 100, 10, 120)
	w := dialTCPWS(t, n, 100)
	w.sendText(fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room))
	if ev := w.events(time.Now(), 10*time.Second, func(e wsEvent) bool { return e.id == 1 }); ev[len(ev)-1].code != 0 {
		t.Fatalf("join: %+v", ev)
	}
	const hold = time.Second
	px.Slow("RPOP", hold)
	t.Cleanup(func() { px.Slow("", 0) })
	start := time.Now()
	w.sendText(fmt.Sprintf(`{"t":"grab","id":2,"d":{"code":%q}}`, code))
	w.sendText(`{"t":"ping","id":3,"d":{}}`)
	if err := w.write(opPing, []byte("p1")); err != nil {
		t.Fatal(err)
	}
	got := map[int64]wsEvent{}
	ev := w.events(start, 20*time.Second, func(e wsEvent) bool {
		got[e.id] = e
		return len(got) == 3 && got[2].what != "" && got[3].what != ""
	})
	if ev[0].what != "pong" || ev[0].at >= hold {
		t.Fatalf("events %+v, want the pong first, before the grab's Redis answers", ev)
	}
	if got[2].code != 0 || got[3].code != 0 || got[3].at < hold {
		t.Fatalf("events %+v, want the grab granted and the ping answered after the grab's RPOP (%d held)", ev, px.Slowed())
	}
}

// A client that keeps sending while the node holds off reading it — its
// lane full behind a chat waiting on Redis — is not closed 4402 "silent":
// its frames wait unread in the socket, the silence is the node's. Once the
// chat is served the lane drains, and every request is answered. Before,
// the sweep closed it after two heartbeats with nothing read.
func TestNotSilentWhileTheNodeHoldsOffReading(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	px := redistest.StartProxy(t, rds.Addr)
	c := clusterNodeConfig(t, "gw-1", []string{"gw-1"}, rds, nats)
	c.Redis.Addr = px.Addr
	c.WS.Heartbeat = configsDuration(300 * time.Millisecond) // silent after 600 ms with nothing read
	n := nodetest.Start(t, c)
	room := nodetest.OpenRoom(t, n, 1, 0)
	w := dialTCPWS(t, n, 100)
	w.sendText(fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room))
	// A chat first: the sequencer's script is loaded (else the held chat's
	// would be held twice, EVALSHA and then EVAL).
	w.sendText(fmt.Sprintf(`{"t":"chat","id":2,"d":{"room_id":%d,"text":"first"}}`, room))
	if ev := w.events(time.Now(), 10*time.Second, func(e wsEvent) bool { return e.id == 2 }); len(ev) != 2 || ev[1].code != 0 {
		t.Fatalf("join and a chat: %+v", ev)
	}
	const hold = 1500 * time.Millisecond // over two heartbeats, within the sequencer's 2 s timeout
	px.Slow("}:seq", hold)
	t.Cleanup(func() { px.Slow("", 0) })
	start := time.Now()
	pad := strings.Repeat("x", 60<<10)
	w.sendText(fmt.Sprintf(`{"t":"chat","id":3,"d":{"room_id":%d,"text":"slow"}}`, room))
	w.sendText(`{"t":"ping","id":4,"d":{"pad":"` + pad + `"}}`) // the lane: the chat, then ~60 KiB
	w.sendText(`{"t":"ping","id":5,"d":{"pad":"` + pad + `"}}`) // no room: the reader waits for the lane
	stop := make(chan struct{})
	pinged := make(chan struct{})
	go func() { // the client keeps its heartbeat: WebSocket pings, unread meanwhile
		defer close(pinged)
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
				if w.write(opPing, []byte("hb")) != nil {
					return
				}
			}
		}
	}()
	ev := w.events(start, 20*time.Second, func(e wsEvent) bool { return e.id == 5 || e.what == "close" })
	close(stop)
	<-pinged
	for _, e := range ev {
		if e.what == "close" {
			t.Fatalf("closed %d after %v while the node held off reading (events %+v)", e.code, e.at, ev)
		}
	}
	if ev[len(ev)-1].id != 5 || ev[len(ev)-1].at < hold {
		t.Fatalf("events %+v, want the replies up to id 5 once the chat was served", ev)
	}
	w.sendText(`{"t":"ping","id":6,"d":{}}`)
	if ev := w.events(time.Now(), 5*time.Second, func(e wsEvent) bool { return e.id == 6 || e.what == "close" }); ev[len(ev)-1].id != 6 {
		t.Fatalf("after the wait: %+v, want the connection still served", ev)
	}
}
