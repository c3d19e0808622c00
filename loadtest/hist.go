package loadtest

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// histSub is the number of linear sub-buckets per power of two: values are
// kept with a relative error below 1/histSub (~1.6 %).
const (
	histSubBits = 6
	histSub     = 1 << histSubBits
	histBuckets = (64 - histSubBits + 1) * histSub
)

// Hist is a lock-free log-linear histogram of durations in microseconds.
// Its zero value is ready; it is safe for concurrent use.
type Hist struct {
	counts [histBuckets]atomic.Int64
	n      atomic.Int64
	max    atomic.Int64
}

func bucketOf(v int64) int {
	if v < histSub {
		return int(v)
	}
	e := bits.Len64(uint64(v)) - histSubBits // >= 1
	return e*histSub + int(v>>(e-1)) - histSub
}

// bucketHigh is the largest value that falls in bucket b.
func bucketHigh(b int) int64 {
	if b < histSub {
		return int64(b)
	}
	e := b / histSub
	m := int64(b%histSub + histSub)
	return (m+1)<<(e-1) - 1
}

// Record adds d (negative counts as 0).
func (h *Hist) Record(d time.Duration) {
	v := max(d.Microseconds(), 0)
	h.counts[bucketOf(v)].Add(1)
	h.n.Add(1)
	for {
		m := h.max.Load()
		if v <= m || h.max.CompareAndSwap(m, v) {
			return
		}
	}
}

// Count is the number of values recorded.
func (h *Hist) Count() int64 { return h.n.Load() }

// Quantile is the q-quantile (0..1) in milliseconds, from the bucket bounds
// (the exact maximum for q = 1).
func (h *Hist) Quantile(q float64) float64 {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	if q >= 1 {
		return float64(h.max.Load()) / 1000
	}
	rank := int64(math.Ceil(q * float64(n)))
	rank = max(rank, 1)
	var seen int64
	for b := range h.counts {
		seen += h.counts[b].Load()
		if seen >= rank {
			return float64(min(bucketHigh(b), h.max.Load())) / 1000
		}
	}
	return float64(h.max.Load()) / 1000
}

// Buckets are the non-empty buckets (index → count), for merging the
// histograms of several processes.
func (h *Hist) Buckets() map[int]int64 {
	out := map[int]int64{}
	for b := range h.counts {
		if c := h.counts[b].Load(); c > 0 {
			out[b] = c
		}
	}
	return out
}

// Merge adds the buckets of another process's histogram and its maximum (µs).
func (h *Hist) Merge(buckets map[int]int64, maxUS int64) {
	for b, c := range buckets {
		if b >= 0 && b < histBuckets {
			h.counts[b].Add(c)
			h.n.Add(c)
		}
	}
	for {
		m := h.max.Load()
		if maxUS <= m || h.max.CompareAndSwap(m, maxUS) {
			return
		}
	}
}

// MaxUS is the largest value recorded, in microseconds.
func (h *Hist) MaxUS() int64 { return h.max.Load() }
