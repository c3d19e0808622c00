package router

import (
	"crypto/rand"
	"encoding/binary"
	"strconv"
)

// histRing is a room's recent pushes on this node, oldest first, with
// consecutive offsets: the source of `join` with `since` when the client's
// position is recent. Bounded by count (its capacity) and, on lookup, by age.
// Not safe for concurrent use: the room's mu guards it.
type histRing struct {
	buf   []histEntry
	start int // index of the oldest entry
	n     int
}

type histEntry struct {
	msg Msg
	at  int64 // unix ns when it was added
}

// add appends m (whose Off must be one more than the newest entry's, else the
// ring restarts at m), dropping the oldest entry when full.
func (h *histRing) add(m Msg, at int64, capacity int) {
	if capacity <= 0 {
		return
	}
	if h.n > 0 && h.newest() != m.Off-1 {
		h.reset()
	}
	if h.buf == nil {
		h.buf = make([]histEntry, min(capacity, 16))
	}
	if h.n == len(h.buf) && len(h.buf) < capacity { // grow lazily: idle rooms stay small
		nb := make([]histEntry, min(capacity, 2*len(h.buf)))
		for i := 0; i < h.n; i++ {
			nb[i] = h.buf[(h.start+i)%len(h.buf)]
		}
		h.buf, h.start = nb, 0
	}
	if h.n == len(h.buf) {
		h.buf[h.start] = histEntry{}
		h.start = (h.start + 1) % len(h.buf)
		h.n--
	}
	h.buf[(h.start+h.n)%len(h.buf)] = histEntry{msg: m, at: at}
	h.n++
}

func (h *histRing) reset() {
	h.buf, h.start, h.n = nil, 0, 0
}

func (h *histRing) at(i int) *histEntry { return &h.buf[(h.start+i)%len(h.buf)] }

func (h *histRing) oldest() int64 { return h.at(0).msg.Off }
func (h *histRing) newest() int64 { return h.at(h.n - 1).msg.Off }

// rangeOf returns the messages with offsets from..to (inclusive) if the ring
// holds all of them and the first is not older than notBefore (unix ns).
func (h *histRing) rangeOf(from, to int64, notBefore int64) ([]Msg, bool) {
	if from > to {
		return nil, true
	}
	if h.n == 0 || from < h.oldest() || to > h.newest() {
		return nil, false
	}
	i := int(from - h.oldest())
	if h.at(i).at < notBefore {
		return nil, false
	}
	out := make([]Msg, 0, to-from+1)
	for ; i < h.n && h.at(i).msg.Off <= to; i++ {
		out = append(out, h.at(i).msg)
	}
	return out, true
}

// NewEpoch returns a fresh random epoch: 13 base-36 digits, JSON-safe.
func NewEpoch() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return strconv.FormatUint(binary.LittleEndian.Uint64(b[:])>>1, 36)
}
