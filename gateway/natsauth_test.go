package gateway_test

import (
	"net"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/liveedge/liveedge/gateway/nodetest"
)

// The embedded NATS listening on a port requires the configured token of
// every client, the node's own in-process one included (it starts and
// serves), and bounds its JetStream disk. Before, nats.user/token were not
// given to it: anyone reaching the port could use it.
func TestEmbeddedNATSRequiresItsCredentials(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := nodetest.Config(t)
	cfg.NATS.Listen, cfg.NATS.Token = addr, "embedded-nats-token-for-the-test"
	n := nodetest.Start(t, cfg)
	if _, err := nats.Connect("nats://"+addr, nats.MaxReconnects(0)); err == nil {
		t.Fatal("a client without the token connected to the embedded NATS")
	}
	nc, err := nats.Connect("nats://"+addr, nats.Token(cfg.NATS.Token), nats.MaxReconnects(0))
	if err != nil {
		t.Fatalf("with the token: %v", err)
	}
	defer nc.Close()
	nodetest.OpenRoom(t, n, 900, 1) // the node's own connection works
}
