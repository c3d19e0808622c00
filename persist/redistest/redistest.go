// Package redistest starts throwaway real redis-server processes for tests
// and benchmarks: a free 127.0.0.1 port, no persistence, killed at cleanup.
// `make test` installs redis-server when the machine lacks it.
package redistest

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// Server is one running redis-server.
type Server struct {
	Addr   string
	bin    string
	port   int
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has exited
	tb     testing.TB
}

// Start starts a redis-server on a free port; it stops when the test ends.
// A port taken by another process between choosing it and binding it (test
// packages run in parallel) is detected — the server exits — and another
// port is tried.
func Start(tb testing.TB) *Server {
	tb.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		tb.Fatalf("redistest: redis-server not installed (make test installs it): %v", err)
	}
	s := &Server{bin: bin, tb: tb}
	tb.Cleanup(s.Stop)
	for attempt := 1; ; attempt++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		s.port = ln.Addr().(*net.TCPAddr).Port
		s.Addr = "127.0.0.1:" + strconv.Itoa(s.port)
		_ = ln.Close()
		err = s.start()
		if err == nil {
			return s
		}
		if attempt == 5 {
			tb.Fatal(err)
		}
	}
}

// start runs redis-server on s.port and waits until it serves; an error if
// it exits first (e.g. the port is taken) or does not come up.
func (s *Server) start() error {
	s.cmd = exec.Command(s.bin, "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning")
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("redistest: start: %w", err)
	}
	cmd, exited := s.cmd, make(chan struct{})
	s.exited = exited
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			s.cmd = nil
			return fmt.Errorf("redistest: redis-server on %s exited at start (port taken?)", s.Addr)
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
	return fmt.Errorf("redistest: redis-server on %s not up", s.Addr)
}

// Stop kills the server (all data is lost: it keeps nothing on disk).
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		<-s.exited
		s.cmd = nil
	}
}

// Restart kills the server and starts an empty one on the same port.
func (s *Server) Restart() {
	s.tb.Helper()
	s.Stop()
	if err := s.start(); err != nil {
		s.tb.Fatal(err)
	}
}

// String is the address.
func (s *Server) String() string { return fmt.Sprint(s.Addr) }
