package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// These tests run the real binary as a subprocess, the way users and
// operators do.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// TestMain removes the binary the tests built (one per test process).
func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		_ = os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "liveedge-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "liveedge")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// freeAddr returns a free 127.0.0.1 port for a node to listen on later,
// chosen below the kernel's ephemeral range (32768–60999 by default): a port
// picked from that range (":0") can be taken in the meantime by any outgoing
// connection — the many client sockets of the cluster tests — and the node
// then fails with "address already in use".
func freeAddr(t *testing.T) string {
	t.Helper()
	for i := 0; i < 200; i++ {
		port := 20000 + int(portSeq.Add(1)%12000)
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue // in use
		}
		addr := ln.Addr().String()
		_ = ln.Close()
		return addr
	}
	t.Fatal("no free port in 20000..31999")
	return ""
}

// portSeq walks the port range from a per-process random start, so
// concurrent test processes rarely try the same ports.
var portSeq = func() *atomic.Int64 {
	var a atomic.Int64
	a.Store(int64(os.Getpid()) * 7919)
	return &a
}()

type proc struct {
	cmd    *exec.Cmd
	stdout *lineBuffer
	done   chan struct{}
	err    error
}

// lineBuffer keeps a process's output for matching and failure messages.
type lineBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (l *lineBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *lineBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func start(t *testing.T, dir string, env []string, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out := &lineBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = procAttr() // its own group (killed whole at cleanup), dying with the test on Linux
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, stdout: out, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	})
	return p
}

// waitReady waits until the node p started answers /readyz 200, at most
// 90 s: the start of a built binary, however loaded the machine.
func waitReady(t *testing.T, p *proc, httpAddr string) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !ready(t, p, httpAddr) {
		if time.Now().After(deadline) {
			t.Fatalf("node not ready\n%s", p.stdout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ready reports whether the node answers /readyz 200; p having exited fails
// the test.
func ready(t *testing.T, p *proc, httpAddr string) bool {
	t.Helper()
	select {
	case <-p.done:
		t.Fatalf("process exited early: %v\n%s", p.err, p.stdout)
	default:
	}
	resp, err := http.Get("http://" + httpAddr + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == 200
}

// Bounds of waitBuiltAndReady: how long the build may go without using any
// CPU, and how long it may take at all.
const (
	buildStall = 90 * time.Second
	buildMax   = 10 * time.Minute
)

// waitBuiltAndReady waits until the node a build-and-start command p (make
// run) started answers /readyz 200. How long a build takes is not what the
// callers test, and it follows the machine: a fixed 90 s for build and
// start was exceeded with other builds running. So the build has no fixed
// deadline while it gets on: the wait fails when p's process group (make,
// go build, the compilers) used no CPU for buildStall (hung on something
// that does not come), or after buildMax in all (on a system without
// /proc, only then). Once the node's process (named liveedge) runs, it has
// the 90 s of waitReady to be ready.
func waitBuiltAndReady(t *testing.T, p *proc, httpAddr string) {
	t.Helper()
	began := time.Now()
	cpu, _ := groupCPU(p.cmd.Process.Pid, "liveedge")
	moved := began
	var started time.Time // when the node's process was first seen
	for !ready(t, p, httpAddr) {
		now := time.Now()
		c, node := groupCPU(p.cmd.Process.Pid, "liveedge")
		if c != cpu {
			cpu, moved = c, now
		}
		if node && started.IsZero() {
			started = now
		}
		switch {
		case !started.IsZero() && now.Sub(started) > 90*time.Second:
			t.Fatalf("node not ready 90 s after its start (built in %v)\n%s", started.Sub(began).Round(time.Second), p.stdout)
		case now.Sub(began) > buildMax:
			t.Fatalf("node not ready after %v\n%s", buildMax, p.stdout)
		case started.IsZero() && cpu >= 0 && now.Sub(moved) > buildStall:
			t.Fatalf("build stalled: no CPU used for %v (%v after make run started)\n%s", buildStall, now.Sub(began).Round(time.Second), p.stdout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("make run: ready %v after the start (node started after %v)", time.Since(began).Round(time.Second), started.Sub(began).Round(time.Second))
}

// groupCPU is the CPU time (clock ticks, user and system, with that of the
// children they waited for) of the processes of process group pgid, and
// whether one of them is named comm, from /proc; cpu is -1 when /proc
// cannot be read.
func groupCPU(pgid int, comm string) (cpu int64, found bool) {
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil || len(stats) == 0 {
		return -1, false
	}
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid pgrp … utime stime cutime cstime (fields
		// 14–17); comm may hold spaces and parentheses: split at its end.
		st := string(b)
		open, end := strings.IndexByte(st, '('), strings.LastIndexByte(st, ')')
		if open < 0 || end < open {
			continue
		}
		fs := strings.Fields(st[end+1:]) // fs[0] is field 3 (state)
		if len(fs) < 15 || fs[2] != strconv.Itoa(pgid) {
			continue
		}
		found = found || st[open+1:end] == comm
		for _, v := range fs[11:15] {
			n, _ := strconv.ParseInt(v, 10, 64)
			cpu += n
		}
	}
	return cpu, found
}

func nodeEnv(httpAddr, wsAddr, dataDir string, extra ...string) []string {
	return append([]string{
		"LIVEEDGE_HTTP_ADDR=" + httpAddr,
		"LIVEEDGE_WS_ADDR=" + wsAddr,
		"LIVEEDGE_NODE_DATA_DIR=" + dataDir,
		"LIVEEDGE_ROOMS_OPEN_CLOSE_INTERVAL=0s",
		"LIVEEDGE_LOG_LEVEL=warn",
	}, extra...)
}

func devToken(t *testing.T, httpAddr string, user int64, role string) string {
	t.Helper()
	var out struct {
		Data struct {
			Token string `json:"token"`
		} `json:"data"`
	}
	body := fmt.Sprintf(`{"user_id":%d,"role":%q}`, user, role)
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/dev/token", "", body, &out); st != 200 || out.Data.Token == "" {
		t.Fatalf("dev token: %d", st)
	}
	return out.Data.Token
}

func openRoom(t *testing.T, httpAddr, anchorToken string) int64 {
	t.Helper()
	var out struct {
		Data struct {
			RoomID int64 `json:"room_id"`
		} `json:"data"`
	}
	if st := nodetest.DoJSON(t, "POST", "http://"+httpAddr+"/api/v1/rooms", anchorToken, `{"type":1}`, &out); st != 200 {
		t.Fatalf("open room: %d", st)
	}
	return out.Data.RoomID
}

func roomOnline(t *testing.T, httpAddr, token string, room int64) int {
	var out struct {
		Data struct {
			Online int `json:"online"`
		} `json:"data"`
	}
	nodetest.DoJSON(t, "GET", fmt.Sprintf("http://%s/api/v1/rooms/%d", httpAddr, room), token, "", &out)
	return out.Data.Online
}

// SIGTERM with 1,000 connected SDK clients: the process exits cleanly within
// the drain timeout; the clients see a normal close (1001) and reconnect —
// and re-join their room — when the node is back.
func TestSIGTERMDrainsAndClientsReconnect(t *testing.T) {
	const clients = 1000
	const drain = 5 * time.Second
	bin := binary(t)
	httpAddr, wsAddr, data := freeAddr(t), freeAddr(t), t.TempDir()
	env := nodeEnv(httpAddr, wsAddr, data, "LIVEEDGE_SHUTDOWN_DRAIN_TIMEOUT="+drain.String())
	p := start(t, "", env, bin)
	waitReady(t, p, httpAddr)
	room := openRoom(t, httpAddr, devToken(t, httpAddr, 1, "anchor"))
	viewerTok := devToken(t, httpAddr, 2, "viewer")

	var going, connected atomic.Int64
	cs := make([]*clientsdk.Client, clients)
	sem := make(chan struct{}, 50)
	var wg sync.WaitGroup
	for i := range cs {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := clientsdk.Dial(ctx, clientsdk.Config{
				URL:          "ws://" + wsAddr + "/ws",
				Token:        devTokenCached(t, httpAddr, int64(1000+i)),
				ReconnectMin: 100 * time.Millisecond,
				ReconnectMax: time.Second,
				OnState: func(e clientsdk.StateEvent) {
					switch e.State {
					case clientsdk.StateDisconnected:
						if e.Code == proto.CloseGoingAway {
							going.Add(1)
						}
					case clientsdk.StateConnected:
						if e.Attempt > 0 {
							connected.Add(1)
						}
					}
				},
			})
			if err != nil {
				t.Errorf("dial %d: %v", i, err)
				return
			}
			cs[i] = c
			if _, err := c.Join(ctx, room); err != nil {
				t.Errorf("join %d: %v", i, err)
			}
		}(i)
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Cleanup(func() {
		for _, c := range cs {
			_ = c.Close()
		}
	})
	if n := roomOnline(t, httpAddr, viewerTok, room); n != clients {
		t.Fatalf("online before SIGTERM: %d", n)
	}

	sent := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(drain + 5*time.Second):
		t.Fatalf("process did not exit within the drain timeout\n%s", p.stdout)
	}
	took := time.Since(sent)
	if p.err != nil {
		t.Fatalf("exit: %v\n%s", p.err, p.stdout)
	}
	if took > drain+time.Second {
		t.Fatalf("shutdown took %v (drain timeout %v)", took, drain)
	}
	nodetest.Eventually(t, 10*time.Second, func() bool { return going.Load() == clients },
		"%d of %d clients saw close 1001", going.Load(), clients)
	t.Logf("SIGTERM → exit in %v; %d clients saw 1001", took.Round(time.Millisecond), going.Load())

	p2 := start(t, "", env, bin)
	waitReady(t, p2, httpAddr)
	nodetest.Eventually(t, 30*time.Second, func() bool { return connected.Load() == clients },
		"%d of %d clients reconnected", connected.Load(), clients)
	nodetest.Eventually(t, 10*time.Second, func() bool { return roomOnline(t, httpAddr, viewerTok, room) == clients },
		"room online after restart: %d", roomOnline(t, httpAddr, viewerTok, room))
	_ = p2.cmd.Process.Signal(syscall.SIGTERM)
	<-p2.done
}

var (
	tokMu    sync.Mutex
	tokCache = map[int64]string{}
)

func devTokenCached(t *testing.T, httpAddr string, user int64) string {
	tokMu.Lock()
	defer tokMu.Unlock()
	if tok, ok := tokCache[user]; ok {
		return tok
	}
	tok := devToken(t, httpAddr, user, "viewer")
	tokCache[user] = tok
	return tok
}

var curlLine = regexp.MustCompile(`(?m)^\s*(curl .*)$`)

// `make run` from a clean clone works as a new user would try it: the dev
// token curl it prints, open a room as an anchor, connect as a viewer, join,
// chat.
func TestMakeRunFromCleanClone(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a clean clone")
	}
	for _, tool := range []string{"git", "make", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (make test installs it): %v", tool, err)
		}
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if !gitTop(root) {
		// A tarball of the tree (perhaps unpacked inside another
		// repository): there is no clone of it to make (and what is tested
		// is what git holds, not uncommitted edits).
		t.Skip("not the top of a git checkout: make run from a clean clone needs one")
	}
	clone := filepath.Join(t.TempDir(), "liveedge")
	if out, err := exec.Command("git", "clone", "-q", "--no-hardlinks", root, clone).CombinedOutput(); err != nil {
		t.Fatalf("git clone: %v\n%s", err, out)
	}
	httpAddr, wsAddr := freeAddr(t), freeAddr(t)
	p := start(t, clone, []string{"LIVEEDGE_HTTP_ADDR=" + httpAddr, "LIVEEDGE_WS_ADDR=" + wsAddr}, "make", "run")
	waitBuiltAndReady(t, p, httpAddr)

	// The banner tells the user where things are and how to get a token.
	banner := p.stdout.String()
	for _, want := range []string{"http://" + httpAddr, "ws://" + wsAddr + "/ws", "http://" + httpAddr + "/demo/"} {
		if !strings.Contains(banner, want) {
			t.Fatalf("banner lacks %q:\n%s", want, banner)
		}
	}
	// The demo page and the SDK bundle it loads are embedded in a fresh build.
	for _, path := range []string{"/demo/", "/demo/liveedge.js"} {
		resp, err := http.Get("http://" + httpAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d", path, resp.StatusCode)
		}
	}
	m := curlLine.FindStringSubmatch(banner)
	if m == nil {
		t.Fatalf("banner has no curl line:\n%s", banner)
	}
	runCurl := func(cmdline string) string {
		out, err := exec.Command("sh", "-c", cmdline).Output()
		if err != nil {
			t.Fatalf("%s: %v", cmdline, err)
		}
		return string(out)
	}
	tokenOf := func(out string) string {
		var r struct {
			Code int `json:"code"`
			Data struct {
				Token string `json:"token"`
			} `json:"data"`
		}
		if err := proto.Unmarshal([]byte(out), &r); err != nil || r.Code != 0 || r.Data.Token == "" {
			t.Fatalf("token answer %q: %v", out, err)
		}
		return r.Data.Token
	}
	viewer := tokenOf(runCurl(m[1]))
	anchorCmd := strings.Replace(strings.Replace(m[1], `"viewer"`, `"anchor"`, 1), `"user_id":42`, `"user_id":7`, 1)
	anchor := tokenOf(runCurl(anchorCmd))

	out := runCurl(fmt.Sprintf(`curl -s -X POST -H 'Authorization: Bearer %s' http://%s/api/v1/rooms -d '{"type":1}'`, anchor, httpAddr))
	var opened struct {
		Code int `json:"code"`
		Data struct {
			RoomID int64 `json:"room_id"`
		} `json:"data"`
	}
	if err := proto.Unmarshal([]byte(out), &opened); err != nil || opened.Code != 0 || opened.Data.RoomID <= 0 {
		t.Fatalf("open room answer %q: %v", out, err)
	}

	got := make(chan clientsdk.Push, 16)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := clientsdk.Dial(ctx, clientsdk.Config{URL: "ws://" + wsAddr + "/ws", Token: viewer,
		OnPush: func(p clientsdk.Push) { got <- p }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Join(ctx, opened.Data.RoomID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Chat(ctx, opened.Data.RoomID, "hello from a new user"); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		var d proto.ChatPush
		_ = proto.Unmarshal(p.Data, &d)
		if p.Biz != proto.BizChat || d.Text != "hello from a new user" || d.From != 42 {
			t.Fatalf("push %+v %+v", p, d)
		}
	case <-ctx.Done():
		t.Fatal("no chat push")
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatal("make run did not stop on SIGTERM")
	}
	if _, err := os.Stat(filepath.Join(clone, "data", "pebble")); err != nil {
		t.Fatalf("no Pebble data under ./data: %v", err)
	}
}

// gitTop reports whether dir is the top of a git checkout.
func gitTop(dir string) bool {
	top, err := exec.Command("git", "-C", dir, "rev-parse", "--show-toplevel").Output()
	if err != nil {
		return false
	}
	a, errA := filepath.EvalSymlinks(strings.TrimSpace(string(top)))
	b, errB := filepath.EvalSymlinks(dir)
	return errA == nil && errB == nil && a == b
}
