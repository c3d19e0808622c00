package gateway_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

func dial(t *testing.T, n *gateway.Node, user int64, o nodetest.RawOptions) *nodetest.Raw {
	t.Helper()
	r := nodetest.MustDialRaw(t, nodetest.WSURL(n), nodetest.Token(t, n, user, gateway.RoleViewer), o)
	if h := r.Next(5 * time.Second); h.T != proto.TypeHello {
		t.Fatalf("first frame %q, want hello", h.T)
	}
	return r
}

// request sends a frame and returns the reply with that id (pushes skipped).
func request(t *testing.T, r *nodetest.Raw, id int64, frame string) proto.ServerFrame {
	t.Helper()
	if err := r.Send(frame); err != nil {
		t.Fatalf("send: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		f := r.Next(time.Until(deadline))
		if f.T == proto.TypeReply && f.ID == id {
			return f
		}
	}
	t.Fatalf("no reply to id %d", id)
	return proto.ServerFrame{}
}

func TestUpgradeRefusedWithoutValidToken(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	for name, tok := range map[string]string{"none": "", "garbage": "x.y.z", "other secret": otherSecretToken(t)} {
		_, resp, err := nodetest.DialRaw(t, nodetest.WSURL(n), tok, nodetest.RawOptions{})
		if err == nil {
			t.Fatalf("%s: upgrade accepted", name)
		}
		if resp == nil || resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s: want 401, got %v (%v)", name, resp, err)
		}
	}
	// The same through the HTTP API.
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n)+"/api/v1/rooms", "", "", nil); st != 401 {
		t.Fatalf("API without token: %d", st)
	}
}

func otherSecretToken(t *testing.T) string {
	tok, err := gateway.NewAuth("another-secret-of-16+bytes").Issue(1, gateway.RoleViewer, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Bad JSON, unknown type, missing field, oversized and binary frames each get
// a 10001 reply; the connection and the node keep working.
func TestBadFramesGet10001AndConnectionSurvives(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 1, 0)
	r := dial(t, n, 100, nodetest.RawOptions{})

	bad := []string{
		`{not json`,
		`{"t":"dance","id":5,"d":{}}`,
		`{"t":"join","id":6,"d":{}}`,
		`{"t":"chat","id":7,"d":{"room_id":` + strconv.FormatInt(room, 10) + `}}`,
		`{"t":"join","id":8,"d":{"room_id":"seven"}}`,
		`{"t":"chat","id":9,"d":{"room_id":1,"text":"` + strings.Repeat("x", 65<<10) + `"}}`,
		`{"t":"chat","id":10,"d":{"room_id":1,"text":"` + strings.Repeat("x", 200<<10) + `"}}`,
	}
	for i, b := range bad {
		if err := r.Send(b); err != nil {
			t.Fatal(err)
		}
		f := r.NextOfType(proto.TypeReply, 5*time.Second)
		if f.Code != proto.CodeBadRequest {
			t.Fatalf("bad frame %d: code %d msg %q, want 10001", i, f.Code, f.Msg)
		}
	}
	if err := r.SendBinary([]byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if f := r.NextOfType(proto.TypeReply, 5*time.Second); f.Code != proto.CodeBadRequest {
		t.Fatalf("binary frame: code %d", f.Code)
	}
	// Still usable.
	if f := request(t, r, 11, `{"t":"ping","id":11,"d":{}}`); f.Code != 0 {
		t.Fatalf("ping after bad frames: %+v", f)
	}
	if f := request(t, r, 12, fmt.Sprintf(`{"t":"join","id":12,"d":{"room_id":%d}}`, room)); f.Code != 0 {
		t.Fatalf("join after bad frames: %+v", f)
	}
	// Unknown / closed room → 10004; chat outside a joined room → 10003.
	if f := request(t, r, 13, `{"t":"join","id":13,"d":{"room_id":999999}}`); f.Code != proto.CodeNotFound {
		t.Fatalf("join unknown room: %+v", f)
	}
	if f := request(t, r, 14, `{"t":"chat","id":14,"d":{"room_id":999999,"text":"hi"}}`); f.Code != proto.CodeForbidden {
		t.Fatalf("chat outside room: %+v", f)
	}
	// Another client is unaffected.
	r2 := dial(t, n, 101, nodetest.RawOptions{})
	if f := request(t, r2, 1, `{"t":"ping","id":1,"d":{}}`); f.Code != 0 {
		t.Fatalf("second client ping: %+v", f)
	}
}

func TestRepeatedAbuseClosesWith4400(t *testing.T) {
	// Not JSON, and JSON without `t` (docs/protocol.md: unparsable too;
	// it was answered 10001 without counting).
	for _, garbage := range []string{`garbage`, `{}`, `{"id":1}`, `{"t":"","id":2}`} {
		repeatedAbuseClosesWith4400(t, garbage)
	}
}

func repeatedAbuseClosesWith4400(t *testing.T, garbage string) {
	cfg := nodetest.Config(t)
	cfg.WS.AbuseLimit = 5
	n := nodetest.Start(t, cfg)
	r := dial(t, n, 100, nodetest.RawOptions{})
	for i := 0; i < 20; i++ {
		if err := r.Send(garbage); err != nil {
			break
		}
	}
	select {
	case <-r.Closed():
	case <-time.After(5 * time.Second):
		t.Fatalf("not closed after repeated %s", garbage)
	}
	if c := r.CloseCode(); c != proto.CloseAbuse {
		t.Fatalf("%s: close code %d, want 4400", garbage, c)
	}
	// The node still serves others.
	r2 := dial(t, n, 101, nodetest.RawOptions{})
	if f := request(t, r2, 1, `{"t":"ping","id":1,"d":{}}`); f.Code != 0 {
		t.Fatalf("ping: %+v", f)
	}
}

func TestSilentConnectionClosedAfterTwoHeartbeats(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.Heartbeat = configsDuration(200 * time.Millisecond)
	n := nodetest.Start(t, cfg)
	r := dial(t, n, 100, nodetest.RawOptions{})
	select {
	case <-r.Closed():
	case <-time.After(5 * time.Second):
		t.Fatal("silent connection not closed")
	}
	if c := r.CloseCode(); c != proto.CloseHeartbeatTimeout {
		t.Fatalf("close code %d, want 4402", c)
	}
}

// A client that stops reading in a 200-client room (50 under -race) is closed
// with 4408 while the others still get every push, in order, within 1 s.
func TestSlowConsumerClosedRoomUnaffected(t *testing.T) {
	viewers := 200
	if raceEnabled {
		// The fast clients live in this process: under the race detector
		// 199 of them decoding 500 pushes/s each take both cores by
		// themselves and fall up to seconds behind (0.4–0.55 s on an idle
		// 2-core VM, more after other packages' tests) — past their own
		// 64 KiB queue, so the node rightly cut them off too (CI saw
		// "slow consumer closes = 3" and a fast client stalled). The race
		// run is for data races in the same code paths; 50 viewers keep the
		// clients' CPU at a quarter. `make test` runs this test again
		// without -race with the 200 viewers and the 1-s latency bound.
		viewers = 50
	}
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 64 << 10
	cfg.WS.SocketSendBuffer = 16 << 10
	n := nodetest.Start(t, cfg)
	room := nodetest.OpenRoom(t, n, 1, 0)

	clients := make([]*nodetest.Raw, viewers)
	for i := range clients {
		o := nodetest.RawOptions{Batch: i%2 == 0, Buf: 4096}
		if i == 0 {
			o.RcvBuf = 4 << 10
		}
		clients[i] = dial(t, n, int64(1000+i), o)
		if f := request(t, clients[i], 1, fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)); f.Code != 0 {
			t.Fatalf("join %d: %+v", i, f)
		}
	}
	slow := clients[0]
	slow.Pause()

	// Every other client checks that each push arrives, in order, within 1 s
	// of its publication — plus any pause of the whole test process (the
	// -race runtime or the VM can stop every goroutine for a second), which
	// a hiccup meter measures: a goroutine that should wake every 5 ms
	// records how late it wakes. A stall caused by the node (a blocked
	// room, not a stopped process) does not stop the meter, so it still fails.
	const pushes = 600
	var wg sync.WaitGroup
	errs := make(chan error, viewers)
	var worst, hiccup atomic.Int64 // ns
	meterStop := make(chan struct{})
	meterDone := make(chan struct{})
	go func() {
		defer close(meterDone)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		last := time.Now()
		for {
			select {
			case <-meterStop:
				return
			case <-tick.C:
				now := time.Now()
				if gap := now.Sub(last) - 5*time.Millisecond; gap > time.Duration(hiccup.Load()) {
					hiccup.Store(int64(gap))
				}
				last = now
			}
		}
	}()
	for _, c := range clients[1:] {
		wg.Add(1)
		go func(c *nodetest.Raw) {
			defer wg.Done()
			next := 0
			for next < pushes {
				select {
				case f := <-c.Frames():
					if f.T != proto.TypePush {
						continue
					}
					// The test's own decoding must not be the bottleneck (the
					// readers × 500 pushes/s, under -race too): scan the two numbers.
					seq, ok1 := jsonInt(f.D, `"seq":`)
					at, ok2 := jsonInt(f.D, `"at":`)
					if !ok1 || !ok2 {
						errs <- fmt.Errorf("bad push %s", f.D)
						return
					}
					if int(seq) != next {
						errs <- fmt.Errorf("got push %d, want %d", seq, next)
						return
					}
					if lat := int64(time.Since(time.Unix(0, at))); lat > worst.Load() {
						worst.Store(lat) // racy max, fine: checked against 1 s below
					}
					next++
				case <-time.After(5 * time.Second):
					errs <- fmt.Errorf("stalled after %d pushes", next)
					return
				}
			}
		}(c)
	}
	// A busy live room: ~500 pushes/s of ~450 bytes. The slow client's
	// kernel buffers (its 4 KiB receive buffer, the server's 16 KiB send
	// buffer) plus its 64 KiB queue overflow after ~230 pushes.
	// The slow client reads again as soon as it is cut off, as a real one
	// whose stall ended would: resumed only after the whole publish loop, on
	// a loaded machine it stayed silent past the node's write timeout, and
	// the node rightly dropped the socket without the close frame (-1).
	cutOff := make(chan struct{})
	go func() {
		defer close(cutOff)
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if v, err := metricValueErr(n, "liveedge_slow_consumer_closes_total"); err == nil && v == 1 {
				slow.Resume()
				return
			}
		}
	}()
	pad := strings.Repeat("p", 400)
	for i := 0; i < pushes; i++ {
		d := fmt.Sprintf(`{"seq":%d,"at":%d,"pad":"%s"}`, i, time.Now().UnixNano(), pad)
		if _, err := n.Router.PublishRoom(room, proto.Push{Biz: proto.BizChat, Data: []byte(d)}); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	// The node cut the slow client off (4408) while the room went on; once the
	// client reads again it finds the close frame after what the kernel had
	// buffered.
	<-cutOff
	if v := metricValue(t, n, "liveedge_slow_consumer_closes_total"); v != 1 {
		t.Fatalf("slow consumer closes = %v, want 1", v)
	}
	wg.Wait()
	close(meterStop)
	<-meterDone
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	w, h := time.Duration(worst.Load()), time.Duration(hiccup.Load())
	t.Logf("slowest push %v; longest process pause %v", w, h)
	switch {
	case raceEnabled:
		// Under the race detector the in-process clients' decoding takes
		// much of the CPU (199 of them left pushes 0.4–2 s late on a 2-core
		// VM, with or without a slow client; hence 50 here): the bound says
		// nothing about the node there. `make test` runs this test again
		// without -race and with 200 viewers, where it is checked.
		t.Logf("race detector on: latency bound not checked in this run")
	case w > time.Second+h:
		t.Errorf("a push took %v (process pauses: up to %v)", w, h)
	}
	for {
		select {
		case <-slow.Frames():
			continue
		case <-slow.Closed():
		case <-time.After(10 * time.Second):
			t.Fatal("slow client was not closed")
		}
		break
	}
	if c := slow.CloseCode(); c != proto.CloseSlowConsumer {
		t.Fatalf("slow client close code %d, want 4408", c)
	}
}

// A client that stopped reading holds at most ws.send_queue_bytes of unsent
// pushes on the node: the batch its writer is blocked on counts with the
// queue behind it (before, the queue started from zero once the writer took
// a batch, so such a client held the batch and a full queue beside it).
func TestSendQueueBoundCountsTheBatchBeingWritten(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 256 << 10
	cfg.WS.SocketSendBuffer = 16 << 10
	n := nodetest.Start(t, cfg)
	const user = 77
	c := dial(t, n, user, nodetest.RawOptions{RcvBuf: 4 << 10, Buf: 4096})
	c.Pause()
	push := func(kib int) int {
		d := `{"pad":"` + strings.Repeat("p", kib<<10) + `"}`
		_, reached := n.Router.SendUser(user, proto.Push{Biz: proto.BizChat, Data: []byte(d)})
		return reached
	}
	// The client's reader, waiting in a read when paused, takes the first
	// push and stops; the second, more than the socket's buffers, blocks
	// the node's writer.
	_ = push(0)
	if push(100) != 1 {
		t.Fatal("the first push was refused")
	}
	for deadline := time.Now().Add(5 * time.Second); !n.WS.WriterTook(user); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the writer did not take the first push")
		}
	}
	if reached := push(200); reached != 0 { // 100 + 200 KiB unsent > 256 KiB: a slow consumer
		t.Errorf("the push past the bound reached %d sessions", reached)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if v := metricValue(t, n, "liveedge_slow_consumer_closes_total"); v == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("300 KiB unsent to a client that stopped reading, bound 256 KiB: not closed 4408")
		}
	}
	c.Resume()
	for {
		select {
		case <-c.Frames():
			continue
		case <-c.Closed():
		case <-time.After(10 * time.Second):
			t.Fatal("not closed")
		}
		break
	}
	if code := c.CloseCode(); code != proto.CloseSlowConsumer {
		t.Fatalf("close code %d, want 4408", code)
	}
}

func configsDuration(d time.Duration) configs.Duration { return configs.Duration(d) }

// metricValue reads one metric of n from /metrics: the first series of name
// whose labels include every one of labels (each written `key="value"`).
func metricValue(t *testing.T, n *gateway.Node, name string, labels ...string) float64 {
	t.Helper()
	v, err := metricValueErr(n, name, labels...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// metricValueErr is metricValue for goroutines other than the test's.
func metricValueErr(n *gateway.Node, name string, labels ...string) (float64, error) {
	resp, err := http.Get(nodetest.HTTPURL(n) + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if (strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ")) &&
			!slices.ContainsFunc(labels, func(l string) bool { return !strings.Contains(line, l) }) {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			return v, nil
		}
	}
	return 0, nil
}

// jsonInt reads the integer after key in a flat JSON object.
func jsonInt(b []byte, key string) (int64, bool) {
	i := bytes.Index(b, []byte(key))
	if i < 0 {
		return 0, false
	}
	j := i + len(key)
	k := j
	for k < len(b) && (b[k] == '-' || (b[k] >= '0' && b[k] <= '9')) {
		k++
	}
	v, err := strconv.ParseInt(string(b[j:k]), 10, 64)
	return v, err == nil
}

// A frame read after the node decided to close its connection is not served:
// at its token's expiry the node closes a connection with 4501 after what
// is queued for it (a drain), and while the writer waits on a client that
// stopped reading, the chat that client sends is not posted — its reply
// could not be queued any more, so it went out unanswered (an app's retry
// of it: posted twice; a gift: debited under an expired token). The same
// holds for 4408 and a shutdown's drain.
func TestNoFrameServedAfterTheCloseIsDecided(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.SendQueueBytes = 64 << 10
	cfg.WS.SocketSendBuffer = 16 << 10
	cfg.WS.WriteTimeout = configsDuration(10 * time.Second) // the drain waits on the stalled client
	n := nodetest.Start(t, cfg)
	room := nodetest.OpenRoom(t, n, 1, 0)
	join := fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)
	tok, expires := shortToken(t, n, 2001, 2*time.Second)
	victim := nodetest.MustDialRaw(t, nodetest.WSURL(n), tok, nodetest.RawOptions{RcvBuf: 4 << 10})
	if h := victim.Next(5 * time.Second); h.T != proto.TypeHello {
		t.Fatalf("first frame %q, want hello", h.T)
	}
	watcher := dial(t, n, 2002, nodetest.RawOptions{})
	for _, c := range []*nodetest.Raw{victim, watcher} {
		if f := request(t, c, 1, join); f.Code != 0 {
			t.Fatalf("join: %+v", f)
		}
	}
	// A reliable push it got and has not acked yet.
	mid, reached := n.Router.SendUser(2001, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":1,"delta":1,"reason":"dev"}`), Ack: true})
	if reached != 1 || victim.NextOfType(proto.TypePush, 5*time.Second).Mid != mid {
		t.Fatalf("the reliable push not delivered (reached %d)", reached)
	}
	victim.Pause()
	pad := `{"pad":"` + strings.Repeat("x", 8<<10) + `"}`
	for range 6 { // 48 KiB: past the socket buffers, within the queue
		if _, err := n.Router.PublishRoom(room, proto.Push{Biz: 9999, Data: []byte(pad)}); err != nil {
			t.Fatal(err)
		}
	}
	select { // the token expires: 4501 decided, its drain stalled
	case <-victim.Closed():
		t.Fatalf("victim closed (%d) before its drain could stall", victim.CloseCode())
	case <-time.After(time.Until(expires) + 1500*time.Millisecond):
	}
	if err := victim.Send(fmt.Sprintf(`{"t":"chat","id":2,"d":{"room_id":%d,"text":"after the close"}}`, room)); err != nil {
		t.Fatal(err)
	}
	// Its ack is still taken (no reply to queue): the push is not handed
	// on at the close as unacked.
	if err := victim.Send(fmt.Sprintf(`{"t":"ack","d":{"mids":[%q]}}`, mid)); err != nil {
		t.Fatal(err)
	}
	nodetest.Eventually(t, 3*time.Second, func() bool { return n.WS.PendingAcks(2001) == 0 }, "the ack sent while closing taken")
	deadline := time.After(1500 * time.Millisecond)
	for {
		select {
		case f := <-watcher.Frames():
			if f.T == proto.TypePush && strings.Contains(string(f.D), "after the close") {
				t.Fatalf("the chat sent after the close was decided was posted: %s", f.D)
			}
		case <-deadline:
			resumedUntilClosed(t, victim, proto.CloseTokenExpired)
			return
		}
	}
}

// An ack the client sends after the node's close frame — for a reliable
// push written just before it — is taken while the node lingers for the
// client's close: the push is not handed on to the user's next session as
// unacked. (The client acks only after the push arrives, so after a
// drained close's frame the ack always comes late; before, it was dropped
// and the next session got the push again.)
func TestAckAfterTheCloseFrameTaken(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	tok, expires := shortToken(t, n, 2001, 2*time.Second)
	c := nodetest.MustDialRaw(t, nodetest.WSURL(n), tok, nodetest.RawOptions{})
	if h := c.Next(5 * time.Second); h.T != proto.TypeHello {
		t.Fatalf("first frame %q, want hello", h.T)
	}
	mid, reached := n.Router.SendUser(2001, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":1,"delta":1,"reason":"dev"}`), Ack: true})
	if reached != 1 || c.NextOfType(proto.TypePush, 5*time.Second).Mid != mid {
		t.Fatalf("the reliable push not delivered (reached %d)", reached)
	}
	// The client's reader stops at the next frame, so the close frame
	// that follows it stays unread (the node writes it and lingers).
	c.Pause()
	n.Router.SendUser(2001, proto.Push{Biz: 9999, Data: []byte(`{}`)})
	time.Sleep(time.Until(expires) + 2*time.Second) // 4501 decided (the sweep: within a second), drained, its frame written
	if err := c.Send(fmt.Sprintf(`{"t":"ack","d":{"mids":[%q]}}`, mid)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	resumedUntilClosed(t, c, proto.CloseTokenExpired)
	next := dial(t, n, 2001, nodetest.RawOptions{})
	for deadline := time.After(time.Second); ; {
		select {
		case f := <-next.Frames():
			if f.T == proto.TypePush && f.Mid == mid {
				t.Fatal("the push acked after the close frame was handed on to the next session")
			}
		case <-deadline:
			return
		}
	}
}

// resumedUntilClosed lets paused c read again and waits for the node's
// close, which must carry code.
func resumedUntilClosed(t *testing.T, c *nodetest.Raw, code int) {
	t.Helper()
	c.Resume()
	select {
	case <-c.Closed():
	case <-time.After(5 * time.Second):
		t.Fatal("not closed after reading again")
	}
	if got := c.CloseCode(); got != code {
		t.Fatalf("close code %d, want %d", got, code)
	}
}

// shortToken issues user a viewer token that expires in ttl, and when.
func shortToken(t *testing.T, n *gateway.Node, user int64, ttl time.Duration) (string, time.Time) {
	t.Helper()
	tok, err := n.Auth.Issue(user, gateway.RoleViewer, ttl)
	if err != nil {
		t.Fatal(err)
	}
	ident, err := n.Auth.Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	return tok, ident.Expires
}

// A client that has its hello is reachable: a push sent to its user right
// after the hello reached it reaches the connection (the hello was written
// before the connection was registered with the router, and a push in
// between reached nobody).
func TestReachableOnceTheHelloIsRead(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	for i := range 300 {
		user := int64(5000 + i)
		c := dial(t, n, user, nodetest.RawOptions{})
		if _, reached := n.Router.SendUser(user, proto.Push{Biz: proto.BizChat, Data: []byte(`{}`)}); reached != 1 {
			t.Fatalf("dial %d: a push right after the hello reached %d sessions, want 1", i, reached)
		}
		c.Close()
	}
}

// A browser cannot set an Authorization header on a WebSocket, and a token in
// the query ends up in access logs: the token may come as a subprotocol
// (liveedge.bearer.<token>) offered beside liveedge.v1, which the node
// answers — never the token's. Clients offering no subprotocol are upgraded
// as before; a bad token that way is refused with 401.
func TestTokenAsASubprotocol(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	tok := nodetest.Token(t, n, 77, gateway.RoleViewer)
	offer := func(v string) http.Header { return http.Header{"Sec-Websocket-Protocol": {v}} }
	for _, c := range []struct {
		name, token string
		header      http.Header
		answer      string
	}{
		{"token as a subprotocol", "", offer(gateway.WSSubprotocol + ", " + gateway.WSBearerPrefix + tok), gateway.WSSubprotocol},
		{"token as a subprotocol, in two headers", "", http.Header{"Sec-Websocket-Protocol": {gateway.WSSubprotocol, gateway.WSBearerPrefix + tok}}, gateway.WSSubprotocol},
		{"query token, liveedge.v1 offered", tok, offer(gateway.WSSubprotocol), gateway.WSSubprotocol},
		{"query token, no subprotocol", tok, nil, ""},
		{"Authorization header", "", http.Header{"Authorization": {"Bearer " + tok}}, ""},
	} {
		r, resp, err := nodetest.DialRaw(t, nodetest.WSURL(n), c.token, nodetest.RawOptions{Header: c.header})
		if err != nil {
			t.Fatalf("%s: %v (%v)", c.name, err, resp)
		}
		if got := resp.Header.Values("Sec-Websocket-Protocol"); strings.Join(got, ",") != c.answer {
			t.Fatalf("%s: answered subprotocol %q, want %q", c.name, got, c.answer)
		}
		h := r.Next(5 * time.Second)
		if h.T != proto.TypeHello || !strings.Contains(string(h.D), `"user_id":77`) {
			t.Fatalf("%s: first frame %s %s", c.name, h.T, h.D)
		}
		r.Close()
	}
	// The offers on two header lines, the token's first (gws's client
	// reads one line: a raw handshake here): answered liveedge.v1.
	conn, err := net.Dial("tcp", strings.TrimSuffix(strings.TrimPrefix(nodetest.WSURL(n), "ws://"), "/ws"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: %s%s\r\nSec-WebSocket-Protocol: %s\r\n\r\n",
		gateway.WSBearerPrefix, tok, gateway.WSSubprotocol)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-Websocket-Protocol") != gateway.WSSubprotocol {
		t.Fatalf("offers on two lines, the token's first: %v %v", resp, err)
	}
	for name, h := range map[string]http.Header{
		"bad token":    offer(gateway.WSSubprotocol + ", " + gateway.WSBearerPrefix + "x.y.z"),
		"other secret": offer(gateway.WSSubprotocol + ", " + gateway.WSBearerPrefix + otherSecretToken(t)),
		"empty token":  offer(gateway.WSSubprotocol + ", " + gateway.WSBearerPrefix),
	} {
		_, resp, err := nodetest.DialRaw(t, nodetest.WSURL(n), "", nodetest.RawOptions{Header: h})
		if err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s: want 401, got %v (%v)", name, resp, err)
		}
	}
}

// An admin closes any room (a moderator ending a stream): its viewers get
// biz 5559 "closed by an admin"; a viewer or another anchor is refused
// (10003). A former member's chat in the closed room is 10004 (the room
// closed), not 10003. Before, an admin got 10003 — no one but the anchor
// could end a stream — and the chat 10003.
func TestAdminClosesARoomAndChatThereIs10004(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 610, 1)
	v := dial(t, n, 611, nodetest.RawOptions{})
	if f := request(t, v, 1, fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)); f.Code != 0 {
		t.Fatalf("join: %+v", f)
	}
	url := fmt.Sprintf("%s/api/v1/rooms/%d", nodetest.HTTPURL(n), room)
	var out struct {
		Code int `json:"code"`
	}
	for _, who := range []struct {
		user int64
		role string
	}{{611, gateway.RoleViewer}, {612, gateway.RoleAnchor}} {
		if st := nodetest.DoJSON(t, "DELETE", url, nodetest.Token(t, n, who.user, who.role), "", &out); st != 403 || out.Code != proto.CodeForbidden {
			t.Fatalf("%s %d closes the room: %d %+v", who.role, who.user, st, out)
		}
	}
	if st := nodetest.DoJSON(t, "DELETE", url, nodetest.Token(t, n, 1, gateway.RoleAdmin), "", &out); st != 200 || out.Code != 0 {
		t.Fatalf("admin closes the room: %d %+v", st, out)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		f := v.Next(time.Until(deadline))
		if f.T == proto.TypePush && f.Biz == proto.BizRoomClosed {
			if !strings.Contains(string(f.D), "closed by an admin") {
				t.Fatalf("5559 %s", f.D)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no 5559")
		}
	}
	if f := request(t, v, 2, fmt.Sprintf(`{"t":"chat","id":2,"d":{"room_id":%d,"text":"hi"}}`, room)); f.Code != proto.CodeNotFound {
		t.Fatalf("chat in the closed room: %+v, want %d", f, proto.CodeNotFound)
	}
	if st := nodetest.DoJSON(t, "DELETE", url, nodetest.Token(t, n, 1, gateway.RoleAdmin), "", &out); st != 404 {
		t.Fatalf("admin closes the closed room: %d %+v", st, out)
	}
}
