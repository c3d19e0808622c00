package gateway_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(es)
}

// A WebSocket handshake that gws refuses (valid token, no Sec-WebSocket-Key)
// gets its 400 and its socket closed: a loop of bad handshakes must not leak
// one file descriptor each (the slot was already released, so ws.max_conns
// would not bound them).
func TestBadHandshakeClosesSocket(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	tok := nodetest.Token(t, n, 42, "viewer")
	bad := func() {
		c, err := net.Dial("tcp", n.WS.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /ws?token=%s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n", tok)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("bad handshake: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusSwitchingProtocols {
			t.Fatal("a handshake without Sec-WebSocket-Key was upgraded")
		}
	}
	bad() // warm up: listeners, pools
	before := openFDs(t)
	const tries = 50
	for range tries {
		bad()
	}
	var after int
	nodetest.Eventually(t, 5*time.Second, func() bool { after = openFDs(t); return after < before+tries/5 },
		"file descriptors leaked by refused handshakes")
	t.Logf("open fds: %d before, %d after %d refused handshakes", before, after, tries)
}

// rawHandshake writes req (and extra, in the same write) to a new connection
// to the node's WebSocket port and returns the connection and the response.
func rawHandshake(t *testing.T, n *gateway.Node, req string, extra []byte) (net.Conn, *bufio.Reader, *http.Response) {
	t.Helper()
	c, err := net.Dial("tcp", n.WS.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(append([]byte(req), extra...)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("response: %v", err)
	}
	return c, br, resp
}

// maskedText is a client text frame (FIN, masked) of a short payload.
func maskedText(payload string) []byte {
	key := [4]byte{1, 2, 3, 4}
	f := []byte{0x81, 0x80 | byte(len(payload)), key[0], key[1], key[2], key[3]}
	for i := range len(payload) {
		f = append(f, payload[i]^key[i%4])
	}
	return f
}

// readText reads one unmasked server text frame (payload < 64 KiB).
func readText(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	h := make([]byte, 2)
	if _, err := io.ReadFull(br, h); err != nil {
		t.Fatalf("frame header: %v", err)
	}
	n := int(h[1] & 0x7f)
	if n == 126 {
		ext := make([]byte, 2)
		if _, err := io.ReadFull(br, ext); err != nil {
			t.Fatal(err)
		}
		n = int(ext[0])<<8 | int(ext[1])
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(br, p); err != nil {
		t.Fatalf("frame payload: %v", err)
	}
	return string(p)
}

// A client that sends its first frame in the same write as the upgrade
// request (not waiting for the 101) is served: the bytes read past the
// request are handed to the connection's reader before the socket's.
func TestHandshakeFrameSentWithTheRequest(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	tok := nodetest.Token(t, n, 42, "viewer")
	req := fmt.Sprintf("GET /ws?token=%s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", tok)
	_, br, resp := rawHandshake(t, n, req, maskedText(`{"t":"ping","id":7}`))
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", resp.StatusCode)
	}
	if f := readText(t, br); !strings.Contains(f, `"t":"hello"`) {
		t.Fatalf("first frame %s, want the hello", f)
	}
	if f := readText(t, br); !strings.Contains(f, `"id":7`) || !strings.Contains(f, `"code":0`) {
		t.Fatalf("second frame %s, want the reply to ping 7", f)
	}
}

// The WebSocket port answers what is not an upgrade and closes: 404 for
// another path, 431 for headers over 16 KiB, 400 for a request it cannot
// parse — each in the JSON envelope (before, the last two were a text/plain
// status line).
func TestHandshakeRefusals(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	for _, tc := range []struct {
		name, req string
		status    int
		code      int
	}{
		{"other path", "GET /other HTTP/1.1\r\nHost: x\r\n\r\n", http.StatusNotFound, proto.CodeNotFound},
		{"huge headers", "GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 20<<10) + "\r\n\r\n",
			http.StatusRequestHeaderFieldsTooLarge, proto.CodeBadRequest},
		{"not HTTP", "HELLO\r\n\r\n", http.StatusBadRequest, proto.CodeBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _, resp := rawHandshake(t, n, tc.req, nil)
			var env struct {
				Code int    `json:"code"`
				Msg  string `json:"msg"`
			}
			err := json.NewDecoder(resp.Body).Decode(&env)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if err != nil || env.Code != tc.code || env.Msg == "" || resp.Header.Get("Content-Type") != "application/json" {
				t.Fatalf("body %+v (%v, %s), want the envelope with code %d", env, err, resp.Header.Get("Content-Type"), tc.code)
			}
			if !resp.Close {
				t.Fatal("answer without Connection: close")
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err == nil {
				t.Fatal("connection still open after the answer")
			}
		})
	}
}

// A request with a good token that is not a WebSocket upgrade (another
// method, no Upgrade or Connection header, another version, no key) is
// refused 400 in the envelope, 10001 naming what is missing — gws answered
// it in plain text with its own words ("gws: handshake error") — and holds
// no connection slot of the user. A well-formed upgrade is still taken,
// with the headers in any case and Connection a list.
func TestNotAnUpgradeRefusedInTheEnvelope(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	tok := nodetest.Token(t, n, 100, gateway.RoleViewer)
	const key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
	upgrade := func(method, headers string) string {
		return method + " /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok + "\r\n" + headers + "\r\n"
	}
	for _, tc := range []struct{ name, req, want string }{
		{"no upgrade headers", upgrade("GET", ""), "Connection: Upgrade"},
		{"POST", upgrade("POST", "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"+key), "GET"},
		{"no Upgrade", upgrade("GET", "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"+key), "Upgrade: websocket"},
		{"version 8", upgrade("GET", "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n"+key), "Version"},
		{"no key", upgrade("GET", "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"), "Key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, resp := rawHandshake(t, n, tc.req, nil)
			var env struct {
				Code int    `json:"code"`
				Msg  string `json:"msg"`
			}
			err := json.NewDecoder(resp.Body).Decode(&env)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest || err != nil || env.Code != proto.CodeBadRequest ||
				!strings.Contains(env.Msg, tc.want) || resp.Header.Get("Content-Type") != "application/json" {
				t.Fatalf("%d %s %+v (%v), want 400 and the envelope with 10001 naming %q", resp.StatusCode, resp.Header.Get("Content-Type"), env, err, tc.want)
			}
		})
	}
	if v := metricValue(t, n, "liveedge_connections"); v != 0 {
		t.Fatalf("%v connections after the refusals", v)
	}
	for _, conn := range []string{"connection: keep-alive, upgrade\r\n", "Connection: keep-alive\r\nConnection: Upgrade\r\n"} {
		_, _, resp := rawHandshake(t, n, upgrade("GET", conn+"upgrade: WebSocket\r\nsec-websocket-version: 13\r\n"+strings.ToLower(key[:19])+key[19:]), nil)
		if resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("a well-formed upgrade (%q): %s", conn, resp.Status)
		}
	}
}

// An unknown file of the demo is 404 in the envelope, as every unknown path.
func TestUnknownDemoFileIsTheEnvelope(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	var env struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "GET", nodetest.HTTPURL(n)+"/demo/nosuch.js", "", "", &env); st != 404 || env.Code != proto.CodeNotFound {
		t.Fatalf("an unknown demo file: %d %+v, want 404 10004", st, env)
	}
}

// An upgrade request not read whole within ws.handshake_timeout is answered
// 408 and closed, at that bound (not a fixed one).
func TestHandshakeTimeoutConfigured(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.HandshakeTimeout = configsDuration(300 * time.Millisecond)
	n := nodetest.Start(t, cfg)
	c, err := net.Dial("tcp", n.WS.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	if _, err := io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: liveedge\r\nX-Slow: "); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if took := time.Since(start); resp.StatusCode != http.StatusRequestTimeout || took > 3*time.Second {
		t.Fatalf("a slow upgrade request: %s after %v, want 408 after ~300ms", resp.Status, took)
	}
}
