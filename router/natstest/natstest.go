// Package natstest starts throwaway real nats-server processes for tests:
// a free 127.0.0.1 port, JetStream in a temp dir, killed at cleanup.
// `make test` installs nats-server (Debian package) when the machine lacks it.
package natstest

import (
	"strconv"
	"testing"

	"github.com/liveedge/liveedge/persist/servertest"
)

// Server is one running nats-server. Restart starts it again on the same
// port (JetStream data kept in its directory; core NATS messages in flight
// are lost).
type Server struct {
	*servertest.Server
	URL string // nats://127.0.0.1:port
}

// Start starts a nats-server on a free port; it stops when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	return StartWith(tb)
}

// StartWith is Start with more nats-server arguments ("--user", "u",
// "--pass", "p").
func StartWith(tb testing.TB, args ...string) *Server {
	tb.Helper()
	dir := tb.TempDir()
	s := servertest.Start(tb, "nats-server", func(port int) []string {
		return append([]string{"-a", "127.0.0.1", "-p", strconv.Itoa(port), "-js", "-sd", dir}, args...)
	})
	return &Server{Server: s, URL: "nats://" + s.Addr}
}
