package persist

import "encoding/binary"

// Key layout. Every key starts with a short ASCII table name and '/'; ids are
// 8-byte big-endian so keys sort numerically.
//
//	room/<id>               JSON room record (edge/room)
//	seq/<name>              int64 high-water mark of an id sequence (merge: max)
//	bal/<user>              int64 coin balance (merge: add)
//	tally/<name>/<user>     int64 non-coin tally, e.g. gift value received (merge: add)
//	trade/<user>/<id>       JSON Trade, append-only
//	idem/<hour>/<user>/<req_id> idempotency record (first result of a
//	                        request), by the unix hour it was written in
//	                        (shared wallet; the Ledger before idxg/)
//	idxg/<hour>/<group>     the idempotency records of one Ledger group
//	                        commit (one row per fsync, not per request)
//	idsp/<period>/<user>/<req_id> a Ledger idempotency record that did not
//	                        fit the memory index (12 h periods, see
//	                        spillPeriodHours)
//	rec/<kind>/<id>         JSON business record (e.g. rec/gift/<order>)
//	intent/<n>              shared wallet: an op between its intent and its
//	                        settlement (seq/intent: the highest n used)
//	wm/applied, wm/sum      shared wallet: ops this node applied and Σ of
//	                        their deltas (merge: add), audited against Redis
var (
	PrefixRoom      = []byte("room/")
	PrefixSeq       = []byte("seq/")
	PrefixBal       = []byte("bal/")
	PrefixTally     = []byte("tally/")
	PrefixTrade     = []byte("trade/")
	PrefixIdem      = []byte("idem/")
	PrefixIdemG     = []byte("idxg/")
	PrefixIdemSpill = []byte("idsp/")
	PrefixRec       = []byte("rec/")
)

// Key2 returns prefix + big-endian a + big-endian b.
func Key2(prefix []byte, a, b uint64) []byte {
	k := make([]byte, len(prefix)+16)
	copy(k, prefix)
	binary.BigEndian.PutUint64(k[len(prefix):], a)
	binary.BigEndian.PutUint64(k[len(prefix)+8:], b)
	return k
}

// Key returns prefix + big-endian id.
func Key(prefix []byte, id uint64) []byte {
	k := make([]byte, len(prefix)+8)
	copy(k, prefix)
	binary.BigEndian.PutUint64(k[len(prefix):], id)
	return k
}

// KeyID returns the id at the end of a Key.
func KeyID(k []byte) uint64 {
	if len(k) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(k[len(k)-8:])
}

// SeqKey is the key of sequence name.
func SeqKey(name string) []byte { return append(append([]byte{}, PrefixSeq...), name...) }

// EncodeUint64 / DecodeUint64 are the value encoding of sequences.
func EncodeUint64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

// DecodeUint64 decodes EncodeUint64; short input is 0.
func DecodeUint64(b []byte) uint64 {
	if len(b) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}
