package gateway_test

import (
	"bufio"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
)

// Sockets that connect and send nothing (an upgrade request that never
// comes, or trickles) hold at most the bound of upgrade requests read from
// one address — beyond it the node closes them at once — and never the door
// for others: a client from another address is upgraded meanwhile.
// Before, each silent socket held a goroutine, a reader and a file until
// ws.handshake_timeout, as many as a client opened (and a first bound,
// waiting for a free slot before accepting, let one address's idle sockets
// stall every other client).
func TestSilentSocketsHoldBoundedHandshakes(t *testing.T) {
	const all, perIP = 60, 40
	restore := gateway.SetHandshakeBounds(all, perIP)
	n := nodetest.Start(t, nodetest.Config(t))
	restore()
	var silent []net.Conn
	t.Cleanup(func() {
		for _, c := range silent {
			_ = c.Close()
		}
	})
	for range perIP + 20 {
		c, err := net.DialTimeout("tcp", n.WS.Addr(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, c)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.HandshakesReading() == perIP }, "the first %d handshakes reading", perIP)
	// The last one was over the address's bound: closed by the node.
	_ = silent[len(silent)-1].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := silent[len(silent)-1].Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("a socket over the bound: %v, want it closed by the node", err)
	}
	// Another address is served while this one holds its bound.
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	c, err := d.Dial("tcp", n.WS.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer " + nodetest.Token(t, n, 5, gateway.RoleViewer) + "\r\n\r\n"
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade from another address while one holds its bound: %v %v", resp, err)
	}
	if got := n.WS.HandshakesReading(); got != perIP {
		t.Fatalf("%d requests being read, want the %d silent ones", got, perIP)
	}
	for _, c := range silent {
		_ = c.Close()
	}
	silent = nil
	nodetest.Eventually(t, 5*time.Second, func() bool { return n.WS.HandshakesReading() == 0 }, "the slots given back")
	r := dial(t, n, 6, nodetest.RawOptions{}) // from the first address again
	r.Close()
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout() || strings.Contains(err.Error(), "timeout")
}
