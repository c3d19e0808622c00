package gateway

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// owes reports whether a direct write left bytes to write.
func (c *corkConn) owes() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.owed) > 0
}

// A direct write the socket cannot take whole never blocks: the rest is owed
// and goes out before any later byte — a frame gws writes itself (a pong) or
// the writer's corked batch — so the stream stays in order.
func TestCorkDirectWriteOwesWhatTheSocketDidNotTake(t *testing.T) {
	if !directWrites {
		t.Skip("no direct writes on this platform")
	}
	cc, sc := tcpPair(t)
	_ = sc.(*net.TCPConn).SetWriteBuffer(16 << 10)
	_ = cc.(*net.TCPConn).SetReadBuffer(16 << 10)
	c := newCorkConn(sc, 5*time.Second)
	if c.raw == nil {
		t.Fatal("a TCP socket has no raw conn")
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB: more than both buffers
	start := time.Now()
	left, _, err := c.writeNow(big)
	if err != nil || !left {
		t.Fatalf("writeNow = %v, %v; want bytes left over, no error", left, err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("a direct write blocked for %v", d)
	}
	if !c.owes() {
		t.Fatal("nothing owed")
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(cc, int64(len(big)+len("pong")+len("batch-1batch-2"))))
		got <- b
	}()
	// A control frame written meanwhile waits for the owed bytes.
	if _, err := c.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	c.cork()
	_, _ = c.Write([]byte("batch-1"))
	_, _ = c.Write([]byte("batch-2"))
	if err := c.flush(); err != nil {
		t.Fatal(err)
	}
	if c.owes() {
		t.Fatal("still owing after a write")
	}
	b := <-got
	want := append(append(append([]byte{}, big...), "pong"...), "batch-1batch-2"...)
	if !bytes.Equal(b, want) {
		t.Fatalf("read %d bytes, out of order or lost (want %d)", len(b), len(want))
	}
	// An idle socket takes a small direct write whole.
	if left, _, err := c.writeNow([]byte("small")); err != nil || left {
		t.Fatalf("writeNow(small) = %v, %v", left, err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(cc, buf); err != nil || string(buf) != "small" {
		t.Fatalf("read %q, %v", buf, err)
	}
	// settle pays what is owed with the write deadline: nothing owed here.
	if err := c.settle(); err != nil {
		t.Fatal(err)
	}
}

// A direct write never waits for a frame gws is writing itself (a pong, a
// close echo) that is blocked on a full socket: it answers busy at once and
// the caller queues its frame — a room's fan-out waits for every direct
// write, so one client that stopped reading but still pings stalled the
// whole room for up to the write timeout.
func TestCorkDirectWriteDoesNotWaitForABlockedWrite(t *testing.T) {
	if !directWrites {
		t.Skip("no direct writes on this platform")
	}
	_, sc := tcpPair(t) // the client never reads
	_ = sc.(*net.TCPConn).SetWriteBuffer(16 << 10)
	c := newCorkConn(sc, time.Second)
	blocked := make(chan struct{})
	go func() {
		defer close(blocked)
		_, _ = c.Write(bytes.Repeat([]byte("p"), 8<<20)) // a pong that cannot go out: blocks under mu
	}()
	for c.mu.TryLock() { // until the blocked write holds the connection
		c.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	left, busy, err := c.writeNow([]byte("push"))
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("a direct write waited %v behind a blocked write", d)
	}
	if err != nil || left || !busy {
		t.Fatalf("writeNow = left %v busy %v err %v; want busy", left, busy, err)
	}
	<-blocked // ends at the write timeout
}

// A connection quiet for longer than the write timeout has a write deadline
// in the past; a direct write must not meet it.
func TestCorkDirectWriteAfterAQuietSpell(t *testing.T) {
	if !directWrites {
		t.Skip("no direct writes on this platform")
	}
	cc, sc := tcpPair(t)
	c := newCorkConn(sc, 50*time.Millisecond)
	if _, err := c.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(120 * time.Millisecond)
	if left, _, err := c.writeNow([]byte("second")); err != nil || left {
		t.Fatalf("writeNow after a quiet spell = %v, %v", left, err)
	}
	buf := make([]byte, len("firstsecond"))
	if _, err := io.ReadFull(cc, buf); err != nil || string(buf) != "firstsecond" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

// gws may close — echo a client's close, refuse a frame — between two
// frames of the writer's corked batch: its close frame then lands in the
// cork's buffer and Close must write the buffer before the FIN. The client
// gets the frames corked so far and the close frame, then EOF; before, the
// FIN went first and the flush that followed met a shut socket, so the
// client saw neither (a 1006 instead of the close code).
func TestCorkCloseWritesWhatTheCorkCollectedFirst(t *testing.T) {
	cc, sc := tcpPair(t)
	c := newCorkConn(sc, 5*time.Second)
	c.framed = true
	data := wsTextFrame([]byte(`{"t":"push"}`))
	closeFrame := []byte{0x88, 2, 0x03, 0xe8} // close, 1000
	c.cork()
	_, _ = c.Write(data)       // the writer's batch, first frame
	_, _ = c.Write(closeFrame) // gws's close echo, between two of its frames
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	_ = c.flush() // the writer's flush after gws refused its next frame
	_ = cc.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(cc)
	if err != nil {
		t.Fatalf("read: %v (after %q)", err, got)
	}
	if want := append(append([]byte{}, data...), closeFrame...); !bytes.Equal(got, want) {
		t.Fatalf("client read %q before EOF; want the corked frame and the close frame %q", got, want)
	}
}

// Nothing goes after the close frame: once gws has written (or collected)
// it, a room's direct write is refused as busy — the caller queues the
// frame, and a closed connection's queue is not written — where it could
// follow the close frame on the wire, or meet the shut write side and
// reset a socket meant to linger.
func TestCorkDirectWriteRefusedAfterTheCloseFrame(t *testing.T) {
	if !directWrites {
		t.Skip("no direct writes on this platform")
	}
	cc, sc := tcpPair(t)
	c := newCorkConn(sc, 5*time.Second)
	c.framed = true
	closeFrame := []byte{0x88, 2, 0x03, 0xe8}
	if _, err := c.Write(closeFrame); err != nil {
		t.Fatal(err)
	}
	if left, busy, err := c.writeNow(wsTextFrame([]byte("late"))); err != nil || left || !busy {
		t.Fatalf("writeNow after the close frame = left %v busy %v err %v; want busy", left, busy, err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	_ = cc.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(cc)
	if err != nil || !bytes.Equal(got, closeFrame) {
		t.Fatalf("client read %q, %v; want only the close frame", got, err)
	}
}

// The handshake's 101 goes through Write too, before framed is set: its
// first byte ('H', 0x48) is no close opcode for it.
func TestCorkHandshakeResponseIsNoCloseFrame(t *testing.T) {
	if !directWrites {
		t.Skip("no direct writes on this platform")
	}
	cc, sc := tcpPair(t)
	c := newCorkConn(sc, 5*time.Second)
	resp := []byte("HTTP/1.1 101 Switching Protocols\r\n\r\n")
	if _, err := c.Write(resp); err != nil {
		t.Fatal(err)
	}
	c.framed = true
	if left, busy, err := c.writeNow([]byte("x")); err != nil || left || busy {
		t.Fatalf("writeNow after the 101 = left %v busy %v err %v", left, busy, err)
	}
	buf := make([]byte, len(resp)+1)
	if _, err := io.ReadFull(cc, buf); err != nil || !bytes.Equal(buf, append(resp, 'x')) {
		t.Fatalf("read %q, %v", buf, err)
	}
}

func TestWSTextFrameHeader(t *testing.T) {
	for _, tc := range []struct {
		n    int
		head []byte
	}{
		{0, []byte{0x81, 0}},
		{125, []byte{0x81, 125}},
		{126, []byte{0x81, 126, 0, 126}},
		{65535, []byte{0x81, 126, 0xff, 0xff}},
		{65536, []byte{0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0}},
	} {
		p := bytes.Repeat([]byte("a"), tc.n)
		f := wsTextFrame(p)
		if !bytes.Equal(f[:len(tc.head)], tc.head) || !bytes.Equal(f[len(tc.head):], p) {
			t.Errorf("%d bytes: header % x", tc.n, f[:min(len(f), 10)])
		}
	}
}
