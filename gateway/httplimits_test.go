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

// getWithin sends GET /healthz on a new connection and reads its status
// line, waiting at most wait.
func getWithin(addr string, wait time.Duration) (string, error) {
	c, err := net.Dial("tcp", addr) // accepted by the kernel: the backlog
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(wait))
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: liveedge\r\nConnection: close\r\n\r\n"); err != nil {
		return "", err
	}
	return bufio.NewReader(c).ReadString('\n')
}

// At http.max_conns open connections, all of them busy (a request's bytes
// arriving), a new one waits (in the listen backlog) until one closes; it is
// then served.
func TestHTTPConnectionsBounded(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.HTTP.MaxConns = 2
	cfg.HTTP.ReadTimeout = configs.Duration(30 * time.Second)
	n := nodetest.Start(t, cfg)
	stop := make(chan struct{})
	defer close(stop)
	var held []net.Conn
	for range cfg.HTTP.MaxConns {
		c, err := net.Dial("tcp", n.API.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
		// A body trickled in: never idle for long.
		if _, err := io.WriteString(c, "POST /api/v1/dev/token HTTP/1.1\r\nHost: liveedge\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"); err != nil {
			t.Fatal(err)
		}
		go func() {
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := c.Write([]byte(" ")); err != nil {
						return
					}
				}
			}
		}()
	}
	if line, err := getWithin(n.API.Addr(), 2*time.Second); err == nil {
		t.Fatalf("a third connection (max_conns 2, both busy) was served: %q", line)
	}
	held[0].Close()
	if line, err := getWithin(n.API.Addr(), 5*time.Second); err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
		t.Fatalf("after one of the two closed: %q, %v; want 200", line, err)
	}
}

// At http.max_conns, keep-alive connections idle between requests give way
// to a new one (the one idle longest is closed): a few clients making one
// request a minute each kept every slot for the idle timeout, the load
// balancer's /healthz and the provider's notifies waiting behind them.
func TestHTTPIdleConnectionsGiveWay(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.HTTP.MaxConns = 2
	cfg.HTTP.ReadTimeout = configs.Duration(30 * time.Second)
	n := nodetest.Start(t, cfg)
	for range cfg.HTTP.MaxConns {
		c, err := net.Dial("tcp", n.API.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: liveedge\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
			t.Fatalf("keep-alive request: %q, %v", line, err)
		}
	}
	begin := time.Now()
	if line, err := getWithin(n.API.Addr(), 8*time.Second); err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
		t.Fatalf("with two idle keep-alive connections at max_conns 2: %q, %v after %v; want 200", line, err, time.Since(begin))
	}
}
