package gateway

import (
	"net"
	"sync"
)

// corkConn lets the connection's writer put several WebSocket frames on the
// wire with one write(2): between cork and flush, writes (gws frames each
// message and writes it to its net.Conn) collect in a buffer. Writes outside
// a cork pass straight through. Every write and the flush take one mutex, so
// frames written by gws on other goroutines (pong, close) are never
// interleaved inside another frame and keep their order.
type corkConn struct {
	net.Conn
	mu     sync.Mutex
	corked bool
	buf    []byte
}

// maxCorkKeep is the largest buffer kept between flushes.
const maxCorkKeep = 64 << 10

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.corked {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
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
	c.corked = false
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.buf)
	if cap(c.buf) > maxCorkKeep {
		c.buf = nil
	} else {
		c.buf = c.buf[:0]
	}
	return err
}
