package gateway

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"github.com/lxzan/gws"
)

// readBufSize is the buffer a connection reads its socket into: taken from
// readBufPool when bytes arrive and given back once they are all consumed,
// so an idle connection holds none (it would otherwise hold 4 KiB for life).
const readBufSize = 4096

// gwsBufSize is the size of the bufio.Reader gws reads frames through (it
// wants one): bufio's minimum. Reads of a frame's payload of at least this
// size bypass it; the bytes themselves wait in the pooled buffer.
const gwsBufSize = 16

var readBufPool = sync.Pool{New: func() any { b := make([]byte, readBufSize); return &b }}

// lazyReader reads a socket for gws without holding a buffer while the
// connection is idle: it waits for readability with no buffer (RawConn.Read
// calls back only when the kernel has bytes), then reads what is there into a
// pooled buffer and serves it until it is drained. Read deadlines and Close
// interrupt the wait as they do a plain Read.
//
// One reader only (gws's read loop); not safe for concurrent use.
type lazyReader struct {
	conn net.Conn
	rc   syscall.RawConn // nil: not a socket, plain conn.Read

	buf  *[]byte // pooled; nil when drained
	r, w int     // unread bytes are (*buf)[r:w]

	// The callback RawConn.Read calls and its results (a method value made
	// once, not a closure per read).
	readFD func(fd uintptr) bool
	n      int
	err    error
}

// newLazyReader reads conn; early are bytes already read from it (a client
// that sent before the handshake's answer) and are served first.
func newLazyReader(conn net.Conn, early []byte) *lazyReader {
	l := &lazyReader{conn: conn}
	if sc, ok := conn.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			l.rc = rc
			l.readFD = l.read
		}
	}
	if len(early) > 0 { // what net/http had buffered: at most its 4 KiB
		b := readBufPool.Get().(*[]byte)
		if len(early) > len(*b) {
			readBufPool.Put(b)
			nb := make([]byte, len(early)) // not pooled: release drops it
			b = &nb
		}
		l.buf, l.r, l.w = b, 0, copy(*b, early)
	}
	return l
}

func (l *lazyReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if l.buf != nil {
		n := copy(p, (*l.buf)[l.r:l.w])
		l.r += n
		if l.r == l.w {
			l.release()
		}
		return n, nil
	}
	if l.rc == nil || len(p) >= readBufSize {
		return l.conn.Read(p) // a large read goes straight into p
	}
	l.n, l.err = 0, nil
	if err := l.rc.Read(l.readFD); err != nil {
		l.release()
		return 0, err // deadline, closed
	}
	if l.err != nil {
		l.release()
		return 0, l.err
	}
	if l.n == 0 {
		l.release()
		return 0, io.EOF
	}
	l.r, l.w = 0, l.n
	n := copy(p, (*l.buf)[:l.n])
	l.r = n
	if l.r == l.w {
		l.release()
	}
	return n, nil
}

// read is RawConn.Read's callback: it takes a pooled buffer only when the
// read finds bytes (or end of stream, or an error), and asks to wait
// (returns false) with no buffer held when there are none.
func (l *lazyReader) read(fd uintptr) bool {
	b := readBufPool.Get().(*[]byte)
	for {
		n, err := syscall.Read(int(fd), *b)
		switch {
		case errors.Is(err, syscall.EINTR):
			continue
		case errors.Is(err, syscall.EAGAIN):
			readBufPool.Put(b)
			return false
		case err != nil:
			readBufPool.Put(b)
			l.err = os.NewSyscallError("read", err)
			return true
		}
		l.buf, l.n = b, n
		return true
	}
}

// release gives the buffer back to the pool.
func (l *lazyReader) release() {
	if l.buf != nil {
		if len(*l.buf) == readBufSize {
			readBufPool.Put(l.buf)
		}
		l.buf, l.r, l.w = nil, 0, 0
	}
}

// connSession is the gws session storage of a connection: it holds the
// *Conn and nothing else (gws's default is a map and a mutex per connection).
type connSession struct {
	c *Conn
}

var _ gws.SessionStorage = (*connSession)(nil)

func (s *connSession) Len() int {
	if s.c == nil {
		return 0
	}
	return 1
}

func (s *connSession) Load(key string) (any, bool) {
	if key != "c" || s.c == nil {
		return nil, false
	}
	return s.c, true
}

func (s *connSession) Delete(key string) {
	if key == "c" {
		s.c = nil
	}
}

func (s *connSession) Store(key string, value any) {
	if c, ok := value.(*Conn); ok && key == "c" {
		s.c = c
	}
}

func (s *connSession) Range(f func(key string, value any) bool) {
	if s.c != nil {
		f("c", s.c)
	}
}
