package gateway_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway/nodetest"
)

// Headers above http.max_header_bytes end the connection at once, before
// any handler or token check: Hertz's own bound was 1 MiB, read and buffered
// (several times over) for up to the read timeout — 300 such connections held
// ~1.3 GiB of heap without a token.
func TestHTTPHeadersAboveTheBoundEndTheConnection(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.HTTP.ReadTimeout = configs.Duration(30 * time.Second)
	n := nodetest.Start(t, cfg)
	conn, err := net.Dial("tcp", n.API.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Headers never ended: the node must not wait for the rest.
	req := "GET /healthz HTTP/1.1\r\nHost: liveedge\r\nX-Pad: " + strings.Repeat("x", 4*cfg.HTTP.MaxHeaderBytes)
	begin := time.Now()
	go func() { _, _ = io.WriteString(conn, req) }()
	_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	reply, _ := io.ReadAll(conn) // until the node closes
	if d := time.Since(begin); d > 10*time.Second {
		t.Fatalf("headers of %d bytes (bound %d) held the connection %v (read timeout 30s)", len(req), cfg.HTTP.MaxHeaderBytes, d)
	}
	if strings.HasPrefix(string(reply), "HTTP/1.1 200") {
		t.Fatalf("headers above the bound answered %q", reply)
	}

	// Headers within the bound are served.
	resp, err := http.Get(nodetest.HTTPURL(n) + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz: %d", resp.StatusCode)
	}
}

// At http.max_conns open connections a new one waits (in the listen
// backlog) until one closes; it is then served.
func TestHTTPConnectionsBounded(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.HTTP.MaxConns = 2
	n := nodetest.Start(t, cfg)
	var held []net.Conn
	for range cfg.HTTP.MaxConns {
		c, err := net.Dial("tcp", n.API.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	get := func(wait time.Duration) (string, error) {
		c, err := net.Dial("tcp", n.API.Addr()) // accepted by the kernel: the backlog
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(wait))
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: liveedge\r\nConnection: close\r\n\r\n"); err != nil {
			return "", err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		return line, err
	}
	if line, err := get(time.Second); err == nil {
		t.Fatalf("a third connection (max_conns 2) was served: %q", line)
	}
	held[0].Close()
	if line, err := get(5 * time.Second); err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
		t.Fatalf("after one of the two closed: %q, %v; want 200", line, err)
	}
}
