package gateway

import (
	"testing"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// The reader queues at most laneBytes behind a connection's lane (one
// message whatever its size) and then waits until the lane takes some; the
// end handed to the lane runs after the messages queued before it.
func TestLaneQueueBoundHoldsTheReader(t *testing.T) {
	c := &Conn{srv: &Server{metrics: &metrics{}}, lane: &connLane{}}
	c.closing.Store(true) // the lane serves nothing (no server behind it): only the queue is tested
	c.laneOn.Store(true)
	if !c.queueBehindLane(gws.OpcodeText, make([]byte, proto.MaxFrameBytes)) {
		t.Fatal("a message bigger than the bound refused by an empty queue")
	}
	queued := make(chan bool, 1)
	go func() { queued <- c.queueBehindLane(gws.OpcodeText, []byte(`{"t":"ping","id":1}`)) }()
	select {
	case <-queued:
		t.Fatal("queued past the bound")
	case <-time.After(100 * time.Millisecond):
	}
	// Empty messages count too (a queue entry each): a flood of them from a
	// client stops the reader as bytes do.
	c2 := &Conn{srv: &Server{metrics: &metrics{}}, lane: &connLane{}}
	c2.laneOn.Store(true)
	flooded := make(chan int, 1)
	go func() {
		n := 0
		for c2.queueBehindLane(gws.OpcodeText, nil) {
			n++
		}
		flooded <- n
	}()
	time.Sleep(100 * time.Millisecond)
	c2.lane.mu.Lock()
	if n := len(c2.lane.q); n > laneBytes/laneMsgCost {
		t.Fatalf("%d empty messages queued, at most %d", n, laneBytes/laneMsgCost)
	}
	c2.lane.mu.Unlock()
	c2.closing.Store(true)
	go c2.srv.runLane(c2) // lets the reader on: once the lane ends, it serves the message itself
	<-flooded

	ended := make(chan int, 1)
	if !c.afterLane(func() {
		c.lane.mu.Lock()
		ended <- len(c.lane.q)
		c.lane.mu.Unlock()
	}) {
		t.Fatal("the end not handed to a running lane")
	}
	done := make(chan struct{})
	go func() { c.srv.runLane(c); close(done) }()
	select {
	case <-queued: // taken behind the lane, or served by the reader once the lane ended
	case <-time.After(5 * time.Second):
		t.Fatal("the reader still waits once the lane took the big message")
	}
	<-done
	if n := <-ended; n != 0 {
		t.Fatalf("the end ran with %d messages still queued", n)
	}
	if c.laneOn.Load() || c.afterLane(func() {}) {
		t.Fatal("the lane still on after it ended")
	}
}

// Behind a lane an ack is served at once by the reader (it answers pushes
// already received, has no reply): the push is forgotten, nothing queued;
// any other message is queued.
func TestAckNotQueuedBehindALane(t *testing.T) {
	c := &Conn{srv: &Server{metrics: newMetrics("t", nil)}, lane: &connLane{}, cork: &corkConn{}}
	c.pending = map[string]*pendingPush{"m1": {}}
	c.laneOn.Store(true)
	c.srv.serveFrame(c, gws.OpcodeText, []byte(`{"t":"ack","d":{"mids":["m1"]}}`))
	c.ackMu.Lock()
	_, still := c.pending["m1"]
	c.ackMu.Unlock()
	if still || len(c.lane.q) != 0 {
		t.Fatalf("ack behind a lane: push still pending %v, %d queued", still, len(c.lane.q))
	}
	c.srv.serveFrame(c, gws.OpcodeText, []byte(`{"t":"ping","id":1}`))
	if len(c.lane.q) != 1 {
		t.Fatalf("a request behind a lane: %d queued, want 1", len(c.lane.q))
	}
}

// A frame refused whatever it holds (binary, or text over
// proto.MaxFrameBytes) is queued behind a lane without its payload: a big
// frame behind a request waiting on Redis holds no copy of itself.
func TestRefusedFramesQueuedWithoutPayload(t *testing.T) {
	c := &Conn{srv: &Server{metrics: &metrics{}}, lane: &connLane{}}
	c.laneOn.Store(true)
	big := make([]byte, 1<<20)
	if !c.queueBehindLane(gws.OpcodeBinary, big) || !c.queueBehindLane(gws.OpcodeText, big) {
		t.Fatal("not queued behind the lane")
	}
	l := c.lane
	if len(l.q) != 2 || l.bytes != 2*laneMsgCost {
		t.Fatalf("%d queued, %d bytes counted, want 2 and %d", len(l.q), l.bytes, 2*laneMsgCost)
	}
	for i, want := range []*proto.Error{proto.ErrBinaryFrame, proto.ErrFrameTooLarge} {
		if m := l.q[i]; m.p != nil || m.refused != want {
			t.Fatalf("entry %d: %d bytes kept, refusal %v, want none and %v", i, len(m.p), m.refused, want)
		}
	}
}

// A refresh is served at once behind a lane, as an ack is: it depends on
// nothing sent before it, and it is judged by the connection's token when
// served — held behind requests waiting on Redis, one read before the
// token's end could be refused and the connection closed 4501.
func TestRefreshNotQueuedBehindALane(t *testing.T) {
	auth := NewAuth("lane-refresh-test-secret-0123456789")
	srv := &Server{metrics: newMetrics("t", nil), auth: auth}
	srv.cfg.WS.SendQueueBytes = 1 << 20
	c := &Conn{srv: srv, lane: &connLane{}, cork: &corkConn{}, ident: Identity{UserID: 7, Role: RoleViewer}}
	c.writing = true // the writer role held: the reply stays queued
	c.expires.Store(time.Now().Add(time.Minute).UnixNano())
	c.laneOn.Store(true)
	tok, err := auth.Issue(7, RoleViewer, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c.srv.serveFrame(c, gws.OpcodeText, []byte(`{"t":"refresh","id":3,"d":{"token":"`+tok+`"}}`))
	if len(c.lane.q) != 0 || len(c.queue) != 1 {
		t.Fatalf("refresh behind a lane: %d queued behind it, %d replies", len(c.lane.q), len(c.queue))
	}
	if left := time.Until(time.Unix(0, c.expires.Load())); left < 50*time.Minute {
		t.Fatalf("token left %v after the refresh, want about an hour", left)
	}
}
