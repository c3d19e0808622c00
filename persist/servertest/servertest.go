// Package servertest runs a throwaway real server process (redis-server,
// nats-server) for tests and benchmarks on a free 127.0.0.1 port, killed at
// cleanup; persist/redistest and router/natstest build on it. A port taken by
// another process between choosing it and binding it (test packages run in
// parallel) is detected — the server exits — and another port is tried.
// Ports come from below the kernel's ephemeral range (32768–60999 by
// default), and from another block than cmd/liveedge's node ports: a port
// from that range can be taken meanwhile by any outgoing connection — then a
// Restart on the same port failed. The server dies with the test process
// (Linux: a parent-death signal), also when a timeout panics past cleanup.
package servertest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// Server is one running server process.
type Server struct {
	Addr string // 127.0.0.1:port

	name   string
	args   func(port int) []string
	port   int
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has exited
	tb     testing.TB
}

// Start runs the binary name (which make test installs when missing) with
// args(port) on a free port and waits until it accepts connections; it
// stops when the test ends.
func Start(tb testing.TB, name string, args func(port int) []string) *Server {
	tb.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		tb.Fatalf("servertest: %s not installed (make test installs it): %v", name, err)
	}
	s := &Server{name: bin, args: args, tb: tb}
	tb.Cleanup(s.Stop)
	for attempt := 1; ; attempt++ {
		ln, err := listenFree()
		if err != nil {
			tb.Fatal(err)
		}
		s.port = ln.Addr().(*net.TCPAddr).Port
		s.Addr = "127.0.0.1:" + strconv.Itoa(s.port)
		_ = ln.Close()
		if err = s.start(); err == nil {
			return s
		}
		if attempt == 5 {
			tb.Fatal(err)
		}
	}
}

// listenFree listens on a free 127.0.0.1 port of 10000–19999, tried from a
// random one on.
func listenFree() (net.Listener, error) {
	const from, n = 10000, 10000
	start := rand.IntN(n)
	var err error
	for i := range 200 {
		var ln net.Listener
		if ln, err = net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(from+(start+i)%n)); err == nil {
			return ln, nil
		}
	}
	return nil, fmt.Errorf("servertest: no free port in %d..%d: %w", from, from+n-1, err)
}

// start runs the server on s.port and waits until it serves; an error if it
// exits first (e.g. the port is taken) or does not come up.
func (s *Server) start() error {
	s.cmd = exec.Command(s.name, s.args(s.port)...)
	s.cmd.SysProcAttr = dieWithParent()
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("servertest: start %s: %w", s.name, err)
	}
	cmd, exited := s.cmd, make(chan struct{})
	s.exited = exited
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			s.cmd = nil
			return fmt.Errorf("servertest: %s on %s exited at start (port taken?)", s.name, s.Addr)
		default:
		}
		c, err := net.DialTimeout("tcp", s.Addr, 100*time.Millisecond)
		if err == nil {
			_ = c.Close()
			// The listener may be another process's: ours must still run.
			select {
			case <-exited:
			case <-time.After(50 * time.Millisecond):
				return nil
			}
			continue
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Stop()
	return fmt.Errorf("servertest: %s on %s not up", s.name, s.Addr)
}

// Stop kills the server.
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		<-s.exited
		s.cmd = nil
	}
}

// Restart kills the server and starts it again on the same port.
func (s *Server) Restart() {
	s.tb.Helper()
	s.Stop()
	if err := s.start(); err != nil {
		s.tb.Fatal(err)
	}
}
