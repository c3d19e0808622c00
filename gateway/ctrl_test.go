package gateway_test

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// tcpWS is a WebSocket client written straight on a TCP socket, so that a
// test controls every frame and sees every frame the server sends, control
// frames included (a library client answers pings and closes by itself).
type tcpWS struct {
	t    *testing.T
	conn net.Conn
	br   *bufio.Reader
}

const (
	opText  = 1
	opClose = 8
	opPing  = 9
	opPong  = 10
)

func dialTCPWS(t *testing.T, n *gateway.Node, user int64) *tcpWS {
	t.Helper()
	return dialTCPWSBuf(t, n, user, 0)
}

// dialTCPWSBuf is dialTCPWS with a socket receive buffer of rcvBuf bytes
// (0: the kernel's default).
func dialTCPWSBuf(t *testing.T, n *gateway.Node, user int64, rcvBuf int) *tcpWS {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if rcvBuf > 0 {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvBuf)
			})
			return errors.Join(err, serr)
		}
	}
	conn, err := d.Dial("tcp", n.WS.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	tok := nodetest.Token(t, n, user, gateway.RoleViewer)
	req := "GET /ws?token=" + tok + " HTTP/1.1\r\nHost: " + n.WS.Addr() + "\r\n" +
		"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: status %d", resp.StatusCode)
	}
	_ = conn.SetDeadline(time.Time{})
	w := &tcpWS{t: t, conn: conn, br: br}
	if op, p, err := w.read(5 * time.Second); err != nil || op != opText || !strings.Contains(string(p), `"hello"`) {
		t.Fatalf("first frame: op %d %q %v, want hello", op, p, err)
	}
	return w
}

// maskedFrame is a client frame with first byte b0 (FIN, opcode), masked
// with a random key.
func maskedFrame(b0 byte, payload []byte) []byte {
	var key [4]byte
	_, _ = rand.Read(key[:])
	f := []byte{b0}
	switch n := len(payload); {
	case n < 126:
		f = append(f, 0x80|byte(n))
	case n <= 0xffff:
		f = append(f, 0x80|126)
		f = binary.BigEndian.AppendUint16(f, uint16(n))
	default:
		f = append(f, 0x80|127)
		f = binary.BigEndian.AppendUint64(f, uint64(n))
	}
	f = append(f, key[:]...)
	for i, c := range payload {
		f = append(f, c^key[i%4])
	}
	return f
}

// write writes one whole frame.
func (w *tcpWS) write(op byte, payload []byte) error {
	_, err := w.conn.Write(maskedFrame(0x80|op, payload))
	return err
}

// read reads one frame (unfragmented, as the server writes them).
func (w *tcpWS) read(timeout time.Duration) (byte, []byte, error) {
	_ = w.conn.SetReadDeadline(time.Now().Add(timeout))
	var h [2]byte
	if _, err := io.ReadFull(w.br, h[:]); err != nil {
		return 0, nil, err
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		if _, err := io.ReadFull(w.br, b[:]); err != nil {
			return 0, nil, err
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err := io.ReadFull(w.br, b[:]); err != nil {
			return 0, nil, err
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	if n > 64<<20 {
		return 0, nil, fmt.Errorf("frame of %d bytes", n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(w.br, p); err != nil {
		return 0, nil, err
	}
	return h[0] & 0x0f, p, nil
}

// next reads frames until one with opcode op arrives (text frames skipped).
func (w *tcpWS) next(op byte, timeout time.Duration) ([]byte, error) {
	deadline := time.Now().Add(timeout)
	for {
		got, p, err := w.read(time.Until(deadline))
		if err != nil {
			return nil, err
		}
		if got == op {
			return p, nil
		}
		if got != opText {
			return nil, fmt.Errorf("frame with opcode %d (%q), want %d", got, p, op)
		}
	}
}

// closeCode reads frames until the server's close frame and returns its
// code; a socket that ends without one is 1006, as a browser reports it.
func (w *tcpWS) closeCode(timeout time.Duration) (int, error) {
	p, err := w.next(opClose, timeout)
	if err != nil {
		return 1006, err
	}
	if len(p) < 2 {
		return 1005, nil
	}
	return int(binary.BigEndian.Uint16(p)), nil
}

// A connection quiet for 3 × ws.write_timeout still gets its pong: control
// frames are answered whenever they arrive, whatever deadline the last data
// write left on the socket.
func TestPongAfterIdle(t *testing.T) {
	const wt = 300 * time.Millisecond
	cfg := nodetest.Config(t)
	cfg.WS.WriteTimeout = configsDuration(wt)
	n := nodetest.Start(t, cfg)
	w := dialTCPWS(t, n, 100)
	for i := 0; i < 2; i++ {
		// The hello (then the pong) was the last server write; stay quiet
		// past its deadline.
		time.Sleep(3 * wt)
		ping := fmt.Sprintf("p%d", i)
		if err := w.write(opPing, []byte(ping)); err != nil {
			t.Fatal(err)
		}
		p, err := w.next(opPong, 5*time.Second)
		if err != nil || string(p) != ping {
			t.Fatalf("pong %d after %v idle: %q %v", i, 3*wt, p, err)
		}
	}
}

// A close frame after 3 × ws.write_timeout of quiet gets its close frame
// back.
func TestCloseEchoAfterIdle(t *testing.T) {
	const wt = 300 * time.Millisecond
	cfg := nodetest.Config(t)
	cfg.WS.WriteTimeout = configsDuration(wt)
	n := nodetest.Start(t, cfg)
	w := dialTCPWS(t, n, 100)
	time.Sleep(3 * wt)
	if err := w.write(opClose, binary.BigEndian.AppendUint16(nil, 1000)); err != nil {
		t.Fatal(err)
	}
	code, err := w.closeCode(5 * time.Second)
	if err != nil || code != 1000 {
		t.Fatalf("close echo after %v idle: code %d %v, want 1000", 3*wt, code, err)
	}
}

// A client that closes right behind a burst of requests gets its close
// echoed whatever the writer is doing: the replies go out in corked
// batches, and gws may write the close echo between two frames of one —
// the batch and the close frame must still precede the FIN (a client saw
// 1006 instead of 1000 when the FIN went first).
func TestCloseEchoBehindABurstOfReplies(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	for run := 0; run < 100; run++ {
		w := dialTCPWS(t, n, int64(100+run))
		var burst []byte
		for i := 1; i <= 200; i++ {
			burst = append(burst, maskedFrame(0x80|opText, fmt.Appendf(nil, `{"t":"ping","id":%d,"d":{}}`, i))...)
		}
		burst = append(burst, maskedFrame(0x80|opClose, binary.BigEndian.AppendUint16(nil, 1000))...)
		if _, err := w.conn.Write(burst); err != nil {
			t.Fatal(err)
		}
		code, err := w.closeCode(10 * time.Second)
		if err != nil || code != 1000 {
			t.Fatalf("run %d: close code %d (%v), want the echo of 1000", run, code, err)
		}
	}
}

// A client that stops reading for longer than ws.write_timeout is cut off
// with nothing written after the write that timed out: resuming, it reads
// whole frames, at most one cut short at the end, then the socket's end —
// no close frame. (gws wrote a 1001 close frame behind the cut frame, with
// a fresh deadline: the client read it as the rest of that frame's payload.)
func TestWriteTimeoutWritesNothingAfterTheCutFrame(t *testing.T) {
	const wt = time.Second
	cfg := nodetest.Config(t)
	cfg.WS.WriteTimeout = configsDuration(wt)
	cfg.WS.SocketSendBuffer = 16 << 10
	n := nodetest.Start(t, cfg)
	w := dialTCPWSBuf(t, n, 100, 4<<10)
	// 48 KiB of user pushes (within the 1 MiB queue) past the client's 4 KiB
	// and the node's 16 KiB socket buffers, one at a time: the connection's
	// writer writes each as one frame through gws, until one write blocks
	// and passes its deadline.
	pad := `{"pad":"` + strings.Repeat("x", 8<<10) + `"}`
	for range 6 {
		if _, reached := n.Router.SendUser(100, proto.Push{Biz: 9999, Data: []byte(pad)}); reached != 1 {
			t.Fatalf("push reached %d connections", reached)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The client does not read past the write's deadline, then reads again
	// while a write after the cut one would still be under way.
	time.Sleep(wt * 3 / 2)
	_ = w.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, err := io.ReadAll(w.br)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("reading until the socket's end: %v", err)
	}
	whole := 0
	for len(rest) > 0 {
		op, hdr, size, ok := frameHeader(rest)
		if ok && op == opClose {
			t.Fatalf("a close frame after %d whole frames: %q", whole, rest[hdr:min(len(rest), hdr+size)])
		}
		if !ok || hdr+size > len(rest) {
			// The frame the timed-out write cut: what arrived of it is
			// all there is, and it is text of a push.
			for _, b := range rest[min(hdr, len(rest)):] {
				if b < 0x20 || b > 0x7e {
					t.Fatalf("byte %#x in the cut frame after %d whole frames: something was written behind it", b, whole)
				}
			}
			break
		}
		if op != opText {
			t.Fatalf("frame %d: opcode %d", whole, op)
		}
		whole++
		rest = rest[hdr+size:]
	}
	if whole >= 6 {
		t.Fatalf("all %d pushes arrived: the write never timed out", whole)
	}
	if v := metricValue(t, n, "liveedge_closes_total", `reason="write_failed"`); v != 1 {
		t.Fatalf("closes_total{reason=write_failed} = %v, want 1", v)
	}
}

// frameHeader parses the header of the server frame at the start of b: its
// opcode, the header's length and the payload's; ok is false when b holds
// less than the header.
func frameHeader(b []byte) (op byte, hdr, size int, ok bool) {
	if len(b) < 2 {
		return 0, len(b), 0, false
	}
	op, hdr, n := b[0]&0x0f, 2, uint64(b[1]&0x7f)
	switch n {
	case 126:
		if len(b) < 4 {
			return op, len(b), 0, false
		}
		n, hdr = uint64(binary.BigEndian.Uint16(b[2:])), 4
	case 127:
		if len(b) < 10 {
			return op, len(b), 0, false
		}
		n, hdr = binary.BigEndian.Uint64(b[2:]), 10
	}
	return op, hdr, int(n), true
}

// A frame over ws.max_frame_hard_bytes closes with 1009 every time: the
// client, still sending the rest of the frame, receives the close frame
// before the socket goes (a close with unread input would reset it, the
// client's write would fail and it would see 1006). A library client (gws)
// writes the frame and reads on its own goroutine, as browsers do.
func TestFrameOverHardCapAlwaysCloses1009(t *testing.T) {
	cfg := nodetest.Config(t)
	n := nodetest.Start(t, cfg)
	size := cfg.WS.MaxFrameHardBytes + cfg.WS.MaxFrameHardBytes/2
	payload := `{"t":"chat","id":1,"d":{"room_id":1,"text":"` + strings.Repeat("x", size) + `"}}`
	for i := 0; i < 20; i++ {
		// A small send buffer: most of the frame is still unsent when the
		// server has read its header and closes.
		r := dial(t, n, int64(100+i), nodetest.RawOptions{SndBuf: 16 << 10})
		err := r.Send(payload)
		select {
		case <-r.Closed():
		case <-time.After(10 * time.Second):
			t.Fatalf("run %d: not closed", i)
		}
		if c := r.CloseCode(); c != proto.CloseTooBig {
			t.Fatalf("run %d: close code %d (write: %v), want 1009", i, c, err)
		}
	}
	// The node still serves.
	r := dial(t, n, 200, nodetest.RawOptions{})
	if f := request(t, r, 1, `{"t":"ping","id":1,"d":{}}`); f.Code != 0 {
		t.Fatalf("ping: %+v", f)
	}
}
