package gateway

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); acc <- c }()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-acc
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// The lazy reader serves early bytes first, then the socket's, in order,
// through reads of any size; it holds a pooled buffer only while bytes it
// read are unconsumed; the peer's close is io.EOF.
func TestLazyReaderOrderAndRelease(t *testing.T) {
	client, server := tcpPair(t)
	l := newLazyReader(server, []byte("early:"))
	if l.rc == nil {
		t.Fatal("a TCP conn should be read through its RawConn")
	}
	if _, err := client.Write([]byte("from the socket")); err != nil {
		t.Fatal(err)
	}
	want := "early:from the socket"
	var got []byte
	p := make([]byte, 4)
	for len(got) < len(want) {
		n, err := l.Read(p)
		if err != nil {
			t.Fatalf("read after %q: %v", got, err)
		}
		got = append(got, p[:n]...)
	}
	if string(got) != want {
		t.Fatalf("read %q, want %q", got, want)
	}
	if l.buf != nil {
		t.Fatal("drained reader still holds its buffer")
	}

	// a read of at least readBufSize goes straight into the caller's slice
	big := make([]byte, readBufSize+10)
	for i := range big {
		big[i] = byte(i)
	}
	go func() { _, _ = client.Write(big) }()
	dst := make([]byte, len(big))
	if _, err := io.ReadFull(l, dst); err != nil {
		t.Fatal(err)
	}
	for i := range dst {
		if dst[i] != byte(i) {
			t.Fatalf("byte %d is %d", i, dst[i])
		}
	}

	client.Close()
	if n, err := l.Read(p); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("after the peer closed: %d, %v; want 0, EOF", n, err)
	}
	if l.buf != nil {
		t.Fatal("reader holds a buffer after EOF")
	}
}

// Waiting for bytes holds no buffer and ends at the read deadline, and at
// Close, as a plain Read does.
func TestLazyReaderDeadlineAndClose(t *testing.T) {
	_, server := tcpPair(t)
	l := newLazyReader(server, nil)
	_ = server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := l.Read(make([]byte, 16)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want a deadline error", err)
	}
	if l.buf != nil {
		t.Fatal("reader holds a buffer after a timed-out wait")
	}
	_ = server.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { _, err := l.Read(make([]byte, 16)); done <- err }()
	server.Close() // before or during the wait: either ends it
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end the wait")
	}
}
