package gateway_test

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
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
