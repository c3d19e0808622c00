package gateway

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// failingOnce is a listener whose first Accept fails as when the process is
// out of files.
type failingOnce struct {
	net.Listener
	failed bool
}

func (l *failingOnce) Accept() (net.Conn, error) {
	if !l.failed {
		l.failed = true
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// A failed accept (out of files) is retried, not handed to Hertz (whose
// standard transport stops serving for good on any Accept error but one
// saying "closed"); a closed listener ends Accept, also while it waits for a
// slot, and a connection gives its slot back once.
func TestAPIListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := newAPIListener(&failingOnce{Listener: inner}, 1, slog.New(slog.DiscardHandler))
	defer l.Close()
	go func() {
		if c, err := net.Dial("tcp", inner.Addr().String()); err == nil {
			defer c.Close()
			time.Sleep(time.Second)
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("Accept after an EMFILE: %v, want the connection", err)
	}
	if l.open() != 1 {
		t.Fatalf("open %d, want 1", l.open())
	}
	c.Close()
	c.Close()
	if l.open() != 0 {
		t.Fatalf("open %d after two Closes, want 0", l.open())
	}

	l.mu.Lock()
	l.n = l.max // full, none idle: the next Accept waits for a slot
	l.mu.Unlock()
	ended := make(chan error, 1)
	go func() { _, err := l.Accept(); ended <- err }()
	time.Sleep(50 * time.Millisecond)
	l.Close()
	select {
	case err := <-ended:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept waiting for a slot, listener closed: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept waiting for a slot did not end when the listener closed")
	}
}

// A NATS URL with credentials in it is logged without them.
func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"nats://127.0.0.1:4222":                  "nats://127.0.0.1:4222",
		"nats://user:secret@10.0.0.1:4222":       "nats://redacted@10.0.0.1:4222",
		"nats://a:1@h1:4222, nats://tok@h2:4222": "nats://redacted@h1:4222,nats://redacted@h2:4222",
		"tls://u:p%zz@h:4222":                    "(unparsable URL with credentials)",
		"u:secret@h:4222":                        "nats://redacted@h:4222",
	} {
		if got := redactURL(in); got != want || strings.Contains(got, "secret") {
			t.Errorf("redactURL(%q) = %q, want %q", in, got, want)
		}
	}
	// The client's own error quotes the URL it was given.
	for _, raw := range []string{"tls://u:secret%zz@h:4222", "nats://u:secret@127.0.0.1:1", "u:secret@127.0.0.1:1",
		"nats://user:secret#x@h:4222", "nats://user:sec/ret@h:4222", "nats://u:sec%4Gret@h:4222", `nats://u:se"cret%zz@h`} {
		_, err := nats.Connect(raw, nats.Timeout(200*time.Millisecond))
		if err == nil {
			t.Fatalf("connected to %s", raw)
		}
		if got := natsErr("nats", raw, err).Error(); strings.Contains(got, "secret") || strings.Contains(got, "sec") || strings.Contains(got, "cret") {
			t.Errorf("the error of %s names its credentials: %s", raw, got)
		}
	}
}

// A grab from a slice renews the rain's owner as seen only if Redis named
// it the worker id's holder last: the slice of a rain whose node came back
// under another worker id names a node that holds it no more.
func TestSliceGrantRenewsOnlyTheOwnerRedisNamed(t *testing.T) {
	var o ownersSeen
	then := time.Now().Add(-time.Hour)
	o.touch(3, "gw-1", time.Now()) // never seen: not inserted
	if _, ok := o.get(3, time.Now()); ok {
		t.Fatal("touch inserted an owner Redis never named")
	}
	o.put(3, "gw-3", then)
	o.touch(3, "gw-1", time.Now())
	if _, ok := o.get(3, time.Now()); ok {
		t.Fatal("another node's touch renewed gw-3's sighting (or replaced it)")
	}
	o.touch(3, "gw-3", time.Now())
	if node, ok := o.get(3, time.Now()); !ok || node != "gw-3" {
		t.Fatalf("gw-3's own touch: %q %v, want it renewed", node, ok)
	}
}
