package gateway_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// reply reads until the reply to id.
func (w *tcpWS) reply(id int) (string, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		p, err := w.next(opText, time.Until(deadline))
		if err != nil {
			return "", err
		}
		if strings.Contains(string(p), fmt.Sprintf(`"id":%d,`, id)) {
			return string(p), nil
		}
	}
}

// waitReaders waits until want connections have a reader goroutine.
func waitReaders(t *testing.T, n *gateway.Node, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := metricValue(t, n, "liveedge_ws_readers_running")
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ws_readers_running %v, want %v", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// An idle connection has no reader goroutine once ws.read_park_after has
// passed; a parked connection still answers a ping and requests, including
// a frame cut in two and a message in two fragments with the reader parked
// in between, and parks again.
func TestIdleReadersParked(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.ReadParkAfter = configsDuration(30 * time.Millisecond)
	n := nodetest.Start(t, cfg)
	const conns = 40
	waitReaders(t, n, 0)
	before := runtime.NumGoroutine()
	ws := make([]*tcpWS, conns)
	for i := range ws {
		ws[i] = dialTCPWS(t, n, int64(100+i))
	}
	waitReaders(t, n, 0)
	if g := runtime.NumGoroutine() - before; g > conns/4 {
		t.Fatalf("%d goroutines more with %d idle connections", g, conns)
	}
	for i, w := range ws {
		if err := w.write(opPing, []byte("p")); err != nil {
			t.Fatal(err)
		}
		if p, err := w.next(opPong, 5*time.Second); err != nil || string(p) != "p" {
			t.Fatalf("conn %d: pong %q %v", i, p, err)
		}
		if i >= 4 {
			continue
		}
		parked := func() {
			time.Sleep(10 * time.Millisecond)
			waitReaders(t, n, 0)
		}
		// One frame, its header cut, the reader parked in between.
		f := maskedFrame(0x81, []byte(`{"t":"ping","id":7,"d":{}}`))
		parked()
		_, _ = w.conn.Write(f[:3])
		parked()
		_, _ = w.conn.Write(f[3:])
		if _, err := w.reply(7); err != nil {
			t.Fatalf("conn %d: frame in two: %v", i, err)
		}
		// A message in two fragments with a ping between them.
		_, _ = w.conn.Write(maskedFrame(0x01, []byte(`{"t":"ping",`)))
		parked()
		_, _ = w.conn.Write(maskedFrame(0x89, []byte("q")))
		if p, err := w.next(opPong, 5*time.Second); err != nil || string(p) != "q" {
			t.Fatalf("conn %d: pong between fragments %q %v", i, p, err)
		}
		parked()
		_, _ = w.conn.Write(maskedFrame(0x80, []byte(`"id":8,"d":{}}`)))
		if _, err := w.reply(8); err != nil {
			t.Fatalf("conn %d: fragmented message: %v", i, err)
		}
	}
	waitReaders(t, n, 0)
	if c := n.WS.Conns(); c != conns {
		t.Fatalf("%d connections, want %d", c, conns)
	}
}

// A parked connection ends as any other: the client going away, the node
// closing it (heartbeat 4402), the node shutting down (1001); OnClose runs
// (the slots come back) every time.
func TestParkedReadersEnd(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.ReadParkAfter = configsDuration(20 * time.Millisecond)
	cfg.WS.Heartbeat = configsDuration(400 * time.Millisecond)
	n := nodetest.Start(t, cfg)
	waitConns := func(want int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for n.WS.Conns() != want {
			if time.Now().After(deadline) {
				t.Fatalf("%d connections, want %d", n.WS.Conns(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// The client goes away.
	for i := 0; i < 5; i++ {
		w := dialTCPWS(t, n, int64(10+i))
		waitReaders(t, n, 0)
		_ = w.conn.Close()
		waitConns(0)
	}

	// The node closes a silent connection (2 × heartbeat): the close frame
	// reaches the parked connection's client, the client answers it.
	w := dialTCPWS(t, n, 20)
	waitReaders(t, n, 0)
	code, err := w.closeCode(5 * time.Second)
	if err != nil || code != proto.CloseHeartbeatTimeout {
		t.Fatalf("silent parked connection: close %d %v, want %d", code, err, proto.CloseHeartbeatTimeout)
	}
	_ = w.write(opClose, binary.BigEndian.AppendUint16(nil, 1000))
	waitConns(0)

	// Shutdown with parked connections: each gets 1001, none waits for
	// more than the close linger.
	cfg.WS.Heartbeat = configsDuration(10 * time.Second)
	cfg.Node.DataDir = t.TempDir()
	n2 := nodetest.Start(t, cfg)
	var ws []*tcpWS
	for i := 0; i < 5; i++ {
		ws = append(ws, dialTCPWS(t, n2, int64(30+i)))
	}
	waitReaders(t, n2, 0)
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- n2.Shutdown(ctx)
	}()
	for i, w := range ws {
		if code, err := w.closeCode(5 * time.Second); err != nil || code != proto.CloseGoingAway {
			t.Fatalf("conn %d at shutdown: close %d %v, want 1001", i, code, err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("shutdown took %v", d)
	}
}

// Frames a server must refuse close the connection with the code RFC 6455
// gives them, whether the reader was parked or running when they came.
func TestReaderRefusesBadFrames(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.ReadParkAfter = configsDuration(20 * time.Millisecond)
	n := nodetest.Start(t, cfg)
	unmasked := []byte{0x81, 0x02, '{', '}'}
	big := maskedFrame(0x81, []byte(""))
	big[1] = 0x80 | 127
	big = append(big[:2], binary.BigEndian.AppendUint64(nil, uint64(cfg.WS.MaxFrameHardBytes)+1)...)
	big = append(big, 1, 2, 3, 4)
	cases := []struct {
		name  string
		frame []byte
		code  int
	}{
		{"unmasked", unmasked, 1002},
		{"reserved bit", maskedFrame(0xc1, []byte("{}")), 1002},
		{"opcode 3", maskedFrame(0x83, []byte("")), 1002},
		{"fragmented ping", maskedFrame(0x09, []byte("")), 1002},
		{"continuation first", maskedFrame(0x80, []byte("x")), 1002},
		{"over the hard limit", big, proto.CloseTooBig},
	}
	for i, tc := range cases {
		for _, park := range []bool{false, true} {
			w := dialTCPWS(t, n, int64(100+i))
			if park {
				waitReaders(t, n, 0)
			}
			_, _ = w.conn.Write(tc.frame)
			if code, err := w.closeCode(5 * time.Second); err != nil || code != tc.code {
				t.Fatalf("%s (parked %v): close %d %v, want %d", tc.name, park, code, err, tc.code)
			}
			_ = w.conn.Close()
		}
	}
}
