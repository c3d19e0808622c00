// Package nodetest starts real LiveEdge nodes for tests and benchmarks: in
// process on free 127.0.0.1 ports with a temporary data directory (real
// Pebble, real embedded NATS, real sockets), and mints tokens for them.
package nodetest

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
)

// Config returns the single-node default adjusted for tests: ephemeral ports,
// a temporary data dir, no open/close rate limit, no chat limit, and quiet logs.
func Config(tb testing.TB) configs.Config {
	c := configs.Default()
	c.Node.DataDir = tb.TempDir()
	c.HTTP.Addr = "127.0.0.1:0"
	c.WS.Addr = "127.0.0.1:0"
	c.Rooms.OpenCloseInterval = 0
	c.Limits.ChatPerSecond = 0
	c.Log.Level = "warn"
	// Tests park idle readers after 20 ms, so that the whole suite crosses
	// the park/wake path constantly; benchmarks measure the shipped default.
	if _, bench := tb.(*testing.B); !bench {
		c.WS.ReadParkAfter = configs.Duration(20 * time.Millisecond)
	}
	return c
}

// Logger returns a logger at level for tests (stderr, so failures show context).
func Logger(level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

// Start starts a node with cfg (see Config) and shuts it down when the test ends.
func Start(tb testing.TB, cfg configs.Config) *gateway.Node {
	tb.Helper()
	n, err := gateway.New(cfg, Logger(cfg.Log.Level))
	if err != nil {
		tb.Fatalf("nodetest: new node: %v", err)
	}
	if err := n.Start(); err != nil {
		_ = n.Shutdown(context.Background())
		tb.Fatalf("nodetest: start node: %v", err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return n
}

// Token mints a token for user with role on n.
func Token(tb testing.TB, n *gateway.Node, user int64, role string) string {
	tb.Helper()
	tok, err := n.Auth.Issue(user, role, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	return tok
}

// WSURL is n's WebSocket URL without a token.
func WSURL(n *gateway.Node) string { return "ws://" + n.WS.Addr() + "/ws" }

// HTTPURL is n's HTTP base URL.
func HTTPURL(n *gateway.Node) string { return "http://" + n.API.Addr() }

// OpenRoom opens a room for anchor on n through the HTTP API and returns its id.
func OpenRoom(tb testing.TB, n *gateway.Node, anchor int64, typ int) int64 {
	tb.Helper()
	var out struct {
		Code int `json:"code"`
		Data struct {
			RoomID int64 `json:"room_id"`
		} `json:"data"`
	}
	status := DoJSON(tb, "POST", HTTPURL(n)+"/api/v1/rooms", Token(tb, n, anchor, gateway.RoleAnchor),
		fmt.Sprintf(`{"type":%d}`, typ), &out)
	if status != 200 || out.Code != 0 || out.Data.RoomID <= 0 {
		tb.Fatalf("nodetest: open room: status %d code %d", status, out.Code)
	}
	return out.Data.RoomID
}

// DoJSON performs an HTTP request with an optional bearer token and JSON body,
// decodes the JSON answer into out (if non-nil) and returns the status.
func DoJSON(tb testing.TB, method, url, token, body string, out any) int {
	tb.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatalf("nodetest: %s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	if out != nil {
		if err := decodeBody(resp, out); err != nil {
			tb.Fatalf("nodetest: %s %s: decode: %v", method, url, err)
		}
	}
	return resp.StatusCode
}

// Eventually polls cond every 10 ms until it holds or timeout passes.
func Eventually(tb testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("condition not met within %v: "+format, append([]any{timeout}, args...)...)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
