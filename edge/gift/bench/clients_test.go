package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// clients is the client side of BenchmarkGiftWS: a fleet of connections that
// runs load phases against one server. It lives in this process or, by
// default, in a child process (LIVEEDGE_GIFTBENCH_CLIENT=proc): the viewers
// of a real deployment are other processes, and a child keeps the load
// generator's goroutines out of the server's Go scheduler (a pacer stuck
// behind a run queue of server goroutines is charged to the server). Both
// share the same 2 cores either way; cpu-cores counts both processes.
type clients interface {
	// run runs one phase: a closed loop (rate 0) or an open loop at rate
	// gifts/s, warmup then measure; the fleet stays connected.
	run(rate float64) wsResult
	conns() int
	close()
}

// startClients connects len(targets) clients, each joined to its room.
func startClients(b testing.TB, k knobs, targets []connTarget) clients {
	b.Helper()
	if k.client == "inproc" {
		fl := dialFleet(b, k, func(i int) connTarget { return targets[i] })
		fl.joinAll(b)
		return &inprocClients{fl: fl, k: k}
	}
	return startProcClients(b, k, targets)
}

type inprocClients struct {
	fl *fleet
	k  knobs
}

func (c *inprocClients) run(rate float64) wsResult {
	from := time.Now().Add(c.k.warmup)
	if rate == 0 {
		return c.fl.closedLoop(from, c.k.measure)
	}
	return c.fl.openLoop(rate, from, c.k.measure)
}
func (c *inprocClients) conns() int { return len(c.fl.conns) }
func (c *inprocClients) close()     { c.fl.close() }

// ---- child process ----

// childEnv makes the test binary run TestGiftWSClientProcess as the client.
const childEnv = "LIVEEDGE_GIFTBENCH_CHILD"

// The parent and the child talk in lines: the parent writes the spec (JSON),
// the child answers "READY" once every connection has joined; then, per
// phase, "RUN <rate> <from unix ns> <measure ns>" → "RESULT <JSON>"; finally
// "CLOSE", and the child closes its connections and exits.
type childSpec struct {
	Window  int          `json:"window"`
	Targets []wireTarget `json:"targets"`
}

type wireTarget struct {
	URL                string
	User, Room, Anchor int64
	Code               string
}

type wireResult struct {
	From, To           int64
	OK, Fail           int64
	N                  int
	P50, P99, Max      time.Duration
	ReqBytes, RepBytes float64
	Frames             int64
	CPU                time.Duration
}

func toWire(r wsResult) wireResult {
	return wireResult{From: r.win.from, To: r.win.to, OK: r.ok, Fail: r.fail, N: r.lat.n,
		P50: r.lat.p50, P99: r.lat.p99, Max: r.lat.max, ReqBytes: r.reqBytes, RepBytes: r.repBytes,
		Frames: r.frames, CPU: r.cpu}
}

func fromWire(w wireResult) wsResult {
	return wsResult{win: window{w.From, w.To}, ok: w.OK, fail: w.Fail,
		lat:      latStats{n: w.N, p50: w.P50, p99: w.P99, max: w.Max},
		reqBytes: w.ReqBytes, repBytes: w.RepBytes, frames: w.Frames, cpu: w.CPU}
}

type procClients struct {
	b      testing.TB
	k      knobs
	n      int
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Scanner
	stderr strings.Builder
	lines  []string // what the child printed besides protocol lines (for errors)
}

func startProcClients(b testing.TB, k knobs, targets []connTarget) *procClients {
	b.Helper()
	p := &procClients{b: b, k: k, n: len(targets)}
	p.cmd = exec.Command(os.Args[0], "-test.run=^TestGiftWSClientProcess$", "-test.count=1", "-test.v")
	p.cmd.Env = append(os.Environ(), childEnv+"=1")
	p.cmd.Stderr = &p.stderr
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		b.Fatal(err)
	}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	p.out = bufio.NewScanner(stdout)
	p.out.Buffer(make([]byte, 64<<10), 4<<20)
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.close)
	spec := childSpec{Window: k.window}
	for _, t := range targets {
		spec.Targets = append(spec.Targets, wireTarget{URL: t.url, User: t.user, Room: t.room, Anchor: t.anchor, Code: t.code})
	}
	line, err := json.Marshal(spec)
	if err != nil {
		b.Fatal(err)
	}
	p.send(string(line))
	p.await("READY")
	return p
}

func (p *procClients) send(line string) {
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		p.fail("write to the client process: %v", err)
	}
}

// await reads the child's stdout up to the line starting with prefix and
// returns the rest of that line.
func (p *procClients) await(prefix string) string {
	for p.out.Scan() {
		l := p.out.Text()
		if rest, ok := strings.CutPrefix(l, prefix); ok {
			return strings.TrimSpace(rest)
		}
		p.lines = append(p.lines, l)
	}
	p.fail("the client process ended before %q", prefix)
	return ""
}

func (p *procClients) fail(format string, args ...any) {
	p.b.Helper()
	_ = p.cmd.Process.Kill()
	p.b.Fatalf("%s\nclient process output:\n%s\n%s", fmt.Sprintf(format, args...),
		strings.Join(p.lines, "\n"), p.stderr.String())
}

func (p *procClients) run(rate float64) wsResult {
	from := time.Now().Add(p.k.warmup)
	to := from.Add(p.k.measure)
	// This process's share of the CPU over the same window.
	own, sched := cpuOver(from, to), schedOver(from, to)
	p.send(fmt.Sprintf("RUN %g %d %d", rate, from.UnixNano(), int64(p.k.measure)))
	var w wireResult
	if err := json.Unmarshal([]byte(p.await("RESULT")), &w); err != nil {
		p.fail("bad result: %v", err)
	}
	res := fromWire(w)
	res.serverCPU = <-own
	res.serverSched = <-sched
	res.cpu += res.serverCPU
	return res
}

func (p *procClients) conns() int { return p.n }

func (p *procClients) close() {
	if p.cmd.ProcessState != nil {
		return
	}
	_, _ = io.WriteString(p.stdin, "CLOSE\n")
	_ = p.stdin.Close()
	done := make(chan error, 1)
	go func() {
		for p.out.Scan() {
			p.lines = append(p.lines, p.out.Text())
		}
		done <- p.cmd.Wait()
	}()
	select {
	case err := <-done:
		if err != nil {
			p.b.Errorf("client process: %v\n%s\n%s", err, strings.Join(p.lines, "\n"), p.stderr.String())
		}
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
		p.b.Errorf("client process did not exit after CLOSE")
	}
}

// TestGiftWSClientProcess is the client process of BenchmarkGiftWS (it
// skips unless started by it).
func TestGiftWSClientProcess(t *testing.T) {
	if os.Getenv(childEnv) != "1" {
		t.Skip("the client process of BenchmarkGiftWS")
	}
	raiseNofile(t)
	sameGC()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 16<<20)
	if !in.Scan() {
		t.Fatal("no spec on stdin")
	}
	var spec childSpec
	if err := json.Unmarshal(in.Bytes(), &spec); err != nil {
		t.Fatal(err)
	}
	fl := dialFleet(t, knobs{conns: len(spec.Targets), window: spec.Window}, func(i int) connTarget {
		w := spec.Targets[i]
		return connTarget{url: w.URL, user: w.User, room: w.Room, anchor: w.Anchor, code: w.Code}
	})
	fl.joinAll(t)
	fmt.Println("READY")
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "RUN":
			if len(f) != 4 {
				t.Fatalf("bad command %q", in.Text())
			}
			rate, err1 := strconv.ParseFloat(f[1], 64)
			from, err2 := strconv.ParseInt(f[2], 10, 64)
			measure, err3 := strconv.ParseInt(f[3], 10, 64)
			if err1 != nil || err2 != nil || err3 != nil {
				t.Fatalf("bad command %q", in.Text())
			}
			var res wsResult
			if rate == 0 {
				res = fl.closedLoop(time.Unix(0, from), time.Duration(measure))
			} else {
				res = fl.openLoop(rate, time.Unix(0, from), time.Duration(measure))
			}
			line, err := json.Marshal(toWire(res))
			if err != nil {
				t.Fatal(err)
			}
			fmt.Println("RESULT " + string(line))
		case "CLOSE":
			fl.close()
			return
		default:
			t.Fatalf("bad command %q", in.Text())
		}
	}
	fl.close()
}
