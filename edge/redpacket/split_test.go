package redpacket

import (
	"math/rand/v2"
	"testing"
	"testing/quick"
)

// checkSplit is the split's contract: count amounts, each ≥ 1, Σ = total.
func checkSplit(t *testing.T, total int64, count int, got []int64) {
	t.Helper()
	if len(got) != count {
		t.Fatalf("Split(%d, %d): %d amounts", total, count, len(got))
	}
	var sum int64
	for i, a := range got {
		if a < 1 {
			t.Fatalf("Split(%d, %d): amount %d is %d", total, count, i, a)
		}
		sum += a
	}
	if sum != total {
		t.Fatalf("Split(%d, %d): Σ = %d", total, count, sum)
	}
}

func TestSplitProperties(t *testing.T) {
	prop := func(seed uint64, t16 uint32, c16 uint16) bool {
		rnd := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		count := int(c16%2000) + 1
		total := int64(count) + int64(t16%1_000_000)
		switch seed % 4 { // the edges: N = T and N = 1
		case 0:
			total = int64(count)
		case 1:
			count = 1
		}
		got, err := Split(total, count, rnd)
		if err != nil {
			t.Errorf("Split(%d, %d): %v", total, count, err)
			return false
		}
		checkSplit(t, total, count, got)
		return true
	}
	if err := quick.Check(prop, &quick.Config{MaxCount: 500}); err != nil {
		t.Fatal(err)
	}
}

func TestSplitBadInput(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		total int64
		count int
	}{{4, 5}, {0, 0}, {10, 0}, {-1, 1}, {MaxTotal + 1, 1}, {MaxTotal, MaxCount + 1}} {
		if _, err := Split(c.total, c.count, rnd); err == nil || err.Error()[:5] != "10001" {
			t.Fatalf("Split(%d, %d) = %v, want 10001", c.total, c.count, err)
		}
	}
}

func TestSplitLargeCount(t *testing.T) {
	rnd := rand.New(rand.NewPCG(3, 4))
	got, err := Split(MaxTotal, 100_000, rnd)
	if err != nil {
		t.Fatal(err)
	}
	checkSplit(t, MaxTotal, 100_000, got)
}

func FuzzSplit(f *testing.F) {
	f.Add(int64(1), 1, uint64(0))
	f.Add(int64(5), 5, uint64(1))
	f.Add(int64(100), 1, uint64(2))
	f.Add(int64(1000), 200, uint64(3))
	f.Add(int64(3), 2, uint64(4))
	f.Fuzz(func(t *testing.T, total int64, count int, seed uint64) {
		if count > 20_000 { // keep each input fast; the bound itself is tested above
			count %= 20_000
		}
		got, err := Split(total, count, rand.New(rand.NewPCG(seed, 7)))
		if total < int64(count) || count < 1 || total > MaxTotal {
			if err == nil {
				t.Fatalf("Split(%d, %d) accepted", total, count)
			}
			return
		}
		if err != nil {
			t.Fatalf("Split(%d, %d): %v", total, count, err)
		}
		checkSplit(t, total, count, got)
	})
}
