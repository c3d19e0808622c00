package persist

import (
	"encoding/binary"
	"errors"

	"github.com/bytedance/sonic"
)

// Trade rows and idempotency results are stored in a compact binary form: a
// version byte (1), varints and length-prefixed strings — about a third of
// their JSON size, which the LSM rewrites several times over. A value that
// starts with '{' is the JSON form and still decodes.
const codecV1 = 1

var errCorrupt = errors.New("persist: corrupt row")

func encodeTrade(t Trade) []byte {
	b := make([]byte, 0, 24+len(t.Reason)+len(t.Ref)+len(t.ReqID))
	b = append(b, codecV1)
	b = binary.AppendVarint(b, t.ID)
	b = binary.AppendVarint(b, t.User)
	b = binary.AppendVarint(b, t.Delta)
	b = binary.AppendVarint(b, t.Balance)
	b = binary.AppendVarint(b, t.At)
	b = appendString(b, t.Reason)
	b = appendString(b, t.Ref)
	return appendString(b, t.ReqID)
}

func decodeTrade(v []byte) (Trade, error) {
	var t Trade
	if len(v) > 0 && v[0] == '{' {
		err := sonic.Unmarshal(v, &t)
		return t, err
	}
	d := decoder{b: v}
	if d.byte() != codecV1 {
		return t, errCorrupt
	}
	t.ID, t.User, t.Delta, t.Balance, t.At = d.varint(), d.varint(), d.varint(), d.varint(), d.varint()
	t.Reason, t.Ref, t.ReqID = d.string(), d.string(), d.string()
	return t, d.err
}

func encodeResult(r Result) []byte {
	b := make([]byte, 0, 4+10*(len(r.TradeIDs)+len(r.Balances)+1))
	b = append(b, codecV1)
	b = binary.AppendUvarint(b, uint64(len(r.TradeIDs)))
	for _, id := range r.TradeIDs {
		b = binary.AppendVarint(b, id)
	}
	b = binary.AppendUvarint(b, uint64(len(r.Balances)))
	for _, bal := range r.Balances {
		b = binary.AppendVarint(b, bal)
	}
	return binary.AppendVarint(b, r.At)
}

func decodeResult(v []byte) (Result, error) {
	var r Result
	if len(v) > 0 && v[0] == '{' {
		err := sonic.Unmarshal(v, &r)
		return r, err
	}
	d := decoder{b: v}
	if d.byte() != codecV1 {
		return r, errCorrupt
	}
	r.TradeIDs = d.varints()
	r.Balances = d.varints()
	r.At = d.varint()
	return r, d.err
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// decoder reads what the encoders wrote; the first short or bad read sets err
// and every later read returns zero.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() { d.err, d.b = errCorrupt, nil }

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string { return string(d.bytes()) }

// bytes is string without the copy: valid as long as the decoded value.
func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	b := d.b[:n:n]
	d.b = d.b[n:]
	return b
}

func (d *decoder) varints() []int64 {
	n := d.uvarint()
	if n > uint64(len(d.b)) { // every varint takes ≥ 1 byte
		d.fail()
		return nil
	}
	out := make([]int64, n)
	for i := range out {
		out[i] = d.varint()
	}
	return out
}

// An idempotency group row (idxg/<hour>/<group id>) holds the idempotency
// records of one group commit: a version byte, then per op its user
// (varint), req_id (string) and encoded Result (string).

// appendIdemEntry adds one op's record to a group row under construction
// (start it with newIdemGroup).
func appendIdemEntry(b []byte, user int64, req string, res []byte) []byte {
	b = binary.AppendVarint(b, user)
	b = appendString(b, req)
	b = binary.AppendUvarint(b, uint64(len(res)))
	return append(b, res...)
}

func newIdemGroup(capacity int) []byte { return append(make([]byte, 0, capacity), codecV1) }

// scanIdemGroup calls fn for every record of a group row until fn returns
// false. res aliases v.
func scanIdemGroup(v []byte, fn func(user int64, req, res []byte) bool) error {
	d := decoder{b: v}
	if d.byte() != codecV1 {
		return errCorrupt
	}
	for len(d.b) > 0 && d.err == nil {
		user, req := d.varint(), d.bytes()
		n := d.uvarint()
		if d.err != nil || n > uint64(len(d.b)) {
			return errCorrupt
		}
		res := d.b[:n:n]
		d.b = d.b[n:]
		if !fn(user, req, res) {
			return nil
		}
	}
	return d.err
}
