package gateway_test

import (
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

type readyz struct {
	status int
	code   int
	msg    string
	dep    string // data.dependency
	body   string
}

func getReadyz(t *testing.T, n *gateway.Node) readyz {
	t.Helper()
	resp, err := http.Get(nodetest.HTTPURL(n) + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := readyz{status: resp.StatusCode}
	if r.status == http.StatusOK {
		return r
	}
	var env struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
		Data struct {
			Ready      *bool  `json:"ready"`
			Dependency string `json:"dependency"`
		} `json:"data"`
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("/readyz %d with Content-Type %q, want a JSON envelope", r.status, ct)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(body, &env); err != nil {
		t.Fatalf("/readyz %d: body is not a JSON envelope: %v", r.status, err)
	}
	if env.Data.Ready == nil || *env.Data.Ready {
		t.Fatalf("/readyz %d: data.ready %v, want false: %s", r.status, env.Data.Ready, body)
	}
	r.code, r.msg, r.dep, r.body = env.Code, env.Msg, env.Data.Dependency, string(body)
	return r
}

// A shared-mode node needs Redis: with its Redis stopped /readyz answers 503
// with a JSON envelope; with Redis back (empty: the wallet rebuilds from the
// ledger) it is ready again.
func TestReadyzFollowsRedisInSharedMode(t *testing.T) {
	rs := redistest.Start(t)
	cfg := nodetest.Config(t)
	cfg.Wallet.Mode, cfg.Wallet.Nodes, cfg.Redis.Addr = "shared", []string{cfg.Node.ID}, rs.Addr
	n := nodetest.Start(t, cfg)
	nodetest.Eventually(t, 10*time.Second, func() bool { return getReadyz(t, n).status == http.StatusOK },
		"shared-mode node not ready with Redis up")

	rs.Stop()
	var r readyz
	nodetest.Eventually(t, 10*time.Second, func() bool { r = getReadyz(t, n); return r.status == http.StatusServiceUnavailable },
		"/readyz still %d with Redis stopped", r.status)
	if r.code != proto.CodeInternal || !strings.Contains(r.msg, "Redis") {
		t.Fatalf("/readyz envelope code %d msg %q, want %d naming Redis", r.code, r.msg, proto.CodeInternal)
	}
	// The dependency by name, nothing of the driver's error (Redis's
	// address, "connection refused"): that is logged, not answered.
	_, port, _ := net.SplitHostPort(rs.Addr)
	if r.dep != "redis" || strings.Contains(r.body, port) || strings.Contains(r.body, "refused") || strings.Contains(r.body, "dial") {
		t.Fatalf("/readyz data.dependency %q, body %s: want \"redis\" and no error details", r.dep, r.body)
	}

	rs.Restart()
	nodetest.Eventually(t, 30*time.Second, func() bool { r = getReadyz(t, n); return r.status == http.StatusOK },
		"/readyz not ready again after Redis came back: %d %q", r.status, r.msg)
}

// A node whose external NATS is not up yet starts anyway and is ready (no
// feature needs NATS); when NATS comes up the node connects by itself and
// makes its JetStream stream.
func TestNodeStartsWhileExternalNATSIsDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close() // nothing listens there now

	cfg := nodetest.Config(t)
	cfg.NATS.Embedded, cfg.NATS.URL = false, "nats://127.0.0.1:"+strconv.Itoa(port)
	n := nodetest.Start(t, cfg)
	if r := getReadyz(t, n); r.status != http.StatusOK {
		t.Fatalf("/readyz %d %q with NATS down, want 200", r.status, r.msg)
	}
	if n.NC.IsConnected() {
		t.Fatal("connected to a NATS that is not running")
	}

	ns, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: port, JetStream: true,
		StoreDir: filepath.Join(t.TempDir(), "js"), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	nodetest.Eventually(t, 20*time.Second, n.NC.IsConnected, "node did not connect once NATS came up")
	js, err := n.NC.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	nodetest.Eventually(t, 10*time.Second, func() bool {
		_, err := js.StreamInfo(gateway.RoomEventsStream)
		return err == nil
	}, "stream %s not made after NATS came up", gateway.RoomEventsStream)
	if r := getReadyz(t, n); r.status != http.StatusOK {
		t.Fatalf("/readyz %d %q with NATS up", r.status, r.msg)
	}
}

// The room-events stream is bounded in count and bytes, not only in age —
// also when an older version made it without the bounds.
func TestRoomEventsStreamIsBounded(t *testing.T) {
	ns := natstest.Start(t)
	nc, err := nats.Connect(ns.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := nc.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	// As the version before the bounds made it.
	if _, err := js.AddStream(&nats.StreamConfig{Name: gateway.RoomEventsStream, Subjects: []string{"liveedge.room.>"},
		MaxAge: 7 * 24 * time.Hour, Storage: nats.FileStorage}); err != nil {
		t.Fatal(err)
	}
	cfg := nodetest.Config(t)
	cfg.NATS.Embedded, cfg.NATS.URL = false, ns.URL
	nodetest.Start(t, cfg)
	info, err := js.StreamInfo(gateway.RoomEventsStream)
	if err != nil {
		t.Fatal(err)
	}
	if c := info.Config; c.MaxMsgs != gateway.RoomEventsMaxMsgs || c.MaxBytes != gateway.RoomEventsMaxBytes || c.Discard != nats.DiscardOld {
		t.Fatalf("stream bounds: %d msgs, %d bytes, discard %v", c.MaxMsgs, c.MaxBytes, c.Discard)
	}
}
