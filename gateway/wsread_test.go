package gateway

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"testing"

	"github.com/lxzan/gws"
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

// clientFrame is a masked client frame.
func clientFrame(b0 byte, payload []byte, key [4]byte) []byte {
	f := []byte{b0}
	switch n := len(payload); {
	case n < 126:
		f = append(f, 0x80|byte(n))
	case n <= 0xffff:
		f = append(f, 0x80|126)
		f = binary.BigEndian.AppendUint16(f, uint16(n))
	default:
		f = append(f, 0x80|127)
		f = binary.BigEndian.AppendUint64(f, uint64(n))
	}
	f = append(f, key[:]...)
	for i, c := range payload {
		f = append(f, c^key[i&3])
	}
	return f
}

func TestParseFrameHeader(t *testing.T) {
	key := [4]byte{1, 2, 3, 4}
	text := func(n int) []byte { return clientFrame(0x81, bytes.Repeat([]byte("x"), n), key) }
	cases := []struct {
		name string
		b    []byte
		max  int
		size int // 0: incomplete
		err  error
	}{
		{"empty", nil, 100, 0, nil},
		{"one byte", []byte{0x81}, 100, 0, nil},
		{"no mask key yet", []byte{0x81, 0x85, 1, 2}, 100, 0, nil},
		{"7-bit length", text(5), 100, 2 + 4 + 5, nil},
		{"16-bit length, header cut", text(300)[:3], 1000, 0, nil},
		{"16-bit length", text(300), 1000, 4 + 4 + 300, nil},
		{"64-bit length", text(70000), 100000, 10 + 4 + 70000, nil},
		{"64-bit length, header cut", text(70000)[:9], 100000, 0, nil},
		{"over the limit: known from the header", text(300)[:4], 299, 0, errFrameTooBig},
		{"64-bit length with the top bit", append([]byte{0x81, 0xff}, 0x80, 0, 0, 0, 0, 0, 0, 1), 100, 0, errFrameTooBig},
		{"reserved bit", clientFrame(0xc1, []byte("x"), key), 100, 0, errRSV},
		{"not masked", []byte{0x81, 0x01, 'x'}, 100, 0, errUnmasked},
		{"opcode 3", clientFrame(0x83, nil, key), 100, 0, errOpcode},
		{"opcode 11", clientFrame(0x8b, nil, key), 100, 0, errOpcode},
		{"fragmented ping", clientFrame(0x09, nil, key), 100, 0, errControl},
		{"long ping", clientFrame(0x89, make([]byte, 126), key), 1000, 0, errControl},
		{"ping of 125", clientFrame(0x89, make([]byte, 125), key), 1000, 2 + 4 + 125, nil},
	}
	for _, tc := range cases {
		h, err := parseFrameHeader(tc.b, tc.max)
		if err != tc.err || (err == nil && h.size != tc.size) {
			t.Errorf("%s: size %d err %v, want %d %v", tc.name, h.size, err, tc.size, tc.err)
		}
	}
}

func TestUnmask(t *testing.T) {
	key := [4]byte{0x11, 0x22, 0x33, 0x44}
	for n := 0; n < 40; n++ {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i * 7)
		}
		want := make([]byte, n)
		for i := range p {
			want[i] = p[i] ^ key[i%4]
		}
		unmask(p, key)
		if !bytes.Equal(p, want) {
			t.Fatalf("n=%d: %x, want %x", n, p, want)
		}
	}
}

// errClosedByPeer ends a test reader after a close frame.
var errClosedByPeer = errors.New("closed by the client")

// event is what a test reader emitted.
type event struct {
	op gws.Opcode
	p  string
}

// testReader parses without a connection and records what it emits.
func testReader(max int) (*wsReader, *[]event) {
	var got []event
	r := &wsReader{max: max}
	r.emit = func(op gws.Opcode, p []byte) error {
		got = append(got, event{op, string(p)})
		if op == gws.OpcodeCloseConnection {
			return errClosedByPeer
		}
		return nil
	}
	return r, &got
}

// Fragmented messages are gathered between control frames, in order;
// continuation rules are enforced.
func TestReaderGathersFragments(t *testing.T) {
	key := [4]byte{9, 8, 7, 6}
	r, got := testReader(100)
	var in []byte
	in = append(in, clientFrame(0x01, []byte("he"), key)...) // text, not final
	in = append(in, clientFrame(0x89, []byte("p"), key)...)  // ping between fragments
	in = append(in, clientFrame(0x00, []byte("ll"), key)...)
	in = append(in, clientFrame(0x80, []byte("o"), key)...)
	in = append(in, clientFrame(0x82, []byte{1, 2}, key)...)
	if err := r.feed(in); err != nil {
		t.Fatal(err)
	}
	want := []event{{gws.OpcodePing, "p"}, {gws.OpcodeText, "hello"}, {gws.OpcodeBinary, "\x01\x02"}}
	if len(*got) != len(want) {
		t.Fatalf("got %q, want %q", *got, want)
	}
	for i := range want {
		if (*got)[i] != want[i] {
			t.Fatalf("got %q, want %q", *got, want)
		}
	}
	if r.part != nil || r.cont != nil {
		t.Fatal("state kept after whole messages")
	}

	for name, in := range map[string][]byte{
		"continuation first":        clientFrame(0x80, []byte("x"), key),
		"new message in a fragment": append(clientFrame(0x01, []byte("x"), key), clientFrame(0x81, []byte("y"), key)...),
	} {
		r, _ := testReader(100)
		if err := r.feed(in); err != errContinuation {
			t.Errorf("%s: %v, want errContinuation", name, err)
		}
	}
	r, _ = testReader(10)
	in = append(clientFrame(0x01, []byte("123456"), key), clientFrame(0x80, []byte("123456"), key)...)
	if err := r.feed(in); err != errMessageTooBig {
		t.Errorf("fragments over the limit: %v, want errMessageTooBig", err)
	}
}

// FuzzReaderSplits: whatever the bytes, the reader never panics, holds no
// more than a frame's bytes, and emits the same things with the same ending
// whether the bytes come at once or cut anywhere.
func FuzzReaderSplits(f *testing.F) {
	key := [4]byte{1, 2, 3, 4}
	var stream []byte
	stream = append(stream, clientFrame(0x81, []byte(`{"t":"ping","id":1,"d":{}}`), key)...)
	stream = append(stream, clientFrame(0x01, []byte("frag"), key)...)
	stream = append(stream, clientFrame(0x8a, []byte("pong"), key)...)
	stream = append(stream, clientFrame(0x80, bytes.Repeat([]byte("m"), 300), key)...)
	stream = append(stream, clientFrame(0x88, []byte{3, 232, 'b', 'y', 'e'}, key)...)
	f.Add(stream, uint16(3), uint16(7))
	f.Add(clientFrame(0x81, bytes.Repeat([]byte("z"), 70000), key), uint16(1000), uint16(9))
	f.Add([]byte{0x81, 0x01, 'x'}, uint16(1), uint16(1))
	f.Add([]byte{0x81, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, uint16(2), uint16(5))
	const max = 100000
	f.Fuzz(func(t *testing.T, in []byte, cut1, cut2 uint16) {
		whole, gotWhole := testReader(max)
		errWhole := whole.feed(append([]byte(nil), in...))

		split, gotSplit := testReader(max)
		var errSplit error
		rest := append([]byte(nil), in...)
		cuts := []int{int(cut1)%17 + 1, int(cut2)%4093 + 1}
		for i := 0; len(rest) > 0 && errSplit == nil; i++ {
			n := min(cuts[i%2], len(rest))
			errSplit = split.feed(rest[:n])
			rest = rest[n:]
			if len(split.part) > max+14 || len(split.cont) > max {
				t.Fatalf("holds %d bytes of a frame, %d of a message", len(split.part), len(split.cont))
			}
		}
		if errWhole != errSplit {
			t.Fatalf("ending %v at once, %v split", errWhole, errSplit)
		}
		if len(*gotWhole) != len(*gotSplit) {
			t.Fatalf("%d events at once, %d split", len(*gotWhole), len(*gotSplit))
		}
		for i := range *gotWhole {
			if (*gotWhole)[i] != (*gotSplit)[i] {
				t.Fatalf("event %d: %q at once, %q split", i, (*gotWhole)[i], (*gotSplit)[i])
			}
		}
	})
}

// A client that declares a big frame and sends little pins little: part
// grows as the bytes arrive, not to the declared size; a fragment that
// would take a message over the limit is refused from its header.
func TestReaderHoldsWhatArrived(t *testing.T) {
	key := [4]byte{1, 2, 3, 4}
	r, _ := testReader(1 << 20)
	f := clientFrame(0x81, make([]byte, 1<<20), key)
	if err := r.feed(f[:100]); err != nil {
		t.Fatal(err)
	}
	need := r.need()
	if need <= len(r.part) || cap(r.part) > 4*readBufSize {
		t.Fatalf("after 100 bytes of a 1 MiB frame: need %d, part %d/%d", need, len(r.part), cap(r.part))
	}
	// Filling part as run does doubles it, up to the frame's size.
	for got := 100; got < len(f); {
		need = r.need()
		n := copy(r.part[len(r.part):need], f[got:])
		r.part = r.part[:len(r.part)+n]
		got += n
		if cap(r.part) > 2*got+readBufSize {
			t.Fatalf("part of cap %d after %d bytes", cap(r.part), got)
		}
	}
	if err := r.feed(nil); err != nil || r.part != nil {
		t.Fatalf("whole frame: %v, part %d", err, len(r.part))
	}

	r, _ = testReader(10)
	in := clientFrame(0x01, []byte("123456"), key)
	in = append(in, clientFrame(0x80, []byte("12345"), key)[:6]...) // header only
	if err := r.feed(in); err != errMessageTooBig {
		t.Fatalf("fragment over the limit, header only: %v, want errMessageTooBig", err)
	}
}
