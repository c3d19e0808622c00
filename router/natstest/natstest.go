// Package natstest starts throwaway real nats-server processes for tests:
// a free 127.0.0.1 port, JetStream in a temp dir, killed at cleanup.
// `make test` installs nats-server (Debian package) when the machine lacks it.
package natstest

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// Server is one running nats-server.
type Server struct {
	Addr   string
	URL    string
	bin    string
	port   int
	dir    string
	cmd    *exec.Cmd
	exited chan struct{}
	tb     testing.TB
}

// Start starts a nats-server on a free port; it stops when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	bin, err := exec.LookPath("nats-server")
	if err != nil {
		tb.Fatalf("natstest: nats-server not installed (make test installs it): %v", err)
	}
	s := &Server{bin: bin, tb: tb, dir: tb.TempDir()}
	tb.Cleanup(s.Stop)
	for attempt := 1; ; attempt++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		s.port = ln.Addr().(*net.TCPAddr).Port
		s.Addr = "127.0.0.1:" + strconv.Itoa(s.port)
		s.URL = "nats://" + s.Addr
		_ = ln.Close()
		if err = s.start(); err == nil {
			return s
		}
		if attempt == 5 {
			tb.Fatal(err)
		}
	}
}

func (s *Server) start() error {
	s.cmd = exec.Command(s.bin, "-a", "127.0.0.1", "-p", strconv.Itoa(s.port), "-js", "-sd", s.dir)
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("natstest: start: %w", err)
	}
	cmd, exited := s.cmd, make(chan struct{})
	s.exited = exited
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			s.cmd = nil
			return fmt.Errorf("natstest: nats-server on %s exited at start (port taken?)", s.Addr)
		default:
		}
		c, err := net.DialTimeout("tcp", s.Addr, 100*time.Millisecond)
		if err == nil {
			_ = c.Close()
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
	return fmt.Errorf("natstest: nats-server on %s not up", s.Addr)
}

// Stop kills the server.
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		<-s.exited
		s.cmd = nil
	}
}

// Restart kills the server and starts it again on the same port (JetStream
// data kept in its directory; core NATS messages in flight are lost).
func (s *Server) Restart() {
	s.tb.Helper()
	s.Stop()
	if err := s.start(); err != nil {
		s.tb.Fatal(err)
	}
}
