package redistest

import (
	"bytes"
	"net"
	"sync"
	"testing"
	"time"
)

// Proxy is a TCP proxy between a client and a real redis-server that injects
// network faults: it can let a command through to Redis but lose its reply,
// and refuse connections for a while. It is a fault injector on the wire,
// not a fake Redis: every byte that gets through is served by redis-server.
type Proxy struct {
	Addr   string
	target string
	ln     net.Listener
	tb     testing.TB

	mu          sync.Mutex
	conns       map[net.Conn]struct{} // both sides of every proxied connection
	refuseUntil time.Time
	pattern     []byte        // armed: lose the reply of the first command containing it
	refuseFor   time.Duration // and then refuse connections this long
	fired       int
	slow        []byte        // every client write containing it waits slowFor
	slowFor     time.Duration // before it is passed on (a slow network, an overloaded Redis)
	slowed      int           // writes held
	mangle      []byte        // armed: the first reply containing it gets mangleTo
	mangleTo    []byte        // in its place (same length: the RESP framing holds)
	wg          sync.WaitGroup
}

// StartProxy proxies a free 127.0.0.1 port to target; it stops when the test
// ends.
func StartProxy(tb testing.TB, target string) *Proxy {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, tb: tb, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	tb.Cleanup(p.Close)
	return p
}

// LoseReply arms the proxy: the next client write that contains pattern (a
// command name such as "EVALSHA") is delivered to Redis, which runs it, but
// its reply never reaches the client; at that moment every connection is cut
// and new ones are refused for refuse (Redis looks unreachable).
func (p *Proxy) LoseReply(pattern string, refuse time.Duration) {
	p.mu.Lock()
	p.pattern, p.refuseFor = []byte(pattern), refuse
	p.mu.Unlock()
}

// MangleReply arms the proxy: the first reply from Redis that contains
// from reaches the client with to (of the same length, so the reply's
// framing holds) in its place — Redis ran the command, the client reads a
// reply it may not understand.
func (p *Proxy) MangleReply(from, to string) {
	if len(from) != len(to) {
		p.tb.Fatalf("redistest: MangleReply %q → %q: lengths differ", from, to)
	}
	p.mu.Lock()
	p.mangle, p.mangleTo = []byte(from), []byte(to)
	p.mu.Unlock()
}

// Refuse cuts every connection and refuses new ones for d: Redis
// unreachable for a while, no command in flight reaching it (unlike
// LoseReply, nothing runs).
func (p *Proxy) Refuse(d time.Duration) {
	p.mu.Lock()
	p.refuseUntil = time.Now().Add(d)
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
}

// Slow holds every client write that contains pattern d before passing it
// on, until Slow("", 0): a Redis (or network) slow for those commands. The
// writes behind a held one on its connection wait too, as on a real socket.
func (p *Proxy) Slow(pattern string, d time.Duration) {
	p.mu.Lock()
	p.slow, p.slowFor = []byte(pattern), d
	if pattern == "" {
		p.slow = nil
	}
	p.mu.Unlock()
}

// Slowed tells how many client writes Slow has held (or is holding).
func (p *Proxy) Slowed() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.slowed
}

// Fired tells how many times an armed fault has been injected.
func (p *Proxy) Fired() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fired
}

// Close stops the proxy and cuts every connection.
func (p *Proxy) Close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		refusing := time.Now().Before(p.refuseUntil)
		p.mu.Unlock()
		if refusing {
			_ = c.Close()
			continue
		}
		s, err := net.DialTimeout("tcp", p.target, time.Second)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[s] = struct{}{}, struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.clientToServer(c, s)
		go p.serverToClient(c, s)
	}
}

func (p *Proxy) drop(c, s net.Conn) {
	_ = c.Close()
	_ = s.Close()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, s)
	p.mu.Unlock()
}

func (p *Proxy) clientToServer(c, s net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if err != nil {
			p.drop(c, s)
			return
		}
		p.mu.Lock()
		hit := p.pattern != nil && bytes.Contains(buf[:n], p.pattern)
		if hit {
			p.pattern = nil
			p.fired++
			p.refuseUntil = time.Now().Add(p.refuseFor)
		}
		var wait time.Duration
		if p.slow != nil && bytes.Contains(buf[:n], p.slow) {
			wait = p.slowFor
			p.slowed++
		}
		p.mu.Unlock()
		time.Sleep(wait)
		if hit {
			// The client's side goes first, so the reply has nowhere to go;
			// the server's side stays open until Redis has answered (it has
			// run the command), then serverToClient drops it.
			_ = c.Close()
			p.cutOthers(c, s)
		}
		if _, err := s.Write(buf[:n]); err != nil {
			p.drop(c, s)
			return
		}
		if hit {
			return
		}
	}
}

// cutOthers closes every connection but the pair (c, s).
func (p *Proxy) cutOthers(c, s net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for x := range p.conns {
		if x != c && x != s {
			_ = x.Close()
		}
	}
}

func (p *Proxy) serverToClient(c, s net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := s.Read(buf)
		if err != nil {
			p.drop(c, s)
			return
		}
		p.mu.Lock()
		if i := bytes.Index(buf[:n], p.mangle); p.mangle != nil && i >= 0 {
			copy(buf[i:], p.mangleTo)
			p.mangle = nil
			p.fired++
		}
		p.mu.Unlock()
		if _, err := c.Write(buf[:n]); err != nil {
			p.drop(c, s) // the reply is lost
			return
		}
	}
}
