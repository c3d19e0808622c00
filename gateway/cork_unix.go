//go:build unix

package gateway

import "syscall"

// directWrites: this platform's sockets take the non-blocking write of
// corkConn.writeNow.
const directWrites = true

// nbWrite is the state of one non-blocking write: its function is made once
// per connection (a closure made per write would be an allocation each).
type nbWrite struct {
	b   []byte
	n   int
	err error
	fn  func(fd uintptr) bool
}

// run writes b with write(2) until the kernel takes no more, never waiting
// for the socket to become writable (the socket is non-blocking).
func (w *nbWrite) run(fd uintptr) bool {
	for w.n < len(w.b) {
		m, e := syscall.Write(int(fd), w.b[w.n:])
		if m > 0 {
			w.n += m
		}
		if e == syscall.EINTR {
			continue
		}
		if e != nil {
			if e != syscall.EAGAIN {
				w.err = e
			}
			break
		}
		if m <= 0 {
			break
		}
	}
	return true // done: never wait for the socket
}

// tryWrite writes what the socket takes of b now: n is what was written (0
// when its buffer is full). Under mu.
func (c *corkConn) tryWrite(b []byte) (n int, err error) {
	w := &c.nb
	if w.fn == nil {
		w.fn = w.run
	}
	w.b, w.n, w.err = b, 0, nil
	cerr := c.raw.Write(w.fn)
	n, err = w.n, w.err
	w.b, w.err = nil, nil
	if cerr != nil {
		return n, cerr
	}
	return n, err
}
