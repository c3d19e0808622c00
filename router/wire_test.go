package router

import (
	"bytes"
	"testing"
)

func TestRoomBatchRoundTrip(t *testing.T) {
	in := roomBatch{ep: "abc", first: 7, closing: true, msgs: []Msg{
		{Mid: "gw-1.x.1", Ack: false, Bytes: []byte(`{"t":"push"}`)},
		{Mid: "gw-1.x.2", Ack: true, Bytes: []byte(`{"t":"push","d":{}}`)},
	}}
	out, err := decodeRoomBatch(appendRoomBatch(nil, &in))
	if err != nil || out.ep != "abc" || out.first != 7 || !out.closing || len(out.msgs) != 2 ||
		out.msgs[1].Off != 8 || !out.msgs[1].Ack || !bytes.Equal(out.msgs[1].Bytes, in.msgs[1].Bytes) {
		t.Fatalf("round trip: %+v, %v", out, err)
	}
	m, err := decodeUserPush(appendUserPush(nil, in.msgs[1]))
	if err != nil || m.Mid != "gw-1.x.2" || !m.Ack || string(m.Bytes) != `{"t":"push","d":{}}` {
		t.Fatalf("user push: %+v, %v", m, err)
	}
}

// FuzzClusterWire: no input makes the decoders panic or accept a batch whose
// offsets are not positive and consecutive.
func FuzzClusterWire(f *testing.F) {
	f.Add(appendRoomBatch(nil, &roomBatch{ep: "e", first: 1, msgs: []Msg{{Mid: "m", Bytes: []byte("{}")}}}))
	f.Add(appendUserPush(nil, Msg{Mid: "m", Ack: true, Bytes: []byte("{}")}))
	f.Add([]byte{'R', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add([]byte("U"))
	f.Fuzz(func(t *testing.T, p []byte) {
		if b, err := decodeRoomBatch(p); err == nil {
			for i, m := range b.msgs {
				if m.Off != b.first+int64(i) || m.Off <= 0 || len(m.Bytes) == 0 {
					t.Fatalf("bad batch accepted: %+v", b)
				}
			}
		}
		_, _ = decodeUserPush(p)
	})
}
