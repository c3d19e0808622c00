package persist

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"

	"github.com/cockroachdb/pebble"
)

// counterMergerName names the merge operator in the database. Never change
// it: Pebble refuses to open a database written with another merger name.
const counterMergerName = "liveedge.int64add.v1"

// counterMerger merges 8-byte big-endian int64 operands: keys under seq/
// keep the maximum (id high-water marks), every other merged key keeps the
// sum (balances, tallies). Both commute, so concurrent batches can commit in
// any order and the key ends at the same value. Keys that are not counters
// are never merged (Set/Get only).
var counterMerger = &pebble.Merger{
	Name: counterMergerName,
	Merge: func(key, value []byte) (pebble.ValueMerger, error) {
		if bytes.HasPrefix(key, PrefixSeq) {
			m := &int64Max{}
			return m, m.add(value)
		}
		m := &int64Add{}
		return m, m.add(value)
	},
}

type int64Max struct {
	max int64
	set bool
}

func (m *int64Max) add(v []byte) error {
	if len(v) != 8 {
		return errCounterValue
	}
	x := int64(binary.BigEndian.Uint64(v))
	if !m.set || x > m.max {
		m.max, m.set = x, true
	}
	return nil
}

func (m *int64Max) MergeNewer(v []byte) error { return m.add(v) }
func (m *int64Max) MergeOlder(v []byte) error { return m.add(v) }
func (m *int64Max) Finish(bool) ([]byte, io.Closer, error) {
	return EncodeInt64(m.max), nil, nil
}

type int64Add struct{ sum int64 }

var errCounterValue = errors.New("persist: counter value is not 8 bytes")

func (m *int64Add) add(v []byte) error {
	if len(v) != 8 {
		return errCounterValue
	}
	m.sum += int64(binary.BigEndian.Uint64(v))
	return nil
}

func (m *int64Add) MergeNewer(v []byte) error { return m.add(v) }
func (m *int64Add) MergeOlder(v []byte) error { return m.add(v) }
func (m *int64Add) Finish(bool) ([]byte, io.Closer, error) {
	return EncodeInt64(m.sum), nil, nil
}

// EncodeInt64 encodes a counter operand or value.
func EncodeInt64(v int64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, uint64(v))
	return b
}

// DecodeInt64 decodes EncodeInt64 (short input is 0).
func DecodeInt64(b []byte) int64 {
	if len(b) != 8 {
		return 0
	}
	return int64(binary.BigEndian.Uint64(b))
}
