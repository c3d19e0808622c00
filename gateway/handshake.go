package gateway

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// The WebSocket listener reads each upgrade request itself (accept,
// handshake) instead of through net/http's server: net/http gives every
// connection a 4 KiB bufio.Reader and a 4 KiB bufio.Writer that a hijack
// never returns to its pools, and a hijacked connection allocates another
// writer — about 12 KiB of garbage per upgrade, which at node.gogc 400 is
// most of a freshly ramped node's RSS per connection. Here the request is
// read through a pooled reader that goes back to the pool once the
// connection is upgraded (the bytes a client sent early are copied out first)
// or answered.
const maxHeaderBytes = 16 << 10 // request line and headers (was MaxHeaderBytes)

var handshakeReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}

// Upgrade requests whose line and headers are being read are bounded:
// maxHandshakes in all, maxHandshakesPerIP from one address. ws.max_conns
// and the per-user bound count only connections past their token: without
// this, sockets that send nothing (or trickle headers) until
// ws.handshake_timeout each held a goroutine, a reader and a file, as many
// as a client opened. A connection over a bound is closed at once (counted
// in liveedge_upgrades_denied_total{reason="handshakes"}), never waited for:
// accepting goes on, so one address's idle sockets cannot hold the door
// shut for everyone (a slot is held only while the request is read, not
// while it is served). Variables for the tests.
var (
	maxHandshakes      = 8192
	maxHandshakesPerIP = 1024
)

// handshakeGate counts the upgrade requests being read, in all and per
// remote address (a map of the addresses with one in flight: at most
// maxHandshakes entries).
type handshakeGate struct {
	mu       sync.Mutex
	n        int
	perIP    map[netip.Addr]int
	max, per int
}

func newHandshakeGate() *handshakeGate {
	return &handshakeGate{perIP: map[netip.Addr]int{}, max: maxHandshakes, per: maxHandshakesPerIP}
}

// admit takes a slot for a connection from addr, or reports false.
func (g *handshakeGate) admit(addr net.Addr) (netip.Addr, bool) {
	var ip netip.Addr
	if ta, ok := addr.(*net.TCPAddr); ok {
		ip = ta.AddrPort().Addr().Unmap()
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.n >= g.max || g.perIP[ip] >= g.per {
		return ip, false
	}
	g.n++
	g.perIP[ip]++
	return ip, true
}

// done gives back the slot admit took for ip.
func (g *handshakeGate) done(ip netip.Addr) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.n--
	if g.perIP[ip]--; g.perIP[ip] <= 0 {
		delete(g.perIP, ip)
	}
}

// reading is the number of upgrade requests being read.
func (g *handshakeGate) reading() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
}

// accept serves ln until it is closed; a failed Accept (out of files) is
// retried after a growing pause, as net/http does.
func (s *Server) accept(ln net.Listener) {
	var pause time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			s.log.Debug("ws accept", "err", err, "retry_in", pause)
			time.Sleep(pause)
			continue
		}
		pause = 0
		ip, ok := s.handshakes.admit(nc.RemoteAddr())
		if !ok {
			s.metrics.upgradesDenied.WithLabelValues("handshakes").Inc()
			_ = nc.Close()
			continue
		}
		go s.handshake(nc, ip)
	}
}

// handshake reads one request from nc and serves it with ServeHTTP; anything
// but an upgrade is answered and the connection closed (no keep-alive).
func (s *Server) handshake(nc net.Conn, ip netip.Addr) {
	read := sync.OnceFunc(func() { s.handshakes.done(ip) }) // the request is read
	defer read()
	timeout := s.cfg.WS.HandshakeTimeout.D() // ws.handshake_timeout (was ReadHeaderTimeout)
	_ = nc.SetReadDeadline(time.Now().Add(timeout))
	lr := &io.LimitedReader{R: nc, N: maxHeaderBytes}
	br := handshakeReaders.Get().(*bufio.Reader)
	br.Reset(lr)
	defer func() {
		br.Reset(nil)
		handshakeReaders.Put(br)
	}()
	r, err := http.ReadRequest(br)
	read()
	if err != nil {
		// Answered in the JSON envelope, as the other refusals of this port
		// and the HTTP API's own (before: a text/plain status line).
		status, e := http.StatusBadRequest, proto.BadRequest("malformed HTTP request")
		var ne net.Error
		switch {
		case lr.N <= 0:
			status, e = http.StatusRequestHeaderFieldsTooLarge, proto.BadRequest("request line and headers larger than %d bytes", maxHeaderBytes)
		case errors.As(err, &ne) && ne.Timeout():
			status, e = http.StatusRequestTimeout, proto.BadRequest("upgrade request not read whole within ws.handshake_timeout")
		}
		if !errors.Is(err, io.EOF) {
			w := &handshakeResponse{conn: nc, header: http.Header{}, timeout: timeout}
			writeJSONError(w, status, e)
			w.finish()
		}
		_ = nc.Close()
		return
	}
	_ = nc.SetReadDeadline(time.Time{})
	r.RemoteAddr = nc.RemoteAddr().String()
	lr.N = 1 << 62 // from here the reader only holds bytes already read
	w := &handshakeResponse{conn: nc, header: http.Header{}, br: br, timeout: timeout}
	s.ServeHTTP(w, r)
	if !w.hijacked {
		w.finish()
		lingerClose(nc)
	}
}

// handshakeResponse is the http.ResponseWriter of a handshake: an answer
// collects in buf and goes out, with Connection: close, in finish; Hijack
// hands the connection to the upgrade.
type handshakeResponse struct {
	conn     net.Conn
	timeout  time.Duration // ws.handshake_timeout: bounds the answer's write
	br       *bufio.Reader
	header   http.Header
	status   int
	buf      bytes.Buffer
	hijacked bool
}

func (w *handshakeResponse) Header() http.Header { return w.header }

func (w *handshakeResponse) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
}

func (w *handshakeResponse) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return w.buf.Write(p)
}

// Hijack implements http.Hijacker. The reader holds what the client sent
// after the request; the writer is unused (gws writes to the conn).
func (w *handshakeResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.hijacked || w.br == nil {
		return nil, nil, http.ErrHijacked
	}
	w.hijacked = true
	return w.conn, bufio.NewReadWriter(w.br, nil), nil
}

// finish writes the answer (bounded by a write deadline).
func (w *handshakeResponse) finish() {
	w.WriteHeader(http.StatusOK)
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 ")
	b.WriteString(strconv.Itoa(w.status))
	b.WriteByte(' ')
	b.WriteString(http.StatusText(w.status))
	b.WriteString("\r\n")
	w.header.Set("Content-Length", strconv.Itoa(w.buf.Len()))
	w.header.Set("Connection", "close")
	_ = w.header.Write(&b)
	b.WriteString("\r\n")
	b.Write(w.buf.Bytes())
	_ = w.conn.SetWriteDeadline(time.Now().Add(w.timeout))
	_, _ = w.conn.Write(b.Bytes())
}

// lingerClose closes nc after the answer: the write side first, then what
// the client still sends is discarded for a moment (closing with unread
// bytes would reset the connection and could destroy the answer in flight).
func lingerClose(nc net.Conn) {
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
		_ = tc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _ = io.CopyN(io.Discard, tc, 64<<10)
	}
	_ = nc.Close()
}
