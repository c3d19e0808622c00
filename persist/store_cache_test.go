package persist

import (
	"bytes"
	"fmt"
	"testing"
	"time"
)

// TestBlockCacheHoldsBlocksBesideMemtables: after the memtable filled and
// was flushed (a flushed memtable and the new one are both charged to the
// block cache), point reads of the flushed keys must leave their blocks in
// the cache — with 32 MiB memtables in a 64 MiB cache no block fitted and
// every read went to the file.
func TestBlockCacheHoldsBlocksBesideMemtables(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	val := bytes.Repeat([]byte("v"), 1000)
	const n = 80_000 // ~80 MB: at least two memtables flushed
	for i := 0; i < n; i += 1000 {
		err := s.Apply(func(b *Batch) error {
			for j := i; j < i+1000; j++ {
				if err := b.Set([]byte(fmt.Sprintf("k%08d", j)), val, nil); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// Flushes run in the background: wait for the first to complete (a
	// loaded machine had none done yet when the reads began — CI at
	// 8d42f78), within 30 s.
	for deadline := time.Now().Add(30 * time.Second); s.db.Metrics().Flush.Count == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no flush: the test did not fill a memtable")
		}
	}
	for i := 0; i < n; i += 97 {
		if _, err := s.Get([]byte(fmt.Sprintf("k%08d", i))); err != nil {
			t.Fatal(i, err)
		}
		if _, err := s.Get([]byte(fmt.Sprintf("absent%08d", i))); err != ErrNotFound {
			t.Fatal(i, err)
		}
	}
	m := s.db.Metrics()
	if m.BlockCache.Count == 0 {
		t.Fatalf("block cache holds no block after %d reads (hits %d, misses %d): the memtables' reservation leaves it no room",
			n/97*2, m.BlockCache.Hits, m.BlockCache.Misses)
	}
	t.Logf("block cache: %d blocks, %d bytes, hits %d misses %d", m.BlockCache.Count, m.BlockCache.Size, m.BlockCache.Hits, m.BlockCache.Misses)
}

// OpenWith sizes the block cache (the memtables' reservation on top): a
// store opened with 8 MiB works and holds no more blocks than that (give or
// take the slack of the cache's shards) of the ~40 MB it read, where the
// default cache would hold them all.
func TestOpenWithBlockCache(t *testing.T) {
	s, err := OpenWith(t.TempDir(), Options{BlockCacheBytes: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	val := bytes.Repeat([]byte("v"), 1000)
	const n = 40_000
	for i := 0; i < n; i += 1000 {
		if err := s.Apply(func(b *Batch) error {
			for j := i; j < i+1000; j++ {
				if err := b.Set([]byte(fmt.Sprintf("k%08d", j)), val, nil); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.db.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i += 7 {
		if _, err := s.Get([]byte(fmt.Sprintf("k%08d", i))); err != nil {
			t.Fatal(i, err)
		}
	}
	if m := s.db.Metrics(); m.BlockCache.Size > 9<<20 || m.BlockCache.Count == 0 {
		t.Fatalf("block cache holds %d bytes in %d blocks, want some and at most ~8 MiB", m.BlockCache.Size, m.BlockCache.Count)
	}
}
