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
	Addr string
	bin  string
	port int
	cmd  *exec.Cmd
	tb   testing.TB
}

// Start starts a redis-server on a free port; it stops when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		tb.Fatalf("redistest: redis-server not installed (make test installs it): %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), bin: bin, port: port, tb: tb}
	s.start()
	tb.Cleanup(s.Stop)
	return s
}

func (s *Server) start() {
	s.tb.Helper()
	s.cmd = exec.Command(s.bin, "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning")
	if err := s.cmd.Start(); err != nil {
		s.tb.Fatalf("redistest: start: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", s.Addr, 100*time.Millisecond)
		if err == nil {
			_ = c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.tb.Fatalf("redistest: redis-server on %s not up", s.Addr)
}

// Stop kills the server (all data is lost: it keeps nothing on disk).
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		s.cmd = nil
	}
}

// Restart kills the server and starts an empty one on the same port.
func (s *Server) Restart() {
	s.tb.Helper()
	s.Stop()
	s.start()
}

// String is the address.
func (s *Server) String() string { return fmt.Sprint(s.Addr) }
