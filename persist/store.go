package persist

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble"
	"github.com/cockroachdb/pebble/bloom"
	"github.com/cockroachdb/pebble/vfs"
)

// Sizes of the Pebble block cache and memtable. Pebble charges every live
// memtable to the block cache (the mutable one, one being flushed, and a
// flushed one while an iterator or read still holds it — "zombie"): the
// cache is sized as the blocks it must hold plus two memtables. With a 64 MiB cache and 32 MiB memtables it held no block at
// all (Metrics: "Block cache: 0 entries") and every point read — the
// is-this-event-new check of each webhook, an order read — read its filter
// and index blocks from the file again (the webhook over HTTP ran at half
// its rate).
const (
	// DefaultBlockCacheBytes is the block cache beside the memtables when
	// the node's configuration does not set one (node.block_cache_mb).
	DefaultBlockCacheBytes = 128 << 20
	memTableBytes          = 32 << 20
)

// Store is a node's Pebble database.
//
// A write that fails inside Pebble (a WAL write or fsync error) leaves the
// batch maybe visible and maybe durable, and Pebble's commit pipeline
// unusable: no caller can tell what was written, and the only safe way on is
// to stop and replay the WAL at the next start ("fsyncgate": a failed fsync
// is not retried). Such a failure is fatal: the store refuses every write
// from then on (ErrStoreFailed) and calls the OnFatal function once, which
// in a node ends the process.
type Store struct {
	db *pebble.DB

	failed  atomic.Pointer[error] // the fatal failure (wraps ErrStoreFailed)
	onFatal atomic.Pointer[func(error)]
	// panicked: the failure was a panic inside Pebble, which may hold its
	// own locks (Close would wait for them forever).
	panicked atomic.Bool
}

// ErrStoreFailed wraps the fatal failure every write after it returns.
var ErrStoreFailed = errors.New("persist: the store failed, the node must restart")

// OnFatal sets fn, called once (on the failing writer's goroutine) with the
// first fatal write failure: a node's fn ends the process, so that its
// restart replays the WAL. Set it before the first write.
func (s *Store) OnFatal(fn func(error)) { s.onFatal.Store(&fn) }

// Failed returns the store's fatal failure (wrapping ErrStoreFailed), or nil.
// One atomic load: the ledger checks it for every op.
func (s *Store) Failed() error {
	if p := s.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// fail records err as the store's fatal failure and, the first time, calls
// the OnFatal function.
func (s *Store) fail(err error) {
	wrapped := fmt.Errorf("%w: %w", ErrStoreFailed, err)
	if !s.failed.CompareAndSwap(nil, &wrapped) {
		return
	}
	if fn := s.onFatal.Load(); fn != nil {
		(*fn)(err)
	}
}

// Open opens (creating if needed) the store under dir/pebble, with the
// default block cache.
func Open(dir string) (*Store, error) { return OpenWith(dir, Options{}) }

// Options of OpenWith.
type Options struct {
	// BlockCacheBytes is the cache for table blocks (≤ 0: the default,
	// DefaultBlockCacheBytes); the two memtables' reservation comes on top.
	BlockCacheBytes int64
	// WALMinSync is the least time between two fsyncs of the WAL (0: each
	// fsync as soon as a write asks for one). A sync asked for sooner waits
	// for it, and the writes that arrive meanwhile share it: fewer fsyncs,
	// group commits and hand-offs per op for up to that much more latency
	// (Pebble's WALMinSyncInterval). Durability is unchanged: an op is
	// answered once its fsync is done.
	WALMinSync time.Duration
}

// OpenWith opens (or creates) the store in dir with o.
func OpenWith(dir string, o Options) (*Store, error) { return openFS(dir, o, vfs.Default) }

// openFS is OpenWith on fs (tests inject disk errors).
func openFS(dir string, o Options, fs vfs.FS) (*Store, error) {
	blockCache := o.BlockCacheBytes
	if blockCache <= 0 {
		blockCache = DefaultBlockCacheBytes
	}
	cache := pebble.NewCache(blockCache + 2*memTableBytes)
	defer cache.Unref()
	s := &Store{}
	opts := &pebble.Options{
		FS:                 fs,
		Logger:             storeLogger{s},
		Merger:             counterMerger,
		Cache:              cache,
		MemTableSize:       memTableBytes,
		WALMinSyncInterval: func() time.Duration { return o.WALMinSync },
		// The ledger mostly appends: let L0 collect more flushed tables
		// before compacting them into a bigger Lbase, which rewrites each
		// byte fewer times (≈ +18 % gifts/s over a 30 s run here).
		L0CompactionThreshold: 8,
		L0StopWritesThreshold: 32,
		LBaseMaxBytes:         256 << 20,
		// Most point reads on the hot paths are misses (is this req_id or
		// event new?): bloom filters answer them without reading blocks.
		Levels: make([]pebble.LevelOptions, 7),
	}
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
		opts.Levels[i].FilterType = pebble.TableFilter
		opts.Levels[i].TargetFileSize = 8 << 20
	}
	db, err := openPebble(filepath.Join(dir, "pebble"), opts)
	if err != nil {
		return nil, fmt.Errorf("persist: open %s: %w", dir, err)
	}
	s.db = db
	return s, nil
}

// ErrNotFound is returned by Get for an absent key.
var ErrNotFound = errors.New("persist: not found")

// View calls fn with the value at key, valid during the call only (no
// copy), or returns ErrNotFound; fn's error is View's.
func (s *Store) View(key []byte, fn func(v []byte) error) error {
	v, closer, err := s.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return ErrNotFound
	}
	if err != nil {
		return err
	}
	defer closer.Close()
	return fn(v)
}

// Has reports whether key is in the store (without copying its value).
func (s *Store) Has(key []byte) (bool, error) {
	err := s.View(key, func([]byte) error { return nil })
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// Get returns a copy of the value at key, or ErrNotFound.
func (s *Store) Get(key []byte) ([]byte, error) {
	v, closer, err := s.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	out := bytes.Clone(v)
	_ = closer.Close()
	return out, nil
}

// Apply builds a batch with fn and commits it durably (fsync, group-committed
// with concurrent writers). fn returning an error discards the batch. After a
// fatal failure (see Store) it returns that, writing nothing; the commit that
// fails does not return (Pebble's Fatalf, or its own panic: the store's
// fatal failure, then a panic — it must never look written, nor failed with
// nothing written).
func (s *Store) Apply(fn func(b *Batch) error) error {
	if err := s.Failed(); err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	if err := fn(b); err != nil {
		return err
	}
	defer s.failOnPanic()
	return b.Commit(pebble.Sync)
}

// failOnPanic, deferred around a call into Pebble's write path, makes a panic
// there (a failed WAL rotation panics without Fatalf, holding Pebble's
// locks) the store's fatal failure before it goes on: a recovering caller
// (the HTTP server's middleware) must not leave a stuck node that looks
// ready.
func (s *Store) failOnPanic() {
	if r := recover(); r != nil {
		if err, ok := r.(error); !ok || !errors.Is(err, pebble.ErrClosed) { // a write after Close: a bug, not the disk
			s.panicked.Store(true)
			s.fail(fmt.Errorf("pebble panicked: %v", r))
		}
		panic(r)
	}
}

// Put durably sets key to val.
func (s *Store) Put(key, val []byte) error {
	return s.Apply(func(b *Batch) error { return b.Set(key, val, nil) })
}

// Scan calls fn for every key with prefix, in key order. k and v are only valid
// during the call.
func (s *Store) Scan(prefix []byte, fn func(k, v []byte) error) error {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
	if err != nil {
		return err
	}
	for ok := it.First(); ok; ok = it.Next() {
		if err := fn(it.Key(), it.Value()); err != nil {
			_ = it.Close()
			return err
		}
	}
	return it.Close()
}

// Close flushes memtables and closes the database. After a fatal failure it
// flushes nothing (the WAL is what the next start replays: Pebble only ends
// it) and returns the failure — without closing at all when the failure was
// a panic inside Pebble, which may hold its locks (the process is ending);
// a panic of Pebble's while closing is an error too.
func (s *Store) Close() (err error) {
	failed := s.Failed()
	defer func() {
		if r := recover(); r != nil {
			err = errors.Join(failed, fmt.Errorf("persist: closing the store: %v", r))
		}
	}()
	if s.panicked.Load() {
		return failed
	}
	if failed != nil {
		return errors.Join(failed, s.db.Close())
	}
	ferr := s.db.Flush()
	cerr := s.db.Close()
	return errors.Join(ferr, cerr)
}

func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil
}

// openPebble is pebble.Open with a panic (a corrupt store found while
// replaying it: Fatalf) returned as an error.
func openPebble(dir string, opts *pebble.Options) (db *pebble.DB, err error) {
	defer func() {
		if r := recover(); r != nil {
			if e, ok := r.(error); ok {
				err = e
			} else {
				err = fmt.Errorf("%v", r)
			}
		}
	}()
	return pebble.Open(dir, opts)
}

// storeLogger drops Pebble's informational logging; its Fatalf (a commit
// that failed in the WAL, corruption found) is the store's fatal failure,
// and then a panic: Pebble goes on as if written if Fatalf returns.
type storeLogger struct{ s *Store }

func (storeLogger) Infof(string, ...any)  {}
func (storeLogger) Errorf(string, ...any) {}
func (l storeLogger) Fatalf(format string, args ...any) {
	err := fmt.Errorf("pebble: "+format, args...)
	l.s.fail(err)
	panic(err.Error())
}

// Batch is a Pebble write batch (see Store.Apply).
type Batch = pebble.Batch

// ScanRange calls fn for keys in [lower, upper) in order until fn returns
// false or an error.
func (s *Store) ScanRange(lower, upper []byte, fn func(k, v []byte) (bool, error)) error {
	return s.scan(lower, upper, false, fn)
}

// ScanReverse is ScanRange from the last key down.
func (s *Store) ScanReverse(lower, upper []byte, fn func(k, v []byte) (bool, error)) error {
	return s.scan(lower, upper, true, fn)
}

func (s *Store) scan(lower, upper []byte, reverse bool, fn func(k, v []byte) (bool, error)) error {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return err
	}
	first, next := it.First, it.Next
	if reverse {
		first, next = it.Last, it.Prev
	}
	for ok := first(); ok; ok = next() {
		more, err := fn(it.Key(), it.Value())
		if err != nil {
			_ = it.Close()
			return err
		}
		if !more {
			break
		}
	}
	return it.Close()
}

// Delete durably removes key.
func (s *Store) Delete(key []byte) error {
	return s.Apply(func(b *Batch) error { return b.Delete(key, nil) })
}

// DeletePrefixNoSync removes every key with prefix, without waiting for an
// fsync (a crash may leave them: for bookkeeping that is safe to keep).
func (s *Store) DeletePrefixNoSync(prefix []byte) error {
	return s.DeleteRangeNoSync(prefix, prefixEnd(prefix))
}

// DeleteRangeNoSync removes every key in [lower, upper), without waiting
// for an fsync (as DeletePrefixNoSync).
func (s *Store) DeleteRangeNoSync(lower, upper []byte) error {
	if err := s.Failed(); err != nil {
		return err
	}
	defer s.failOnPanic()
	return s.db.DeleteRange(lower, upper, pebble.NoSync)
}

// PrefixEnd is the first key after every key with prefix p (nil: none).
func PrefixEnd(p []byte) []byte { return prefixEnd(p) }

// DeleteNoSync removes key without waiting for an fsync (the next synced
// write, or a clean close, makes it durable): for deletions that are safe to
// lose in a crash.
func (s *Store) DeleteNoSync(key []byte) error {
	if err := s.Failed(); err != nil {
		return err
	}
	defer s.failOnPanic()
	return s.db.Delete(key, pebble.NoSync)
}
