package gateway

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// wsReader reads one connection's frames (client → server, RFC 6455) and
// runs the handlers, in order, on a goroutine that exists only while the
// client sends. After ws.read_park_after without input the goroutine ends and
// the socket waits in the node's epoll instance (parkPoller, Linux) with no
// goroutine, stack or buffer: an idle connection costs its state only (and
// the bytes of a frame it has begun sending, if any). When
// bytes arrive the poller starts a goroutine again. Without a poller (other
// systems, not a socket, ws.read_park_after 0) the goroutine waits in the
// runtime's poller for as long as the connection lives, as gws's ReadLoop did.
//
// Every end of the connection goes through the reader: it sees the peer's
// close frame, end of stream or reset, a protocol error, or the socket closed
// or half-closed by the node (kick wakes a parked reader; it then waits no
// longer than the close linger), and calls OnClose once.
type wsReader struct {
	c     *Conn
	nc    net.Conn        // the socket
	rc    syscall.RawConn // nil: not a socket (plain blocking reads, never parked)
	key   uint64          // the poller's name for this reader
	state atomic.Int32    // readerRunning, readerParked
	// kickedAt (unix ns, 0 = not kicked): when the node closed or
	// half-closed the socket; the reader then no longer parks and waits at
	// most closeLinger from it.
	kickedAt atomic.Int64
	armed    bool // registered with the poller (reader goroutine only)
	// waitUntil is the read deadline (unix ns) the last wait set, 0 none
	// (reader goroutine only).
	waitUntil int64
	max       int    // ws.max_frame_hard_bytes: a frame or message above → 1009
	answer    uint16 // the close code answering the client's close frame (peerClose)

	// emit takes each whole message and control frame (r.serve; tests
	// record them).
	emit func(op gws.Opcode, p []byte) error

	// A frame whose bytes have not all arrived: part holds them (nil when
	// none). Fragmented messages gather in cont (nil when none).
	part   []byte
	cont   []byte
	contOp gws.Opcode
	contOn bool

	// RawConn.Read's callback and its results (made once, not per read).
	readFD func(fd uintptr) bool
	dst    []byte
	n      int
	err    error
}

const (
	readerRunning int32 = iota
	readerParked
)

var errNothing = errors.New("no bytes")

func newWSReader(c *Conn, nc net.Conn, early []byte) *wsReader {
	r := &wsReader{c: c, nc: nc, key: readerKeys.Add(1), max: c.srv.cfg.WS.MaxFrameHardBytes}
	r.emit = r.serve
	if sc, ok := nc.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			r.rc = rc
			r.readFD = r.read
		}
	}
	if len(early) > 0 {
		r.part = append([]byte(nil), early...)
	}
	return r
}

var readerKeys atomic.Uint64

// kick tells the reader the node closed (or half-closed) the socket: a
// parked reader is woken to see it, a running one stops parking.
func (r *wsReader) kick() {
	r.kickedAt.CompareAndSwap(0, time.Now().UnixNano())
	r.wake()
}

// kicked reports whether the node closed or half-closed the socket.
func (r *wsReader) kicked() bool { return r.kickedAt.Load() != 0 }

// wake is the poller's (the socket has bytes, or ended) and kick's: a
// parked reader gets a goroutine.
func (r *wsReader) wake() {
	if r.state.CompareAndSwap(readerParked, readerRunning) {
		go r.run(false)
	}
}

// run reads until the connection ends (then OnClose) or parks.
func (r *wsReader) run(open bool) {
	s := r.c.srv
	s.metrics.readers.Add(1)
	defer s.metrics.readers.Add(-1)
	if open {
		s.OnOpen(r.c.ws)
		if len(r.part) > 0 { // what the client sent with the upgrade request
			if err := r.feed(nil); err != nil {
				r.end(err)
				return
			}
		}
	}
	for {
		var buf *[]byte
		var p []byte
		if need := r.need(); need > 0 {
			// A big frame under way: read its rest straight into part.
			p = r.part[len(r.part):need]
		} else {
			buf = readBufPool.Get().(*[]byte)
			p = *buf
		}
		n, err := r.fill(p)
		if err == errNothing {
			if buf != nil {
				readBufPool.Put(buf)
			}
			if r.park() {
				return
			}
			continue
		}
		if n > 0 {
			if buf == nil {
				r.part = r.part[:len(r.part)+n]
				err = r.feed(nil)
			} else {
				err = r.feed(p[:n])
				readBufPool.Put(buf)
			}
		} else if buf != nil {
			readBufPool.Put(buf)
		}
		if err != nil {
			r.end(err)
			return
		}
	}
}

// fill reads what the socket has into p. With nothing to read it waits in
// the runtime's poller for about ws.read_park_after (at least half of it)
// and then reports errNothing (the caller parks); without a poller it waits
// for as long as the connection lives; once kicked, until closeLinger after
// the kick. One read(2) when bytes are there, one more before a wait.
func (r *wsReader) fill(p []byte) (int, error) {
	if r.rc == nil {
		n, err := r.nc.Read(p)
		if n > 0 {
			return n, nil
		}
		return 0, err
	}
	parkAfter := r.c.srv.cfg.WS.ReadParkAfter.D()
	mayPark := parkAfter > 0 && parkPoller() != nil
	r.dst, r.n, r.err = p, 0, nil
	for {
		// A deadline of the reader's own only where parking is possible
		// (and once kicked): otherwise the one the half-close set
		// (corkConn.Close) is left alone. The runtime
		// refuses even a read that would not wait once a deadline passed,
		// so one is in place, and not passed, before every read.
		kicked := r.kicked()
		switch {
		case kicked:
			_ = r.nc.SetReadDeadline(time.Unix(0, r.kickedAt.Load()).Add(closeLinger))
		case mayPark:
			// Set at most twice per parkAfter: a read that finds the
			// deadline at least parkAfter/2 away keeps it (a busy client
			// would otherwise reset a runtime timer per frame).
			if now := time.Now().UnixNano(); now > r.waitUntil-int64(parkAfter/2) {
				r.waitUntil = now + int64(parkAfter)
				_ = r.nc.SetReadDeadline(time.Unix(0, r.waitUntil))
			}
		}
		err := r.rc.Read(r.readFD)
		if err == nil {
			return r.result()
		}
		if mayPark && errors.Is(err, os.ErrDeadlineExceeded) {
			if !r.kicked() {
				return 0, errNothing
			}
			if !kicked { // kicked while waiting: wait out the linger
				continue
			}
		}
		return 0, err
	}
}

func (r *wsReader) result() (int, error) {
	r.dst = nil
	if r.err != nil {
		return 0, r.err
	}
	if r.n == 0 {
		return 0, io.EOF
	}
	return r.n, nil
}

// read is RawConn.Read's callback: one read(2) into dst; with no bytes it
// asks the runtime to wait (returns false).
func (r *wsReader) read(fd uintptr) bool {
	for {
		n, err := syscall.Read(int(fd), r.dst)
		switch {
		case errors.Is(err, syscall.EINTR):
			continue
		case errors.Is(err, syscall.EAGAIN):
			return false
		case err != nil:
			r.err = os.NewSyscallError("read", err)
			return true
		}
		r.n = n
		return true
	}
}

// park hands the socket to the poller and reports true (the goroutine then
// ends), or false when it cannot park (kicked, closed): keep reading. From
// the store of readerParked on, another goroutine may run the reader: this
// one touches nothing of it but what it owns by a successful CAS back.
func (r *wsReader) park() bool {
	pp := parkPoller()
	if pp == nil || r.kicked() {
		return false
	}
	again := r.armed
	if !again {
		pp.track(r) // before the store below: see track
	}
	r.armed = true
	r.waitUntil = 0
	_ = r.nc.SetReadDeadline(time.Time{}) // the wait's, passed: the next read would be refused
	r.state.Store(readerParked)
	var aerr error
	if err := r.rc.Control(func(fd uintptr) { aerr = pp.arm(int(fd), r, again) }); err != nil || aerr != nil {
		if aerr != nil {
			armFailed.Do(func() {
				r.c.srv.log.Warn("epoll: a socket could not be parked; its reader keeps a goroutine", "err", aerr)
			})
		}
		// Closed under us (the next read says so) or not registered: keep
		// reading, unless a kick took over.
		if !r.state.CompareAndSwap(readerParked, readerRunning) {
			return true
		}
		r.armed = again
		return false
	}
	if r.kicked() && r.state.CompareAndSwap(readerParked, readerRunning) {
		return false // kicked in between; the poller's event, if any, finds it running
	}
	return true
}

// need is how far part may be filled by the next read when it holds the
// start of a frame bigger than readBufSize (0: read into a pooled buffer).
// part grows as the frame's bytes arrive (doubling), not to the size its
// header declares: a client that declares a big frame and sends little
// pins little.
func (r *wsReader) need() int {
	if len(r.part) == 0 {
		return 0
	}
	h, err := parseFrameHeader(r.part, r.max)
	if err != nil || h.size <= readBufSize {
		return 0
	}
	if len(r.part)+readBufSize > cap(r.part) && cap(r.part) < h.size {
		np := make([]byte, len(r.part), min(h.size, max(2*cap(r.part), len(r.part)+readBufSize)))
		copy(np, r.part)
		r.part = np
	}
	return min(h.size, cap(r.part))
}

// frameHeader is a parsed client frame header.
type frameHeader struct {
	fin    bool
	op     gws.Opcode
	key    [4]byte
	hdr    int // header bytes
	size   int // header + payload bytes
	length int // payload bytes
}

// Reasons a client frame is refused (close 1002, or 1009 for its size).
var (
	errFrameTooBig   = &gws.CloseError{Code: proto.CloseTooBig, Reason: []byte("frame too big")}
	errRSV           = &gws.CloseError{Code: 1002, Reason: []byte("reserved bits set")}
	errUnmasked      = &gws.CloseError{Code: 1002, Reason: []byte("client frame not masked")}
	errOpcode        = &gws.CloseError{Code: 1002, Reason: []byte("unknown opcode")}
	errControl       = &gws.CloseError{Code: 1002, Reason: []byte("bad control frame")}
	errContinuation  = &gws.CloseError{Code: 1002, Reason: []byte("bad continuation")}
	errMessageTooBig = &gws.CloseError{Code: proto.CloseTooBig, Reason: []byte("message too big")}

	refusals = [...]*gws.CloseError{errFrameTooBig, errMessageTooBig, errRSV, errUnmasked, errOpcode, errControl, errContinuation}
)

// parseFrameHeader parses the header at the start of b. size 0 with a nil
// error: the header is not whole yet. The frame's declared length is checked
// against max before its payload is read; the other checks follow gws's order.
func parseFrameHeader(b []byte, max int) (frameHeader, error) {
	var h frameHeader
	if len(b) < 2 {
		return h, nil
	}
	h.fin = b[0]&0x80 != 0
	h.op = gws.Opcode(b[0] & 0x0f)
	masked := b[1]&0x80 != 0
	code := int(b[1] & 0x7f)
	h.hdr = 2
	length := uint64(code)
	switch code {
	case 126:
		if len(b) < 4 {
			return h, nil
		}
		length, h.hdr = uint64(binary.BigEndian.Uint16(b[2:])), 4
	case 127:
		if len(b) < 10 {
			return h, nil
		}
		length, h.hdr = binary.BigEndian.Uint64(b[2:]), 10
	}
	if length > uint64(max) {
		return h, errFrameTooBig
	}
	if b[0]&0x70 != 0 {
		return h, errRSV
	}
	if !masked {
		return h, errUnmasked
	}
	switch h.op {
	case gws.OpcodeContinuation, gws.OpcodeText, gws.OpcodeBinary:
	case gws.OpcodeCloseConnection, gws.OpcodePing, gws.OpcodePong:
		if !h.fin || code > 125 {
			return h, errControl
		}
	default:
		return h, errOpcode
	}
	if len(b) < h.hdr+4 {
		return h, nil
	}
	copy(h.key[:], b[h.hdr:])
	h.hdr += 4
	h.length = int(length)
	h.size = h.hdr + h.length
	return h, nil
}

// unmask XORs p with key in place, eight bytes at a time.
func unmask(p []byte, key [4]byte) {
	k32 := binary.LittleEndian.Uint32(key[:])
	k64 := uint64(k32) | uint64(k32)<<32
	for len(p) >= 8 {
		binary.LittleEndian.PutUint64(p, binary.LittleEndian.Uint64(p)^k64)
		p = p[8:]
	}
	for i := range p {
		p[i] ^= key[i&3]
	}
}

// feed handles the whole frames in part+b and keeps the rest in part.
func (r *wsReader) feed(b []byte) error {
	data := b
	if len(r.part) > 0 {
		r.part = append(r.part, b...)
		data = r.part
	}
	for len(data) > 0 {
		h, err := parseFrameHeader(data, r.max)
		if err != nil {
			return err
		}
		if h.size != 0 && h.op == gws.OpcodeContinuation && r.contOn && len(r.cont)+h.length > r.max {
			return errMessageTooBig // known from the header: its payload is not awaited
		}
		if h.size == 0 || len(data) < h.size {
			break
		}
		payload := data[h.hdr:h.size]
		unmask(payload, h.key)
		data = data[h.size:]
		if err := r.frame(h, payload); err != nil {
			return err
		}
	}
	switch {
	case len(data) == 0:
		r.part = nil
	case len(r.part) > 0:
		// The unfinished frame moves to the front of part.
		n := copy(r.part, data)
		r.part = r.part[:n]
		if cap(r.part) > readBufSize && n < cap(r.part)/4 {
			r.part = append([]byte(nil), r.part...)
		}
	default:
		r.part = append([]byte(nil), data...)
	}
	return nil
}

// frame handles one whole frame: control frames and whole messages go to
// emit, fragments are gathered.
func (r *wsReader) frame(h frameHeader, payload []byte) error {
	switch h.op {
	case gws.OpcodePing, gws.OpcodePong, gws.OpcodeCloseConnection:
		return r.emit(h.op, payload)
	case gws.OpcodeContinuation:
		if !r.contOn {
			return errContinuation
		}
		if len(r.cont)+len(payload) > r.max {
			return errMessageTooBig
		}
		r.cont = append(r.cont, payload...)
		if !h.fin {
			return nil
		}
		msg := r.cont
		r.cont, r.contOn = nil, false
		return r.emit(r.contOp, msg)
	}
	if r.contOn {
		return errContinuation
	}
	if !h.fin {
		r.contOn, r.contOp = true, h.op
		r.cont = append(make([]byte, 0, len(payload)), payload...)
		return nil
	}
	return r.emit(h.op, payload)
}

// serve runs the handlers for a control frame or a message.
func (r *wsReader) serve(op gws.Opcode, p []byte) error {
	s, ws := r.c.srv, r.c.ws
	switch op {
	case gws.OpcodePing:
		s.OnPing(ws, p)
	case gws.OpcodePong:
		s.OnPong(ws, p)
	case gws.OpcodeCloseConnection:
		return r.peerClose(p)
	default:
		s.serveFrame(r.c, op, p)
	}
	return nil
}

// peerClose takes the client's close frame: end answers it as gws does,
// its code echoed when it may be sent, 1002 for one that may not, 1000 for
// none.
func (r *wsReader) peerClose(p []byte) error {
	var code, answer uint16
	switch len(p) {
	case 0:
		answer = 1000
	case 1:
		code, answer = uint16(p[0]), 1002
	default:
		code = binary.BigEndian.Uint16(p)
		switch {
		case code == 1004 || code == 1005 || code == 1006 || code == 1014 || code == 1015,
			code < 1000 || code >= 5000 || (code >= 1016 && code < 3000):
			answer = 1002
		case code < 1016:
			answer = 1000
		default:
			answer = code
		}
	}
	r.answer = answer
	reason := []byte(nil)
	if len(p) > 2 {
		reason = append(reason, p[2:]...)
	}
	return &gws.CloseError{Code: code, Reason: reason}
}

// end finishes the connection after err and calls OnClose: a refused frame
// is answered with its close code; the client's close frame as peerClose
// decided; end of stream, a reset or a closed socket get gws's 1000 (a
// no-op when a close frame went out already). While the connection's lane
// serves requests read before the end, the close frame and OnClose wait
// for them: they are served, as on the reader (their replies, queued for
// the writer, may be dropped by the close, as before).
func (r *wsReader) end(err error) {
	if pp := parkPoller(); pp != nil {
		pp.forget(r)
	}
	r.part, r.cont = nil, nil
	c, answer := r.c, r.answer
	fin := func() {
		switch ce := refusal(err); {
		case ce != nil:
			_ = c.ws.WriteClose(ce.Code, ce.Reason)
		case answer != 0:
			_ = c.ws.WriteClose(answer, nil)
		case !errors.As(err, new(*gws.CloseError)):
			_ = c.ws.WriteClose(1000, nil)
		}
		c.srv.OnClose(c.ws, err)
	}
	if !c.afterLane(fin) {
		fin()
	}
}

// refusal is err when it is one of the reader's refusals of a frame.
func refusal(err error) *gws.CloseError {
	for _, e := range refusals {
		if err == error(e) {
			return e
		}
	}
	return nil
}

// armFailed: the first failure to park a socket is logged.
var armFailed sync.Once

// readPoller parks readers (poll_linux.go).
type readPoller interface {
	// track enters r, before its first park.
	track(r *wsReader)
	// arm registers fd for one wake-up of r (again: registered before).
	arm(fd int, r *wsReader, again bool) error
	// forget drops r: its connection ended.
	forget(r *wsReader)
}
