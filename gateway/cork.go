package gateway

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lxzan/gws"
)

// corkConn is the net.Conn gws writes to. It is the one place every byte the
// connection writes passes through — frames from the connection's writer and
// the control replies gws writes itself (pong, close echo, the close frame of
// a protocol error) — so it is where each write gets its deadline and where
// the socket is closed.
//
// Corking lets the connection's writer put several WebSocket frames on the
// wire with one write(2): between cork and flush, writes (gws frames each
// message and writes it to its net.Conn) collect in a buffer. Writes outside
// a cork pass straight through. Every write and the flush take one mutex, so
// frames written by gws on other goroutines (pong, close) are never
// interleaved inside another frame and keep their order.
//
// Deadlines: every write(2) starts with at least half the write timeout ahead
// of it (the deadline is moved to now + timeout once less than half is left),
// however long the connection has been quiet, so a control reply written
// long after the last data frame never meets a stale deadline.
//
// Direct writes: a room's fan-out may write a frame itself to a connection
// that has nothing queued (writeNow, on the room's goroutine): one
// non-blocking write(2). What the kernel did not take is owed — written
// before any other byte, by the connection's writer — so a slow client never
// blocks the room and the bytes stay in order.
//
// A failed write breaks the stream: a write cut by its deadline may have put
// part of a frame on the wire, and any byte after it (gws writes a 1001
// close frame when a write fails) would be read by the client as the rest
// of that frame. So once a socket write fails nothing more is written (every
// write is refused) and Close closes the socket at once: a client that
// stopped reading for longer than the write timeout reads the whole frames
// it was sent, then the connection's end with no close frame (1006).
//
// Closing: the close frame is the last frame of the stream. Close (called
// by gws right after writing it) first writes what a cork collected — the
// close frame is among it when gws closed while the writer was corked — so
// the FIN never overtakes it, and once the close frame has been written
// (or collected) a direct write is refused (busy: the caller queues it, and
// the queue goes nowhere). Close does not close the socket at once. Closing with client bytes still unread — the rest of an
// oversized frame, frames of a client that keeps sending — makes the kernel
// answer with RST, which destroys the close frame still in flight. Close
// shuts the write side (FIN after the close frame) and bounds how long the
// socket is still read; finish, once the reader has stopped, discards what the
// client still sends (bounded in time and bytes) and closes the socket.
type corkConn struct {
	net.Conn
	timeout time.Duration // ws.write_timeout

	mu       sync.Mutex
	corked   bool
	buf      []byte
	deadline time.Time // the write deadline last set by write (under mu)
	owed     []byte    // the rest of a direct write, written before anything else (under mu)

	// raw is the socket for direct writes; nil when the net.Conn is not a
	// socket (then nothing is written directly).
	raw syscall.RawConn
	nb  nbWrite // the direct write under way (under mu)

	// framed: the handshake's response is written, every Write is now one
	// whole frame of gws (set once, before the reader starts). closeSent:
	// the close frame was written or collected (under mu).
	framed    bool
	closeSent bool
	broken    bool // a socket write failed: nothing more is written (under mu)

	stale   atomic.Bool // a deadline was set from outside: refresh on the next write
	closing atomic.Bool
	// lingerUntil (unix ns) ends the linger Close began; finish reads no
	// longer (the reader may have moved the socket's read deadline since).
	lingerUntil atomic.Int64

	// kick wakes the connection's reader once the socket is closed or
	// half-closed here (a parked reader would not notice); set once, right
	// after the upgrade, before the reader starts.
	kick func()
}

// maxCorkKeep is the largest buffer kept between flushes.
const maxCorkKeep = 64 << 10

// Lingering after the close frame: at most closeLinger and closeLingerBytes
// of client input are read and discarded before the socket is closed.
const (
	closeLinger      = 2 * time.Second
	closeLingerBytes = 4 << 20
)

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.framed && len(p) > 0 && gws.Opcode(p[0]&0x0f) == gws.OpcodeCloseConnection {
		c.closeSent = true
	}
	if c.broken {
		return 0, errBrokenStream
	}
	if c.corked {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	c.freshDeadline()
	if err := c.payOwed(); err != nil {
		return 0, err
	}
	return c.send(p)
}

// errBrokenStream refuses a write after a failed one.
var errBrokenStream = errors.New("websocket stream broken by a failed write")

// send writes p to the socket (under mu, the deadline set); a failure
// breaks the stream.
func (c *corkConn) send(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if err != nil {
		c.broken = true
	}
	return n, err
}

// newCorkConn wraps the socket nc.
func newCorkConn(nc net.Conn, timeout time.Duration) *corkConn {
	c := &corkConn{Conn: nc, timeout: timeout}
	if sc, ok := nc.(syscall.Conn); ok && directWrites {
		if raw, err := sc.SyscallConn(); err == nil {
			c.raw = raw
		}
	}
	return c
}

// payOwed writes what a direct write left, blocking (under mu, with the
// write deadline set).
func (c *corkConn) payOwed() error {
	if len(c.owed) == 0 {
		return nil
	}
	if c.broken {
		return errBrokenStream
	}
	_, err := c.send(c.owed)
	c.owed = emptied(c.owed)
	return err
}

// emptied is b emptied for reuse, or nil when it is too large to keep.
func emptied(b []byte) []byte {
	if cap(b) > maxCorkKeep {
		return nil
	}
	return b[:0]
}

// settle writes what a direct write left (the connection's writer does,
// before looking at its queue).
func (c *corkConn) settle() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.owed) == 0 {
		return nil
	}
	c.freshDeadline()
	return c.payOwed()
}

// writeNow writes b with one non-blocking write; what the socket does not
// take now is kept as owed (left reports it). The caller holds the
// connection's writer role, so nothing is corked or owed already. busy: b
// was not taken — a frame gws writes itself (a pong, a close echo) holds
// the connection, and may block on a full socket up to the write timeout;
// a room's fan-out, which waits for every direct write, must not wait for
// it (the caller queues b instead).
func (c *corkConn) writeNow(b []byte) (left, busy bool, err error) {
	if !c.mu.TryLock() {
		return false, true, nil
	}
	defer c.mu.Unlock()
	if c.closeSent {
		return false, true, nil // nothing goes after the close frame
	}
	if c.broken {
		return false, false, errBrokenStream
	}
	if c.corked || len(c.owed) > 0 {
		c.owed = append(c.owed, b...)
		return true, false, nil
	}
	// The socket's write deadline may have passed while the connection was
	// quiet, and the runtime refuses any write after it, this one too.
	c.freshDeadline()
	n, err := c.tryWrite(b)
	if err != nil {
		c.broken = true
		return false, false, err
	}
	if n < len(b) {
		c.owed = append(c.owed, b[n:]...)
		return true, false, nil
	}
	return false, false, nil
}

// freshDeadline gives the write about to start at least half the write
// timeout (setting a deadline is not free, and a write that blocks for half
// the timeout is already suspect). Under mu.
func (c *corkConn) freshDeadline() {
	if c.timeout <= 0 {
		return
	}
	now := time.Now()
	if !c.stale.Swap(false) && c.deadline.Sub(now) > c.timeout/2 {
		return
	}
	c.deadline = now.Add(c.timeout)
	_ = c.Conn.SetWriteDeadline(c.deadline)
}

// refreshNext makes the next write start with a whole write timeout.
func (c *corkConn) refreshNext() { c.stale.Store(true) }

// SetDeadline is net.Conn's (gws sets and clears one around the handshake);
// the next write sets its own write deadline again.
func (c *corkConn) SetDeadline(t time.Time) error {
	err := c.Conn.SetDeadline(t)
	c.stale.Store(true)
	return err
}

// SetWriteDeadline is net.Conn's; the next write sets its own again.
func (c *corkConn) SetWriteDeadline(t time.Time) error {
	err := c.Conn.SetWriteDeadline(t)
	c.stale.Store(true)
	return err
}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// flush writes what collected since cork in one write and uncorks.
func (c *corkConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushLocked()
}

// flushLocked is flush under mu.
func (c *corkConn) flushLocked() error {
	c.corked = false
	if len(c.buf) == 0 {
		return nil
	}
	if c.broken {
		c.buf = emptied(c.buf)
		return errBrokenStream
	}
	c.freshDeadline()
	if err := c.payOwed(); err != nil {
		c.buf = emptied(c.buf)
		return err
	}
	_, err := c.send(c.buf)
	c.buf = emptied(c.buf)
	return err
}

// Close half-closes the socket (see the type's comment); finish closes it.
func (c *corkConn) Close() error {
	if !c.closing.CompareAndSwap(false, true) {
		return nil
	}
	tc, ok := c.Conn.(*net.TCPConn)
	if !ok {
		return c.closeNow()
	}
	// What a cork collected goes before the FIN: gws may close (a close
	// echo, a refused frame) between two frames of the writer's batch, and
	// then its close frame is in the buffer too. The writer's later frames
	// are refused by gws (closed) and its flush finds nothing.
	c.mu.Lock()
	c.closeSent = true
	err := c.flushLocked()
	if err == nil && c.broken {
		err = errBrokenStream // no FIN after a cut frame: close at once
	}
	c.mu.Unlock()
	if err != nil {
		_ = c.closeNow()
		return err
	}
	err = tc.CloseWrite()
	until := time.Now().Add(closeLinger)
	c.lingerUntil.Store(until.UnixNano())
	_ = tc.SetReadDeadline(until)
	c.kicked()
	return err
}

// closeNow closes the socket at once (a failed write, a shutdown cut short):
// the reader sees it and the connection ends.
func (c *corkConn) closeNow() error {
	err := c.Conn.Close()
	c.kicked()
	return err
}

func (c *corkConn) kicked() {
	if c.kick != nil {
		c.kick()
	}
}

// finish closes the socket once the reader has stopped reading frames: what
// the client still sends is read and discarded until it closes its side, the
// linger deadline set by Close passes or closeLingerBytes were read.
func (c *corkConn) finish() {
	if c.closing.CompareAndSwap(false, true) {
		_ = c.Conn.Close() // the reader ended without a close frame written
		return
	}
	if _, ok := c.Conn.(*net.TCPConn); ok {
		_ = c.Conn.SetReadDeadline(time.Unix(0, c.lingerUntil.Load()))
		_, _ = io.CopyN(io.Discard, c.Conn, closeLingerBytes)
	}
	_ = c.Conn.Close()
}
