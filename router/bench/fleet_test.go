package bench

// The client fleet: a child process (this test binary re-executed with
// LIVEEDGE_FLEET=1 -test.run=^TestFleetHelper$) that holds N real WebSocket
// client connections to the server under test and counts what they receive.
//
// Line protocol, parent → child on stdin, child → parent on stdout (lines the
// parent does not know, such as the testing package's "PASS", are ignored):
//
//	child:  ready <connect-ms>          all N connected (and joined, for LiveEdge)
//	parent: expect <K>                  K = cumulative pushes every connection must reach
//	child:  armed
//	child:  done                        every connection has received >= K pushes
//	parent: stats
//	child:  stats <samples> <p50> <p90> <p99> <max> <frames> <pushes>
//	                                    latencies in ns since the previous stats;
//	                                    frames / pushes received by all connections
//	parent: progress                    (diagnostics, at any time)
//	child:  progress <behind> <min> <id> target <K>
//	                                    connections below K, the fewest pushes one has, and its id
//	parent: quit
//	child:  bye
//	child:  fail <reason>               at any time: a connection closed, a join failed…
//
// Latency: each push's d carries "ts":<unix ns> set by the parent when it
// published the push; every sampleEvery-th connection records now-ts for each
// push it receives.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway"
)

// Environment of the child process.
const (
	envFleet     = "LIVEEDGE_FLEET"        // "1" turns TestFleetHelper on
	envFleetURL  = "LIVEEDGE_FLEET_URL"    // ws://127.0.0.1:port/ws[,ws://…]: connection i uses URL i mod count
	envFleetN    = "LIVEEDGE_FLEET_N"      // connections
	envFleetRoom = "LIVEEDGE_FLEET_ROOM"   // room to join; 0 = bare server (no token, no join)
	envFleetKey  = "LIVEEDGE_FLEET_SECRET" // JWT secret to mint viewer tokens with
	envFleetConc = "LIVEEDGE_FLEET_CONC"   // concurrent connection attempts
)

const (
	sampleEvery  = 8                // latency is sampled on every 8th connection
	defaultConc  = 200              // concurrent dials + joins
	dialTimeout  = 10 * time.Second // one connection's dial + handshake + join
	maxReadFrame = 16 << 20         // client read limit (LiveEdge merges ≤ 256 KiB)
	joinFrameFmt = `{"t":"join","id":1,"d":{"room_id":%d}}`
	firstUserID  = 1_000_000     // viewers are users firstUserID+i
	pushMarker   = `{"t":"push"` // one per push, whether alone or inside a batch
	joinOK       = `{"t":"reply","id":1,"code":0,`
	tsKey        = `"ts":`
	childCommand = "-test.run=^TestFleetHelper$"
)

// TestFleetHelper is the client-fleet child process. Without LIVEEDGE_FLEET=1
// (that is, under a plain `go test`) it returns at once.
func TestFleetHelper(t *testing.T) {
	if os.Getenv(envFleet) != "1" {
		return
	}
	if err := raiseNofile(); err != nil {
		fmt.Fprintln(os.Stderr, "fleet: raise RLIMIT_NOFILE:", err)
	}
	out := &lineWriter{w: os.Stdout}
	if err := runFleet(os.Stdin, out); err != nil {
		out.printf("fail %s", oneLine(err.Error()))
		// Give the parent a moment to read the line; it kills us on failure anyway.
		time.Sleep(100 * time.Millisecond)
		os.Exit(1)
	}
}

// raiseNofile sets the soft RLIMIT_NOFILE to the hard limit.
func raiseNofile() error {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return err
	}
	if l.Cur >= l.Max {
		return nil
	}
	l.Cur = l.Max
	return syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", " | ") }

type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lineWriter) printf(format string, args ...any) {
	l.mu.Lock()
	fmt.Fprintf(l.w, format+"\n", args...)
	l.mu.Unlock()
}

// fleet is the child's state.
type fleet struct {
	n     int
	conns []*fleetConn

	target    atomic.Int64 // cumulative pushes every connection must reach
	reached   atomic.Int64 // connections that reached target
	doneCh    chan struct{}
	failCh    chan error
	quitting  atomic.Bool
	joinError atomic.Pointer[string]
}

func (f *fleet) fail(err error) {
	select {
	case f.failCh <- err:
	default:
	}
}

// fleetConn is one client connection; it is also its gws event handler.
type fleetConn struct {
	f      *fleet
	id     int
	ws     *gws.Conn
	sample bool
	joined chan struct{}
	once   sync.Once

	pushes atomic.Int64
	frames atomic.Int64

	mu   sync.Mutex
	lats []int64
}

func (c *fleetConn) OnOpen(*gws.Conn) {}

func (c *fleetConn) OnClose(_ *gws.Conn, err error) {
	if !c.f.quitting.Load() {
		c.f.fail(fmt.Errorf("connection %d closed: %v", c.id, err))
	}
}

func (c *fleetConn) OnPing(s *gws.Conn, p []byte) { _ = s.WritePong(p) }

func (c *fleetConn) OnPong(*gws.Conn, []byte) {}

func (c *fleetConn) OnMessage(_ *gws.Conn, m *gws.Message) {
	b := m.Bytes()
	k := int64(bytes.Count(b, []byte(pushMarker)))
	if k == 0 {
		// hello, or the join reply (possibly merged into one batch frame).
		if bytes.Contains(b, []byte(`{"t":"reply","id":1,`)) {
			if !bytes.Contains(b, []byte(joinOK)) {
				s := string(b)
				c.f.joinError.CompareAndSwap(nil, &s)
			}
			c.once.Do(func() { close(c.joined) })
		}
		m.Close()
		return
	}
	if c.sample {
		now := time.Now().UnixNano()
		c.mu.Lock()
		for rest := b; ; {
			i := bytes.Index(rest, []byte(tsKey))
			if i < 0 {
				break
			}
			rest = rest[i+len(tsKey):]
			var ts int64
			j := 0
			for ; j < len(rest) && rest[j] >= '0' && rest[j] <= '9'; j++ {
				ts = ts*10 + int64(rest[j]-'0')
			}
			rest = rest[j:]
			c.lats = append(c.lats, now-ts)
		}
		c.mu.Unlock()
	}
	m.Close()
	c.frames.Add(1)
	n := c.pushes.Add(k)
	if t := c.f.target.Load(); n >= t && n-k < t {
		if c.f.reached.Add(1) == int64(c.f.n) {
			select {
			case c.f.doneCh <- struct{}{}:
			default:
			}
		}
	}
}

func envInt(name string, def int) (int, error) {
	v := os.Getenv(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%q: %v", name, v, err)
	}
	return n, nil
}

// runFleet connects, then serves the parent's commands until quit or EOF.
func runFleet(in io.Reader, out *lineWriter) error {
	url := os.Getenv(envFleetURL)
	n, err := envInt(envFleetN, 0)
	if err != nil {
		return err
	}
	room, err := envInt(envFleetRoom, 0)
	if err != nil {
		return err
	}
	conc, err := envInt(envFleetConc, defaultConc)
	if err != nil {
		return err
	}
	if url == "" || n <= 0 {
		return errors.New("missing " + envFleetURL + " or " + envFleetN)
	}
	f := &fleet{n: n, doneCh: make(chan struct{}, 1), failCh: make(chan error, 1)}
	f.target.Store(1 << 62)

	// Commands are read from the start so that an EOF (parent gone) always ends us.
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(in)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()

	start := time.Now()
	if err := f.connect(url, room, os.Getenv(envFleetKey), conc); err != nil {
		f.closeAll()
		return err
	}
	out.printf("ready %d", time.Since(start).Milliseconds())

	for {
		select {
		case err := <-f.failCh:
			f.closeAll()
			return err
		case <-f.doneCh:
			out.printf("done")
		case line, ok := <-lines:
			if !ok {
				f.closeAll()
				return nil
			}
			cmd, arg, _ := strings.Cut(line, " ")
			switch cmd {
			case "expect":
				k, err := strconv.ParseInt(arg, 10, 64)
				if err != nil {
					f.closeAll()
					return fmt.Errorf("bad command %q", line)
				}
				// No push is in flight between rounds: the parent publishes
				// only after "armed".
				select {
				case <-f.doneCh:
				default:
				}
				f.reached.Store(0)
				f.target.Store(k)
				reached := 0
				for _, c := range f.conns {
					if c.pushes.Load() >= k {
						reached++
					}
				}
				f.reached.Store(int64(reached))
				out.printf("armed")
				if reached == n {
					out.printf("done")
				}
			case "stats":
				out.printf("stats %s", f.stats())
			case "progress":
				out.printf("progress %s", f.progress())
			case "quit":
				f.closeAll()
				out.printf("bye")
				return nil
			default:
				f.closeAll()
				return fmt.Errorf("bad command %q", line)
			}
		}
	}
}

// connect opens n connections, conc at a time, round-robin over the
// comma-separated urls (connection i to URL i mod count). With room > 0 each
// connection authenticates (?token=…&batch=1) and joins room before it counts
// as open.
func (f *fleet) connect(urls string, room int, secret string, conc int) error {
	list := strings.Split(urls, ",")
	var auth *gateway.Auth
	if room > 0 {
		auth = gateway.NewAuth(secret)
	}
	f.conns = make([]*fleetConn, f.n)
	for i := range f.conns {
		f.conns[i] = &fleetConn{f: f, id: i, sample: i%sampleEvery == 0, joined: make(chan struct{})}
	}
	next := make(chan int)
	errs := make(chan error, conc)
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := f.open(f.conns[i], list[i%len(list)], room, auth); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	var err error
	for i := 0; i < f.n && err == nil; i++ {
		select {
		case next <- i:
		case err = <-errs:
		case err = <-f.failCh:
		}
	}
	close(next)
	wg.Wait()
	if err != nil {
		return err
	}
	select {
	case err = <-errs:
	case err = <-f.failCh:
	default:
	}
	return err
}

func (f *fleet) open(c *fleetConn, url string, room int, auth *gateway.Auth) error {
	addr := url
	if auth != nil {
		tok, err := auth.Issue(int64(firstUserID+c.id), gateway.RoleViewer, 24*time.Hour)
		if err != nil {
			return err
		}
		addr += "?token=" + tok + "&batch=1"
	}
	ws, _, err := gws.NewClient(c, &gws.ClientOption{
		Addr:               addr,
		ReadMaxPayloadSize: maxReadFrame,
		HandshakeTimeout:   dialTimeout,
		NewDialer: func() (gws.Dialer, error) {
			return &net.Dialer{Timeout: dialTimeout}, nil
		},
	})
	if err != nil {
		return fmt.Errorf("connection %d: %v", c.id, err)
	}
	c.ws = ws
	go ws.ReadLoop()
	if auth == nil {
		return nil
	}
	if err := ws.WriteMessage(gws.OpcodeText, fmt.Appendf(nil, joinFrameFmt, room)); err != nil {
		return fmt.Errorf("connection %d: join: %v", c.id, err)
	}
	select {
	case <-c.joined:
	case <-time.After(dialTimeout):
		return fmt.Errorf("connection %d: no join reply within %v", c.id, dialTimeout)
	}
	if p := f.joinError.Load(); p != nil {
		return fmt.Errorf("join refused: %s", *p)
	}
	return nil
}

func (f *fleet) closeAll() {
	f.quitting.Store(true)
	for _, c := range f.conns {
		if c != nil && c.ws != nil {
			_ = c.ws.NetConn().Close()
		}
	}
}

// progress describes the connections that have not reached the target:
// "<behind> <min pushes> <id of one with the min>".
func (f *fleet) progress() string {
	t := f.target.Load()
	behind, minID, minN := 0, -1, int64(1<<62)
	for _, c := range f.conns {
		if n := c.pushes.Load(); n < t {
			behind++
			if n < minN {
				minN, minID = n, c.id
			}
		}
	}
	return fmt.Sprintf("%d %d %d target %d", behind, minN, minID, t)
}

// stats returns and resets the latency samples and frame counts.
func (f *fleet) stats() string {
	var all []int64
	var frames, pushes int64
	for _, c := range f.conns {
		frames += c.frames.Swap(0)
		pushes += c.pushes.Load()
		if c.sample {
			c.mu.Lock()
			all = append(all, c.lats...)
			c.lats = c.lats[:0]
			c.mu.Unlock()
		}
	}
	slices.Sort(all)
	q := func(p float64) int64 {
		if len(all) == 0 {
			return 0
		}
		return all[min(len(all)-1, int(p*float64(len(all))))]
	}
	var mx int64
	if len(all) > 0 {
		mx = all[len(all)-1]
	}
	return fmt.Sprintf("%d %d %d %d %d %d %d", len(all), q(0.50), q(0.90), q(0.99), mx, frames, pushes)
}

// ---- parent side ----

// fleetProc is the parent's handle on a fleet child.
type fleetProc struct {
	tb     testing.TB
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	exited chan struct{}
}

// latStats is one round's result as the fleet reports it.
type latStats struct {
	samples            int
	p50, p90, p99, max time.Duration
	frames, pushes     int64
}

// startFleet starts a fleet of n connections to url (room > 0: LiveEdge with
// tokens minted from secret; room == 0: a bare server) and waits until every
// connection is open. url may list several comma-separated URLs: the
// connections are spread over them round-robin. The child is stopped in
// tb.Cleanup.
func startFleet(tb testing.TB, url string, n int, room int64, secret string) *fleetProc {
	tb.Helper()
	cmd := exec.Command(os.Args[0], childCommand, "-test.count=1")
	cmd.Env = append(os.Environ(),
		envFleet+"=1",
		envFleetURL+"="+url,
		envFleetN+"="+strconv.Itoa(n),
		envFleetRoom+"="+strconv.FormatInt(room, 10),
		envFleetKey+"="+secret,
	)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start fleet: %v", err)
	}
	p := &fleetProc{tb: tb, cmd: cmd, stdin: stdin, lines: make(chan string, 16), exited: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		_ = cmd.Wait()
		close(p.exited)
	}()
	tb.Cleanup(p.stop)
	budget := 60*time.Second + time.Duration(n)*5*time.Millisecond
	line := p.await("ready", budget)
	tb.Logf("fleet: %d connections ready in %s ms", n, strings.TrimPrefix(line, "ready "))
	return p
}

// await returns the next protocol line starting with want, failing the
// benchmark on "fail", on exit, or after timeout.
func (p *fleetProc) await(want string, timeout time.Duration) string {
	p.tb.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		select {
		case line, ok := <-p.lines:
			if !ok {
				p.tb.Fatalf("fleet exited while waiting for %q", want)
			}
			switch {
			case line == want || strings.HasPrefix(line, want+" "):
				return line
			case strings.HasPrefix(line, "fail"):
				p.tb.Fatalf("fleet: %s", line)
			case strings.HasPrefix(line, "progress"):
				p.tb.Logf("fleet: %s", line)
			}
			// Anything else (e.g. the testing package's own output) is ignored.
		case <-deadline.C:
			p.tb.Fatalf("fleet: no %q within %v", want, timeout)
		}
	}
}

func (p *fleetProc) send(format string, args ...any) {
	p.tb.Helper()
	if _, err := fmt.Fprintf(p.stdin, format+"\n", args...); err != nil {
		p.tb.Fatalf("fleet: write command: %v", err)
	}
}

// expect arms the fleet for a cumulative total of pushes per connection.
func (p *fleetProc) expect(total int64) {
	p.tb.Helper()
	p.send("expect %d", total)
	p.await("armed", 30*time.Second)
}

// waitDone waits until every connection has reached the armed total.
func (p *fleetProc) waitDone(timeout time.Duration) {
	p.tb.Helper()
	p.await("done", timeout)
}

// stats fetches and resets the fleet's latency samples.
func (p *fleetProc) stats() latStats {
	p.tb.Helper()
	p.send("stats")
	line := p.await("stats", 60*time.Second)
	f := strings.Fields(line)
	if len(f) != 8 {
		p.tb.Fatalf("fleet: bad stats line %q", line)
	}
	v := make([]int64, 7)
	for i := range v {
		x, err := strconv.ParseInt(f[i+1], 10, 64)
		if err != nil {
			p.tb.Fatalf("fleet: bad stats line %q", line)
		}
		v[i] = x
	}
	return latStats{samples: int(v[0]), p50: time.Duration(v[1]), p90: time.Duration(v[2]),
		p99: time.Duration(v[3]), max: time.Duration(v[4]), frames: v[5], pushes: v[6]}
}

// stop asks the child to close its connections and exit; kills it after 15 s.
func (p *fleetProc) stop() {
	_, _ = fmt.Fprintln(p.stdin, "quit")
	_ = p.stdin.Close()
	go func() { // keep draining so the child never blocks on stdout
		for range p.lines {
		}
	}()
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// cpuTime is the user+system CPU time the child has used so far (10 ms ticks).
func (p *fleetProc) cpuTime() time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(p.cmd.Process.Pid) + "/stat")
	if err != nil {
		return 0
	}
	return procStatCPU(b)
}

// procStatCPU parses utime+stime out of a /proc/<pid>/stat line.
func procStatCPU(b []byte) time.Duration {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	// After "(comm)": state is field 3 of the line, utime 14 and stime 15.
	if len(f) < 13 {
		return 0
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	const tick = 10 * time.Millisecond // CLK_TCK = 100 on Linux
	return time.Duration(ut+st) * tick
}

// selfCPU is this process's user+system CPU time.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
