package gateway

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
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

// maxHandshakes bounds the upgrade requests read at once. ws.max_conns and
// the per-user bound count only connections past their token: without this,
// sockets that send nothing (or trickle headers) until ws.handshake_timeout
// each held a goroutine, a reader and a file, as many as a client opened.
// Beyond it, new connections wait in the listen backlog.
const maxHandshakes = 1024

// accept serves ln until it is closed; a failed Accept (out of files) is
// retried after a growing pause, as net/http does.
func (s *Server) accept(ln net.Listener) {
	var pause time.Duration
	for {
		s.handshakes <- struct{}{} // a slot first (maxHandshakes)
		nc, err := ln.Accept()
		if err != nil {
			<-s.handshakes
			if errors.Is(err, net.ErrClosed) {
				return
			}
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			s.log.Debug("ws accept", "err", err, "retry_in", pause)
			time.Sleep(pause)
			continue
		}
		pause = 0
		go func() {
			defer func() { <-s.handshakes }()
			s.handshake(nc)
		}()
	}
}

// handshake reads one request from nc and serves it with ServeHTTP; anything
// but an upgrade is answered and the connection closed (no keep-alive).
func (s *Server) handshake(nc net.Conn) {
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
	if err != nil {
		status := http.StatusBadRequest
		var ne net.Error
		switch {
		case lr.N <= 0:
			status = http.StatusRequestHeaderFieldsTooLarge
		case errors.As(err, &ne) && ne.Timeout():
			status = http.StatusRequestTimeout
		}
		if !errors.Is(err, io.EOF) {
			w := &handshakeResponse{conn: nc, header: http.Header{}, timeout: timeout}
			http.Error(w, http.StatusText(status), status)
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
