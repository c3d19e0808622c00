package clientsdk

import (
	"context"
	"net"
	"testing"
	"time"
)

// Config.LocalAddr is the source address of the connection (loadgen's
// -src-ips spreads connections over 127.0.0.x this way).
func TestDialerLocalAddr(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d := &ctxDialer{ctx: ctx, local: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 3)}}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d.stop()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ip := s.RemoteAddr().(*net.TCPAddr).IP; !ip.Equal(net.IPv4(127, 0, 0, 3)) {
		t.Fatalf("remote address %v, want 127.0.0.3", ip)
	}
}
