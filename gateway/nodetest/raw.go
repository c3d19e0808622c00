package nodetest

import (
	"bytes"
	"errors"
	"net"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Raw is a bare WebSocket test client: it records every server frame as it
// arrives (batches expanded), can stop reading on demand (a slow consumer), and
// sends whatever bytes a test wants. It does not ack anything by itself.
type Raw struct {
	tb     testing.TB
	conn   *gws.Conn
	frames chan proto.ServerFrame
	gate   chan struct{} // closed = reading; replaced while paused

	mu        sync.Mutex
	paused    bool
	closeCode int
	closed    chan struct{}
}

// RawOptions tune a Raw client.
type RawOptions struct {
	Batch  bool // opt in to batch frames
	Buf    int  // frames buffered before reading blocks (default 1024)
	RcvBuf int  // socket receive buffer in bytes (0 = kernel default)
	SndBuf int  // socket send buffer in bytes (0 = kernel default)
	// Header is sent with the upgrade request (Authorization,
	// Sec-WebSocket-Protocol, ...); an empty token is then left out of the
	// query.
	Header http.Header
}

// DialRaw connects to url with token (query). Beyond o.Buf unread frames,
// reading blocks (keep up, or use Pause on purpose).
func DialRaw(tb testing.TB, url, token string, o RawOptions) (*Raw, *http.Response, error) {
	warmDecoder.Do(warmServerFrames)
	if o.Buf <= 0 {
		o.Buf = 1024
	}
	r := &Raw{tb: tb, frames: make(chan proto.ServerFrame, o.Buf), gate: make(chan struct{}), closed: make(chan struct{})}
	close(r.gate)
	u := url + "?token=" + token
	if token == "" && o.Header != nil {
		u = url + "?"
	}
	if o.Batch {
		u += "&batch=1"
	}
	opt := &gws.ClientOption{Addr: u, ReadMaxPayloadSize: 64 << 20, RequestHeader: o.Header}
	if o.RcvBuf > 0 || o.SndBuf > 0 {
		opt.NewDialer = func() (gws.Dialer, error) {
			return &net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) {
					if o.RcvBuf > 0 {
						serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, o.RcvBuf)
					}
					if o.SndBuf > 0 && serr == nil {
						serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, o.SndBuf)
					}
				})
				return errors.Join(err, serr)
			}}, nil
		}
	}
	conn, resp, err := gws.NewClient(r, opt)
	if err != nil {
		return nil, resp, err
	}
	r.conn = conn
	go conn.ReadLoop()
	tb.Cleanup(func() { r.Close() })
	return r, resp, nil
}

// MustDialRaw is DialRaw that fails the test on error.
func MustDialRaw(tb testing.TB, url, token string, o RawOptions) *Raw {
	tb.Helper()
	r, _, err := DialRaw(tb, url, token, o)
	if err != nil {
		tb.Fatalf("nodetest: dial %s: %v", url, err)
	}
	return r
}

// OnOpen implements gws.Event.
func (r *Raw) OnOpen(*gws.Conn) {}

// OnClose implements gws.Event.
func (r *Raw) OnClose(_ *gws.Conn, err error) {
	var ce *gws.CloseError
	r.mu.Lock()
	if errors.As(err, &ce) {
		r.closeCode = int(ce.Code)
	} else if r.closeCode == 0 {
		r.closeCode = -1
	}
	r.mu.Unlock()
	close(r.closed)
}

var warmDecoder sync.Once

// warmServerFrames decodes one frame of every shape the raw client meets, so
// that sonic compiles its decoders (seconds under -race, behind one global
// lock) before a test's clients need them: the first batch frame of a test
// would otherwise stall every client's reader at once in the middle of what
// the test measures.
func warmServerFrames() {
	for _, b := range []string{
		`{"t":"reply","id":1,"code":0,"msg":"ok","d":{"a":1}}`,
		`{"t":"push","mid":"m1","biz":1,"room":1,"ack":true,"d":{"a":"b"}}`,
		`{"t":"batch","d":[{"t":"push","mid":"m1","biz":1,"room":1,"d":{}},{"t":"reply","id":2,"code":0,"msg":"ok"}]}`,
	} {
		if _, err := proto.DecodeServerFrame([]byte(b)); err != nil {
			panic("nodetest: warm-up frame does not decode: " + err.Error())
		}
	}
}

// OnPing implements gws.Event.
func (r *Raw) OnPing(c *gws.Conn, p []byte) { _ = c.WritePong(p) }

// OnPong implements gws.Event.
func (r *Raw) OnPong(*gws.Conn, []byte) {}

// OnMessage implements gws.Event.
func (r *Raw) OnMessage(_ *gws.Conn, m *gws.Message) {
	b := bytes.Clone(m.Bytes())
	m.Close()
	r.mu.Lock()
	gate := r.gate
	r.mu.Unlock()
	<-gate
	f, err := proto.DecodeServerFrame(b)
	if err != nil {
		r.tb.Errorf("nodetest: server sent bad JSON %q: %v", b, err)
		return
	}
	if f.T == proto.TypeBatch {
		for _, in := range f.Frames {
			r.frames <- in
		}
		return
	}
	r.frames <- f
}

// Pause stops reading from the socket (the kernel buffers fill, then the
// server's queue); Resume reads again.
func (r *Raw) Pause() {
	r.mu.Lock()
	if !r.paused {
		r.paused = true
		r.gate = make(chan struct{})
	}
	r.mu.Unlock()
}

// Resume undoes Pause.
func (r *Raw) Resume() {
	r.mu.Lock()
	if r.paused {
		r.paused = false
		close(r.gate)
	}
	r.mu.Unlock()
}

// Send writes a text frame.
func (r *Raw) Send(s string) error { return r.conn.WriteMessage(gws.OpcodeText, []byte(s)) }

// SendBinary writes a binary frame.
func (r *Raw) SendBinary(b []byte) error { return r.conn.WriteMessage(gws.OpcodeBinary, b) }

// Next returns the next frame or fails the test after timeout.
func (r *Raw) Next(timeout time.Duration) proto.ServerFrame {
	r.tb.Helper()
	select {
	case f := <-r.frames:
		return f
	case <-time.After(timeout):
		r.tb.Fatalf("nodetest: no frame within %v", timeout)
	}
	return proto.ServerFrame{}
}

// Frames is the channel of received frames.
func (r *Raw) Frames() <-chan proto.ServerFrame { return r.frames }

// NextOfType skips frames until one of type t (or fails after timeout).
func (r *Raw) NextOfType(t string, timeout time.Duration) proto.ServerFrame {
	r.tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			r.tb.Fatalf("nodetest: no %q frame within %v", t, timeout)
		}
		if f := r.Next(left); f.T == t {
			return f
		}
	}
}

// Closed is closed when the connection is gone.
func (r *Raw) Closed() <-chan struct{} { return r.closed }

// CloseCode is the close code the server sent (-1: no close frame; 0: open).
func (r *Raw) CloseCode() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closeCode
}

// Close closes the connection (1000).
func (r *Raw) Close() {
	r.Resume()
	_ = r.conn.WriteClose(1000, nil)
}

// Drop closes the socket without a close frame, as a client that went away
// (whatever it had not read is lost with it).
func (r *Raw) Drop() {
	_ = r.conn.NetConn().Close()
	r.Resume()
}
