package router

import (
	"encoding/binary"
	"errors"
)

// The messages the cluster router puts on NATS. Binary, versioned, and
// decoded defensively: a node never trusts a peer's bytes to be well formed.
//
//	room batch (subject le.r.<room>):
//	  'R' | uvarint len(ep) ep | uvarint first | uvarint n | flags byte |
//	  n × (uvarint len(mid) mid | ack byte | uvarint len(frame) frame)
//	user push (subject le.u.<user>):
//	  'U' | uvarint len(mid) mid | ack byte | frame
//
// A frame is the push exactly as written to the WebSocket (offsets included),
// so a receiving node fans out the bytes it got without re-encoding.

const (
	wireRoomBatch = 'R'
	wireUserPush  = 'U'

	batchClosing = 1 // flags: the room closes after this batch

	maxWireBatch = 4096 // pushes in one room batch
)

var errWire = errors.New("router: malformed cluster message")

// roomBatch is a run of consecutive room pushes: offsets first, first+1, ….
type roomBatch struct {
	ep      string
	first   int64
	msgs    []Msg
	closing bool
}

func (b *roomBatch) last() int64 { return b.first + int64(len(b.msgs)) - 1 }

func appendRoomBatch(dst []byte, b *roomBatch) []byte {
	dst = append(dst, wireRoomBatch)
	dst = binary.AppendUvarint(dst, uint64(len(b.ep)))
	dst = append(dst, b.ep...)
	dst = binary.AppendUvarint(dst, uint64(b.first))
	dst = binary.AppendUvarint(dst, uint64(len(b.msgs)))
	var flags byte
	if b.closing {
		flags |= batchClosing
	}
	dst = append(dst, flags)
	for _, m := range b.msgs {
		dst = binary.AppendUvarint(dst, uint64(len(m.Mid)))
		dst = append(dst, m.Mid...)
		dst = append(dst, boolByte(m.Ack))
		dst = binary.AppendUvarint(dst, uint64(len(m.Bytes)))
		dst = append(dst, m.Bytes...)
	}
	return dst
}

// decodeRoomBatch parses a room batch; Msg.Bytes are copies (the NATS buffer
// is not kept).
func decodeRoomBatch(p []byte) (roomBatch, error) {
	var b roomBatch
	r := wireReader{p: p}
	if r.byte() != wireRoomBatch {
		return b, errWire
	}
	b.ep = string(r.bytes())
	first, n := r.uvarint(), r.uvarint()
	flags := r.byte()
	if r.err || first == 0 || first > 1<<62 || n == 0 || n > maxWireBatch || len(b.ep) > 64 {
		return b, errWire
	}
	b.first, b.closing = int64(first), flags&batchClosing != 0
	b.msgs = make([]Msg, 0, n)
	for i := uint64(0); i < n; i++ {
		mid := string(r.bytes())
		ack := r.byte() == 1
		frame := r.bytes()
		if r.err || len(frame) == 0 {
			return b, errWire
		}
		b.msgs = append(b.msgs, Msg{Mid: mid, Ack: ack, Off: b.first + int64(i), Bytes: append([]byte(nil), frame...)})
	}
	if len(r.p) != 0 {
		return b, errWire
	}
	return b, nil
}

func appendUserPush(dst []byte, m Msg) []byte {
	dst = append(dst, wireUserPush)
	dst = binary.AppendUvarint(dst, uint64(len(m.Mid)))
	dst = append(dst, m.Mid...)
	dst = append(dst, boolByte(m.Ack))
	return append(dst, m.Bytes...)
}

func decodeUserPush(p []byte) (Msg, error) {
	r := wireReader{p: p}
	if r.byte() != wireUserPush {
		return Msg{}, errWire
	}
	mid := string(r.bytes())
	ack := r.byte() == 1
	if r.err || len(r.p) == 0 {
		return Msg{}, errWire
	}
	return Msg{Mid: mid, Ack: ack, Bytes: append([]byte(nil), r.p...)}, nil
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}

// wireReader consumes p; any short or oversized read sets err and yields zero
// values from then on.
type wireReader struct {
	p   []byte
	err bool
}

func (r *wireReader) byte() byte {
	if r.err || len(r.p) < 1 {
		r.err = true
		return 0
	}
	c := r.p[0]
	r.p = r.p[1:]
	return c
}

func (r *wireReader) uvarint() uint64 {
	if r.err {
		return 0
	}
	v, n := binary.Uvarint(r.p)
	if n <= 0 {
		r.err = true
		return 0
	}
	r.p = r.p[n:]
	return v
}

func (r *wireReader) bytes() []byte {
	n := r.uvarint()
	if r.err || n > uint64(len(r.p)) {
		r.err = true
		return nil
	}
	b := r.p[:n]
	r.p = r.p[n:]
	return b
}
