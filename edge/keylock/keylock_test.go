package keylock

import (
	"sync"
	"sync/atomic"
	"testing"
)

// Holders of one key exclude each other, other keys do not wait, and the map
// empties once everybody is done.
func TestLockExcludesAndForgets(t *testing.T) {
	var k Map[int64]
	var inside [3]atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 300; i++ {
		wg.Add(1)
		go func(key int64) {
			defer wg.Done()
			unlock := k.Lock(key)
			if n := inside[key].Add(1); n != 1 {
				t.Errorf("key %d held %d times at once", key, n)
			}
			inside[key].Add(-1)
			unlock()
		}(int64(i % 3))
	}
	wg.Wait()
	if k.Len() != 0 {
		t.Fatalf("%d keys left", k.Len())
	}
}
