package gateway

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"
)

// apiListener is the HTTP API's listener: at most max connections open at
// once (beyond that Accept waits for one to close, leaving the new ones in
// the kernel's backlog), and a failed accept (out of files) retried after a
// growing pause, as the WebSocket listener does — Hertz's standard transport
// stops serving for good on any Accept error but "closed".
type apiListener struct {
	net.Listener
	log   *slog.Logger
	slots chan struct{}
	done  chan struct{}
	once  sync.Once
}

func newAPIListener(ln net.Listener, max int, log *slog.Logger) *apiListener {
	return &apiListener{Listener: ln, log: log, slots: make(chan struct{}, max), done: make(chan struct{})}
}

func (l *apiListener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	var pause time.Duration
	for {
		c, err := l.Listener.Accept()
		if err == nil {
			return &apiConn{Conn: c, slots: l.slots}, nil
		}
		if errors.Is(err, net.ErrClosed) {
			<-l.slots
			return nil, err
		}
		pause = min(max(2*pause, 5*time.Millisecond), time.Second)
		l.log.Debug("http accept", "err", err, "retry_in", pause)
		select {
		case <-time.After(pause):
		case <-l.done:
			<-l.slots
			return nil, net.ErrClosed
		}
	}
}

func (l *apiListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// open is how many connections hold a slot.
func (l *apiListener) open() int { return len(l.slots) }

// apiConn gives its slot back once, at its first Close.
type apiConn struct {
	net.Conn
	slots chan struct{}
	once  sync.Once
}

func (c *apiConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { <-c.slots })
	return err
}
