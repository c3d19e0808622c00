package gateway

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// apiListener is the HTTP API's listener: at most max connections open at
// once, and a failed accept (out of files) retried after a growing pause,
// as the WebSocket listener does — Hertz's standard transport stops serving
// for good on any Accept error but "closed".
//
// At the bound, the connection that has waited longest in a read — a
// keep-alive connection between requests, or one that sent nothing yet —
// is closed to make room once it has waited apiIdleAfter (HTTP lets a
// server close an idle keep-alive connection; its client opens another).
// Without that, a few clients each making one request a minute kept every
// slot for the idle timeout, and the load balancer's /healthz and the
// provider's /pay/notify waited behind them. A connection whose request is
// being handled (not in a read) is never closed for room; when every slot
// is such a one, a new connection waits in the backlog.
type apiListener struct {
	net.Listener
	log   *slog.Logger
	max   int
	done  chan struct{}
	once  sync.Once
	freed chan struct{} // cap 1: a slot was given back

	mu    sync.Mutex
	n     int // slots taken: open connections and the one being accepted
	conns map[*apiConn]struct{}
}

// apiIdleAfter is how long a connection must have waited in a read before
// it may be closed to make room for a new one.
const apiIdleAfter = time.Second

func newAPIListener(ln net.Listener, max int, log *slog.Logger) *apiListener {
	return &apiListener{Listener: ln, log: log, max: max, done: make(chan struct{}),
		freed: make(chan struct{}, 1), conns: make(map[*apiConn]struct{})}
}

func (l *apiListener) Accept() (net.Conn, error) {
	if err := l.slot(); err != nil {
		return nil, err
	}
	var pause time.Duration
	for {
		c, err := l.Listener.Accept()
		if err == nil {
			ac := &apiConn{Conn: c, l: l}
			l.mu.Lock()
			l.conns[ac] = struct{}{}
			l.mu.Unlock()
			return ac, nil
		}
		if errors.Is(err, net.ErrClosed) {
			l.give()
			return nil, err
		}
		pause = min(max(2*pause, 5*time.Millisecond), time.Second)
		l.log.Debug("http accept", "err", err, "retry_in", pause)
		select {
		case <-time.After(pause):
		case <-l.done:
			l.give()
			return nil, net.ErrClosed
		}
	}
}

// slot takes a slot for the next connection: a free one, or one an idle
// connection gives up (closed), or it waits for one.
func (l *apiListener) slot() error {
	for {
		l.mu.Lock()
		if l.n < l.max {
			l.n++
			l.mu.Unlock()
			return nil
		}
		victim := l.idlest(time.Now().UnixNano())
		l.mu.Unlock()
		if victim != nil {
			_ = victim.Close() // gives its slot back
			continue
		}
		select {
		case <-l.freed:
		case <-time.After(apiIdleAfter / 4): // a connection may have gone idle
		case <-l.done:
			return net.ErrClosed
		}
	}
}

// idlest is the connection waiting longest in a read, if it has waited at
// least apiIdleAfter (nil: none). Under mu.
func (l *apiListener) idlest(now int64) *apiConn {
	var victim *apiConn
	oldest := now - int64(apiIdleAfter)
	for c := range l.conns {
		if at := c.reading.Load(); at != 0 && at <= oldest {
			victim, oldest = c, at
		}
	}
	return victim
}

// give gives a slot back.
func (l *apiListener) give() {
	l.mu.Lock()
	l.n--
	l.mu.Unlock()
	select {
	case l.freed <- struct{}{}:
	default:
	}
}

func (l *apiListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// open is how many slots are taken.
func (l *apiListener) open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// apiConn gives its slot back once, at its first Close, and tells since
// when it has been waiting in a read (reading, unix ns; 0: not in a read).
type apiConn struct {
	net.Conn
	l       *apiListener
	reading atomic.Int64
	once    sync.Once
}

func (c *apiConn) Read(p []byte) (int, error) {
	c.reading.Store(time.Now().UnixNano())
	n, err := c.Conn.Read(p)
	c.reading.Store(0)
	return n, err
}

func (c *apiConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
		c.l.give()
	})
	return err
}
