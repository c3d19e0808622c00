package gateway

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/cloudwego/hertz/pkg/app"
	errs "github.com/cloudwego/hertz/pkg/common/errors"
	"github.com/cloudwego/hertz/pkg/network"
	"github.com/cloudwego/hertz/pkg/protocol"
	"github.com/cloudwego/hertz/pkg/protocol/http1"
	"github.com/cloudwego/hertz/pkg/protocol/http1/factory"
	"github.com/cloudwego/hertz/pkg/protocol/http1/resp"
	"github.com/cloudwego/hertz/pkg/protocol/suite"
	"github.com/cloudwego/hertz/pkg/route"

	"github.com/liveedge/liveedge/gateway/proto"
)

// A request Hertz cannot read — a malformed request line or header, a bad
// chunked body, headers above http.max_header_bytes, a request not read
// within http.read_timeout — is answered by Hertz itself before any handler
// or middleware runs, in plain text ("Error when parsing request"). Hertz
// has no hook for that answer: http1.Server.Serve calls writeErrorResponse,
// whose errorHandler is the fixed defaultErrorHandler (hertz v0.10.4 and its
// main branch of 2026-04, pkg/protocol/http1/server.go), and no server
// option reaches it. What Hertz does allow is a protocol server of one's
// own for HTTP/1.1 (Engine.AddProtocol, a suite.ServerFactory). envelopeHTTP1
// is Hertz's own HTTP/1.1 server inside one that
//   - tells, on the connection, when Hertz is in a handler (the Core's
//     ServeHTTP) or writing the answer of one (until Hertz reads the
//     connection again: a streamed answer may be flushed several times);
//   - drops what Hertz writes outside those — its error answer — save the
//     "100 Continue" interim answer;
//   - and, when Hertz's Serve returns with the error it answered, writes
//     the envelope in its place, with the status Hertz's own answer had
//     (the same error → status mapping as its defaultErrorHandler): 400
//     with 10001, 413 for a body too large, 431 for headers too large, 408
//     for a request not read in time; the connection is then closed, as
//     Hertz closes it.
//
// Nothing parses HTTP here: Hertz reads every request.
type envelopeHTTP1 struct {
	engine    *route.Engine
	maxBody   int // http.max_body_bytes and http.max_header_bytes, for the messages
	maxHeader int
	// refused is told of each request Hertz refused (reason: a bounded
	// label) and of the connection it came on; ended, of a connection that
	// ended with any other error (Hertz's own log of both is muted).
	refused func(reason string, remote net.Addr, err error)
	ended   func(remote net.Addr, err error)
}

var _ suite.ServerFactory = envelopeHTTP1{}

// New is called by Hertz's engine at Run, with the engine's core.
func (f envelopeHTTP1) New(core suite.Core) (protocol.Server, error) {
	inner, err := factory.NewServerFactory(http1OptionOf(f.engine)).New(markCore{core})
	if err != nil {
		return nil, err
	}
	return &envelopeServer{inner: inner, maxBody: f.maxBody, maxHeader: f.maxHeader, refused: f.refused, ended: f.ended}, nil
}

// http1OptionOf is the option Hertz's engine gives its built-in HTTP/1.1
// server (route.newHttp1OptionFromEngine, unexported, in hertz v0.10.4),
// from the engine's exported state. The HTML renderer is left out (the
// engine keeps it unexported; the API renders no HTML templates).
func http1OptionOf(e *route.Engine) *http1.Option {
	o := e.GetOptions()
	opt := &http1.Option{
		StreamRequestBody:             o.StreamRequestBody,
		GetOnly:                       o.GetOnly,
		DisablePreParseMultipartForm:  o.DisablePreParseMultipartForm,
		DisableKeepalive:              o.DisableKeepalive,
		NoDefaultServerHeader:         o.NoDefaultServerHeader,
		MaxRequestBodySize:            o.MaxRequestBodySize,
		MaxHeaderBytes:                o.MaxHeaderBytes,
		IdleTimeout:                   o.IdleTimeout,
		ReadTimeout:                   o.ReadTimeout,
		ServerName:                    e.GetServerName(),
		ContinueHandler:               e.ContinueHandler,
		TLS:                           o.TLS,
		EnableTrace:                   e.IsTraceEnable(),
		HijackConnHandle:              e.HijackConnHandle,
		DisableHeaderNamesNormalizing: o.DisableHeaderNamesNormalizing,
		NoDefaultDate:                 o.NoDefaultDate,
		NoDefaultContentType:          o.NoDefaultContentType,
	}
	// As Hertz does: the standard transport's idle timeout must not be 0.
	if opt.IdleTimeout == 0 && e.GetTransporterName() == "standard" {
		opt.IdleTimeout = -1
	}
	return opt
}

// markCore is the engine's core marking, on the connection, the time Hertz
// spends in a handler.
type markCore struct{ suite.Core }

func (m markCore) ServeHTTP(c context.Context, ctx *app.RequestContext) {
	ec, _ := ctx.GetConn().(*envelopeConn)
	if ec != nil {
		ec.inHandler = true
	}
	m.Core.ServeHTTP(c, ctx)
	if ec != nil {
		ec.inHandler = false
		ec.answering = true // until the connection is read again
		if ctx.GetHijackHandler() != nil {
			ec.hijacked = true // the handler owns the connection after the answer
		}
	}
}

type envelopeServer struct {
	inner     protocol.Server
	maxBody   int
	maxHeader int
	refused   func(reason string, remote net.Addr, err error)
	ended     func(remote net.Addr, err error)
}

func (s *envelopeServer) Serve(c context.Context, conn network.Conn) error {
	ec := &envelopeConn{Conn: conn}
	err := s.inner.Serve(c, ec)
	if err != nil && ec.refused {
		status, reason, e := s.refusal(err)
		if s.refused != nil {
			s.refused(reason, conn.RemoteAddr(), err)
		}
		var r protocol.Response
		r.SetStatusCode(status)
		r.Header.SetContentType("application/json")
		r.SetConnectionClose()
		r.SetBody(envelopeBytes(e))
		_ = conn.SetWriteDeadline(time.Now().Add(httpWriteTimeout))
		if resp.Write(&r, conn) == nil {
			_ = conn.Flush()
		}
	} else if err != nil && s.ended != nil && !quietEnd(err) {
		s.ended(conn.RemoteAddr(), err)
	}
	return err
}

// quietEnd: err is how every kept-alive connection ends (closed by the
// client, idle past the timeout) or a hijack — what Hertz itself does not
// log either (route.logError).
func quietEnd(err error) bool {
	return errors.Is(err, errs.ErrShortConnection) || errors.Is(err, errs.ErrIdleTimeout) || errors.Is(err, errs.ErrHijacked)
}

// refusal is the status, a reason label and the envelope of a request Hertz
// refused with err: Hertz's own status (its defaultErrorHandler), code 10001.
func (s *envelopeServer) refusal(err error) (int, string, *proto.Error) {
	var ne *net.OpError
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return http.StatusRequestTimeout, "timeout", proto.BadRequest("request not read whole within http.read_timeout")
	case errors.Is(err, errs.ErrBodyTooLarge):
		return http.StatusRequestEntityTooLarge, "body_too_large", proto.BadRequest("body larger than %d bytes", s.maxBody)
	case errors.Is(err, errs.ErrHeaderTooLarge):
		return http.StatusRequestHeaderFieldsTooLarge, "headers_too_large", proto.BadRequest("request line and headers larger than %d bytes", s.maxHeader)
	}
	return http.StatusBadRequest, "malformed", proto.BadRequest("malformed HTTP request")
}

// continue100 is the interim answer Hertz writes itself, before the body of
// a request with "Expect: 100-continue" (bytestr.StrResponseContinue).
var continue100 = []byte("HTTP/1.1 100 Continue\r\n\r\n")

// envelopeConn is a connection under Hertz's HTTP/1.1 server: what Hertz
// writes outside a handler and its answer (its own error answer) is
// dropped, and refused says one was. Used by one goroutine, the
// connection's Serve (handlers run on it).
type envelopeConn struct {
	network.Conn
	inHandler bool // in the Core's ServeHTTP
	answering bool // writing a handler's answer: from the handler's return to the next read
	hijacked  bool // a handler took the connection over
	dropping  bool // bytes dropped since the last flush
	refused   bool // Hertz's own answer was dropped
	scratch   []byte
}

func (c *envelopeConn) passes() bool { return c.inHandler || c.answering || c.hijacked }

func (c *envelopeConn) Malloc(n int) ([]byte, error) {
	if c.passes() {
		return c.Conn.Malloc(n)
	}
	c.dropping = true
	if cap(c.scratch) < n {
		c.scratch = make([]byte, n)
	}
	return c.scratch[:n], nil
}

func (c *envelopeConn) WriteBinary(b []byte) (int, error) {
	if c.passes() || bytes.Equal(b, continue100) {
		return c.Conn.WriteBinary(b)
	}
	c.dropping = true
	return len(b), nil
}

func (c *envelopeConn) Flush() error {
	if c.dropping && !c.passes() {
		c.dropping, c.refused = false, true
		return nil
	}
	return c.Conn.Flush()
}

// read ends a handler's answer: Hertz reads the connection again (what is
// left of the request's body, the next request) only once the answer is
// written whole. (Release is not a read: Hertz calls it before the
// answer's flush.)
func (c *envelopeConn) read() {
	if !c.inHandler {
		c.answering = false
	}
}

func (c *envelopeConn) Peek(n int) ([]byte, error)       { c.read(); return c.Conn.Peek(n) }
func (c *envelopeConn) Skip(n int) error                 { c.read(); return c.Conn.Skip(n) }
func (c *envelopeConn) Len() int                         { c.read(); return c.Conn.Len() }
func (c *envelopeConn) ReadByte() (byte, error)          { c.read(); return c.Conn.ReadByte() }
func (c *envelopeConn) ReadBinary(n int) ([]byte, error) { c.read(); return c.Conn.ReadBinary(n) }
func (c *envelopeConn) Read(p []byte) (int, error)       { c.read(); return c.Conn.Read(p) }
