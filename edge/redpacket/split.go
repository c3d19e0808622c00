package redpacket

import (
	"math/rand/v2"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Hard bounds of a rain, whatever the configuration says (configs may only
// lower them): a split of MaxCount amounts is stored in one Pebble value of a
// few hundred KiB, and 2 × MaxTotal cannot overflow an int64.
const (
	MaxCount = 1_000_000
	MaxTotal = 1_000_000_000_000
)

// Split divides total into count amounts with the double-mean method: each
// draw is uniform in [1, 2 × remaining / remaining_count) (just 1 when that
// range is empty), the last amount takes the rest. Every amount is ≥ 1 and the
// amounts sum to total exactly.
//
// Why every amount is ≥ 1: before each draw remaining ≥ remaining_count
// (true at the start since total ≥ count). A draw d ≤ ⌊2r/c⌋ − 1 leaves
// r − d ≥ r − 2r/c + 1 = r(c−2)/c + 1 ≥ (c−2) + 1 = c − 1, which is the next
// remaining_count. So the rest the last one takes is ≥ 1.
//
// total < count, count < 1, or either above its bound is 10001.
func Split(total int64, count int, rnd *rand.Rand) ([]int64, error) {
	if err := checkSize(total, count, MaxTotal, MaxCount); err != nil {
		return nil, err
	}
	out := make([]int64, count)
	rem := total
	for i := 0; i < count-1; i++ {
		left := int64(count - i)
		hi := 2 * rem / left // exclusive upper bound of the draw
		d := int64(1)
		if hi > 2 {
			d = 1 + rnd.Int64N(hi-1) // uniform in [1, hi)
		}
		out[i] = d
		rem -= d
	}
	out[count-1] = rem
	return out, nil
}

// checkSize validates a rain's size against bounds.
func checkSize(total int64, count int, maxTotal int64, maxCount int) error {
	switch {
	case count < 1 || count > maxCount:
		return proto.BadRequest("total_count must be 1..%d", maxCount)
	case total < 1 || total > maxTotal:
		return proto.BadRequest("total_amount must be 1..%d", maxTotal)
	case total < int64(count):
		return proto.BadRequest("total_amount %d is less than total_count %d: every packet holds at least 1", total, count)
	}
	return nil
}
