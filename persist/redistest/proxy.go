package redistest

import (
	"bytes"
	"net"
	"strconv"
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
	muted       map[net.Conn]bool     // client sides whose replies go nowhere (a lost reply's)
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
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, tb: tb, conns: map[net.Conn]struct{}{}, muted: map[net.Conn]bool{}}
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
	delete(p.muted, c)
	p.mu.Unlock()
}

// clientToServer passes the client's commands on, whole: LoseReply looks at
// one command at a time (a command split over two reads, or sharing one
// with others, is matched as itself), and a lost reply's command reaches
// Redis entire, with the commands before it and none after it. Slow holds
// what one read brought whole, as a slow network would.
func (p *Proxy) clientToServer(c, s net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 0, 64<<10)
	chunk := make([]byte, 64<<10)
	for {
		n, err := c.Read(chunk)
		if err != nil {
			p.drop(c, s)
			return
		}
		buf = append(buf, chunk[:n]...)
		whole, hit := 0, -1 // bytes of whole commands; the end of the one whose reply is lost
		p.mu.Lock()
		for {
			end := commandEnd(buf[whole:])
			if end < 0 {
				break
			}
			if p.pattern != nil && bytes.Contains(buf[whole:whole+end], p.pattern) {
				p.pattern = nil
				p.fired++
				p.refuseUntil = time.Now().Add(p.refuseFor)
				hit = whole + end
			}
			whole += end
			if hit >= 0 {
				break
			}
		}
		var wait time.Duration
		if p.slow != nil && bytes.Contains(buf[:whole], p.slow) {
			wait = p.slowFor
			p.slowed++
		}
		p.mu.Unlock()
		time.Sleep(wait)
		if hit >= 0 {
			// The reply has nowhere to go (muted), and the command is on
			// its way to Redis before the client sees its connection end:
			// what the client sends next on another connection (a claim's
			// release, a resolve) comes after it, as when a reply is lost
			// on the wire. The server's side stays open (its replies read
			// and thrown away) until the proxy closes. (Closing the
			// client's side first let a command sent after the cut
			// overtake the lost one.)
			p.mu.Lock()
			p.muted[c] = true
			p.mu.Unlock()
			_, err := s.Write(buf[:whole])
			_ = c.Close()
			p.cutOthers(c, s)
			if err != nil {
				p.drop(c, s)
			}
			return
		}
		if whole > 0 {
			if _, err := s.Write(buf[:whole]); err != nil {
				p.drop(c, s)
				return
			}
		}
		buf = append(buf[:0], buf[whole:]...)
	}
}

// commandEnd is the length of the first whole command in b (RESP: an array
// of bulk strings, or an inline command ending in a newline), -1 when b
// holds only part of one. Bytes that are not RESP count as an inline line.
func commandEnd(b []byte) int {
	line := func(from int) int { // the index after from's line, -1: incomplete
		if i := bytes.IndexByte(b[from:], '\n'); i >= 0 {
			return from + i + 1
		}
		return -1
	}
	if len(b) == 0 {
		return -1
	}
	if b[0] != '*' {
		return line(0)
	}
	at := line(0)
	if at < 0 {
		return -1
	}
	count, err := strconv.Atoi(string(bytes.TrimSpace(b[1:at])))
	if err != nil || count < 0 {
		return at // not RESP: passed on as a line, Redis answers it
	}
	for range count {
		next := line(at)
		if next < 0 {
			return -1
		}
		if b[at] != '$' {
			return next
		}
		size, err := strconv.Atoi(string(bytes.TrimSpace(b[at+1 : next])))
		if err != nil || size < 0 {
			return next
		}
		at = next + size + 2 // the bulk string and its CRLF
		if at > len(b) {
			return -1
		}
	}
	return at
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
		muted := p.muted[c]
		if i := bytes.Index(buf[:n], p.mangle); p.mangle != nil && i >= 0 {
			copy(buf[i:], p.mangleTo)
			p.mangle = nil
			p.fired++
		}
		p.mu.Unlock()
		if muted {
			continue // a lost reply (or one before it): read and thrown away
		}
		if _, err := c.Write(buf[:n]); err != nil {
			p.drop(c, s) // the reply is lost
			return
		}
	}
}
