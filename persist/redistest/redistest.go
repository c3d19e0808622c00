// Package redistest starts throwaway real redis-server processes for tests
// and benchmarks: a free 127.0.0.1 port, no persistence, killed at cleanup.
// `make test` installs redis-server when the machine lacks it.
package redistest

import (
	"strconv"
	"testing"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist/servertest"
)

// Server is one running redis-server. Stop kills it (all data is lost: it
// keeps nothing on disk); Restart starts an empty one on the same port.
type Server struct {
	*servertest.Server
}

// Start starts a redis-server on a free port; it stops when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	return StartWith(tb)
}

// StartWith is Start with more redis-server arguments ("--requirepass",
// "pw"). Clients of Client do not authenticate.
func StartWith(tb testing.TB, args ...string) *Server {
	tb.Helper()
	return &Server{servertest.Start(tb, "redis-server", func(port int) []string {
		return append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"}, args...)
	})}
}

// String is the address.
func (s *Server) String() string { return s.Addr }

// Client returns a client of s without client-side caching (tests read what
// Redis holds now), closed when the test ends.
func (s *Server) Client(tb testing.TB) rueidis.Client {
	tb.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{s.Addr}, DisableCache: true})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(c.Close)
	return c
}
