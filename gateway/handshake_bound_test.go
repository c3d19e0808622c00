package gateway_test

import (
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
)

// Sockets that connect and send nothing (an upgrade request never comes,
// or trickles) hold at most gateway.MaxHandshakes handshakes: the rest wait
// in the listen backlog, with no goroutine, reader or file of the node's —
// before, each held one until ws.handshake_timeout, as many as a client
// opened. Once they go, a real client is served.
func TestSilentSocketsHoldBoundedHandshakes(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	const extra = 1000
	before := runtime.NumGoroutine()
	var silent []net.Conn
	t.Cleanup(func() {
		for _, c := range silent {
			_ = c.Close()
		}
	})
	for range gateway.MaxHandshakes + extra {
		c, err := net.DialTimeout("tcp", n.WS.Addr(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, c)
	}
	nodetest.Eventually(t, 5*time.Second, func() bool {
		return runtime.NumGoroutine()-before >= gateway.MaxHandshakes
	}, "the handshakes started")
	time.Sleep(200 * time.Millisecond) // the accept loop would have gone on by now
	if grew := runtime.NumGoroutine() - before; grew > gateway.MaxHandshakes+extra/2 {
		t.Fatalf("%d goroutines more for %d silent sockets: the handshakes are not bounded (%d)", grew, len(silent), gateway.MaxHandshakes)
	}
	for _, c := range silent {
		_ = c.Close()
	}
	silent = nil
	r := dial(t, n, 5, nodetest.RawOptions{}) // waits for the hello
	r.Close()
}
