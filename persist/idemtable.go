package persist

import "math/bits"

// DefaultIdemMemoryBytes is the default memory budget of the Ledger's
// idempotency index (LedgerConfig.IdemMemoryBytes).
const DefaultIdemMemoryBytes = 64 << 20

// idemSlotBytes is the size of one slot of an idemTable.
const idemSlotBytes = 16

// idemTable is the in-memory index of one ledger shard's durable
// idempotency records in group rows: hash(user, req_id) → location, in a
// flat open-addressing array (linear probing) of 16-byte slots filled to at
// most 3/4, so ≤ 21.4 bytes per request. It never grows past maxSlots: a
// request that finds no room (reserve fails) is written to a per-request
// spill row instead, which a miss in memory reads from disk. One hash may
// have several slots (two requests whose 64-bit hashes collide): lookup
// reports every one. Not safe for concurrent use (the shard mutex guards it).
type idemTable struct {
	slots    []idemSlot
	maxSlots int
	used     int // slots filled
	reserved int // promised to requests being committed (see reserve)
}

type idemSlot struct {
	hash uint64 // 0 = empty
	loc  idemLoc
}

func newIdemTable(budgetBytes int64) idemTable {
	return idemTable{maxSlots: int(budgetBytes / idemSlotBytes)}
}

// capacity is how many entries the table holds at most.
func (t *idemTable) capacity() int { return t.maxSlots / 4 * 3 }

// bytes is the memory of the slot array.
func (t *idemTable) bytes() int64 { return int64(cap(t.slots)) * idemSlotBytes }

func slotHash(h uint64) uint64 {
	if h == 0 {
		return 1
	}
	return h
}

func (t *idemTable) home(h uint64) int {
	hi, _ := bits.Mul64(h, uint64(len(t.slots)))
	return int(hi)
}

// lookup calls fn with the location of every entry of hash h until fn
// returns false.
func (t *idemTable) lookup(h uint64, fn func(idemLoc) bool) {
	if len(t.slots) == 0 {
		return
	}
	h = slotHash(h)
	for i := t.home(h); ; i++ {
		if i == len(t.slots) {
			i = 0
		}
		s := t.slots[i]
		if s.hash == 0 {
			return
		}
		if s.hash == h && !fn(s.loc) {
			return
		}
	}
}

// reserve promises room for one insert; false if the table is full.
func (t *idemTable) reserve() bool {
	if t.used+t.reserved >= t.capacity() {
		return false
	}
	t.reserved++
	return true
}

// release returns a reservation that will not be inserted.
func (t *idemTable) release() { t.reserved-- }

// insertReserved adds an entry for a reservation.
func (t *idemTable) insertReserved(h uint64, loc idemLoc) {
	t.reserved--
	t.add(h, loc)
}

// insert adds an entry if there is room (at open); false if the table is full.
func (t *idemTable) insert(h uint64, loc idemLoc) bool {
	if t.used+t.reserved >= t.capacity() {
		return false
	}
	t.add(h, loc)
	return true
}

func (t *idemTable) add(h uint64, loc idemLoc) {
	if (t.used+1)*4 > len(t.slots)*3 {
		t.resize(min(max(2*len(t.slots), 1024), t.maxSlots))
	}
	h = slotHash(h)
	for i := t.home(h); ; i++ {
		if i == len(t.slots) {
			i = 0
		}
		if t.slots[i].hash == 0 {
			t.slots[i] = idemSlot{h, loc}
			t.used++
			return
		}
	}
}

// resize rehashes into n slots (n ≥ used·4/3).
func (t *idemTable) resize(n int) {
	old := t.slots
	t.slots, t.used = make([]idemSlot, n), 0
	for _, s := range old {
		if s.hash != 0 {
			t.add(s.hash, s.loc)
		}
	}
}

// removeBefore drops the entries of hours before hour.
func (t *idemTable) removeBefore(hour int32) {
	live := 0
	for _, s := range t.slots {
		if s.hash != 0 && s.loc.hour() >= hour {
			live++
		}
	}
	if live == t.used {
		return
	}
	old := t.slots
	n := len(old)
	if live == 0 {
		n = 0
	}
	t.slots, t.used = make([]idemSlot, n), 0
	for _, s := range old {
		if s.hash != 0 && s.loc.hour() >= hour {
			t.add(s.hash, s.loc)
		}
	}
}
