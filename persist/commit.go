package persist

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble"
	"github.com/prometheus/client_golang/prometheus"
)

// commitWorkers is how many group commits may be in flight at once: while
// one waits for its fsync, the ops that arrived meanwhile are being written.
const commitWorkers = 2

// maxGroupOps bounds the ops of one batch.
const maxGroupOps = 4096

// ErrClosed is returned for ops applied after Ledger.Close.
var ErrClosed = errors.New("persist: ledger closed")

// commitEntry is one op's share of a group commit, encoded by its caller.
type commitEntry struct {
	rows     []row
	postings []Posting
	tallies  []Tally
	maxID    int64
	idem     []byte      // the op's idempotency record (appendIdemEntry), or nil
	hour     int32       // unix hour of the op
	loc      idemLoc     // set by the committer: where idem was written
	done     func(error) // runs on the committer after the fsync; must not block
}

// committer group-commits ledger ops: every op queued while a batch is being
// committed goes into the next batch, one Pebble batch and one fsync for all
// of them, with balance and tally merges summed per account.
type committer struct {
	store  *Store
	groups *atomic.Int64 // ids of idempotency group rows

	mu     sync.Mutex
	queue  []*commitEntry
	closed bool
	err    error // the first commit failure: the ledger takes no more ops

	wake chan struct{} // cap 1: the queue is not empty
	stop chan struct{}
	wg   sync.WaitGroup

	last *groupTurn // the turn of the group taken last
	// durableWait bounds durable's wait (durableWait; tests set it).
	durableWait time.Duration

	// failWrite, in tests, makes the next group commits fail as a disk would.
	failWrite error
	// failSync, in tests, makes the next group commits fail after their
	// batch entered the WAL, as a failed fsync would.
	failSync error
	// crashAt, in tests, is called (and may block, as a process stopped
	// there would) at named points: "reserved" (an op's reservation is
	// done and it is queued; entries is the op), "wait" (a group is built
	// and waits for an earlier group to enter the WAL), "write" (a group is
	// about to enter the WAL), "sync" (a group is in the WAL, readable, its
	// fsync not done), "loaded" (an op read a balance from Pebble, before
	// it keeps it in memory), "balance" (Balance found the user not in
	// memory, before it reads Pebble). Set it before the first op.
	crashAt func(point string, entries []*commitEntry)

	commitSeconds prometheus.Histogram // one group's batch write + fsync
	groupOps      prometheus.Histogram // ops per group
}

func newCommitter(store *Store, workers int, groups *atomic.Int64) *committer {
	c := &committer{store: store, groups: groups, wake: make(chan struct{}, 1), stop: make(chan struct{}), last: doneTurn(), durableWait: durableWait,
		commitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "liveedge", Name: "ledger_commit_seconds",
			Help:    "Time to write and fsync one group commit of the ledger.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 1.5, 24), // 50 µs .. ~0.5 s
		}),
		groupOps: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "liveedge", Name: "ledger_group_ops",
			Help:    "Ledger ops per group commit (one fsync).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 13), // 1 .. 4096
		})}
	c.wg.Add(workers)
	for range workers {
		go c.worker()
	}
	return c
}

// add queues e, or returns why the committer takes no more ops (then e.done
// is not called).
func (c *committer) add(e *commitEntry) error {
	c.mu.Lock()
	if err := c.failedLocked(); err != nil {
		c.mu.Unlock()
		return err
	}
	c.queue = append(c.queue, e)
	c.mu.Unlock()
	c.signal()
	return nil
}

func (c *committer) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// failed returns why the committer takes no more ops, or nil.
func (c *committer) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failedLocked()
}

// failedLocked returns why the committer takes no more ops, or nil.
func (c *committer) failedLocked() error {
	if c.err != nil {
		return c.err
	}
	if err := c.store.Failed(); err != nil {
		// Another write failed (Store.Apply): the node is stopping.
		return fmt.Errorf("%w (%w)", err, ErrInProgress)
	}
	if c.closed {
		return ErrClosed
	}
	return nil
}

// close commits what is queued and stops the workers.
func (c *committer) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.mu.Unlock()
	close(c.stop)
	c.wg.Wait()
}

// durable waits until every group taken so far is durable (and so the
// groups before it): what a read of Pebble saw of the ledger's writes is
// then durable too — each group it could see was taken before. It waits at
// most durableWait (a stalled disk does not pile up readers); then, or when
// a group failed (the node stops), ErrWalletUnavailable: retry.
func (c *committer) durable() error {
	c.mu.Lock()
	t, d := c.last, c.durableWait
	c.mu.Unlock()
	select {
	case <-t.durable:
	default:
		wait := time.NewTimer(d)
		defer wait.Stop()
		select {
		case <-t.durable:
		case <-wait.C:
			return fmt.Errorf("%w: the ledger's writes not durable within %v", ErrWalletUnavailable, d)
		}
	}
	if t.err != nil {
		return fmt.Errorf("%w: %w", ErrWalletUnavailable, t.err)
	}
	return nil
}

// durableWait bounds durable's wait (committer.durableWait: tests change it).
const durableWait = 5 * time.Second

// groupTurn orders the group commits: a group enters Pebble's WAL only
// after the group taken before it has (one WAL order, the order groups were
// taken from the queue, which is the order their ops reserved), and is
// acknowledged only after that group is durable too. Between entering and
// durable a group waits for its fsync without holding the turn, so the next
// group's write overlaps it.
type groupTurn struct {
	entered chan struct{} // closed once the group is in the WAL queue (inWAL), or failed before
	inWAL   bool          // set before entered is closed
	durable chan struct{} // closed once its outcome is known; err is set before
	err     error
}

func doneTurn() *groupTurn {
	t := &groupTurn{entered: make(chan struct{}), durable: make(chan struct{}), inWAL: true}
	close(t.entered)
	close(t.durable)
	return t
}

func (c *committer) worker() {
	defer c.wg.Done()
	for {
		c.mu.Lock()
		for len(c.queue) == 0 {
			closed := c.closed
			c.mu.Unlock()
			if closed {
				return
			}
			select {
			case <-c.wake:
			case <-c.stop:
			}
			c.mu.Lock()
		}
		n := min(len(c.queue), maxGroupOps)
		group := c.queue[:n:n]
		if n < len(c.queue) {
			c.queue = slices.Clone(c.queue[n:])
			c.signal() // the other worker takes the rest
		} else {
			c.queue = nil
		}
		prev, turn := c.last, &groupTurn{entered: make(chan struct{}), durable: make(chan struct{})}
		c.last = turn
		hook, fail, failSync := c.crashAt, c.failWrite, c.failSync
		c.mu.Unlock()

		t0 := time.Now()
		err := c.write(group, prev, turn, hook, fail, failSync)
		c.commitSeconds.Observe(time.Since(t0).Seconds())
		c.groupOps.Observe(float64(len(group)))
		answer := err
		if err != nil {
			err = fmt.Errorf("persist: ledger commit failed, the node must restart: %w", err)
			c.mu.Lock()
			if c.err == nil {
				// Every op after this is refused, nothing reserved — as
				// "retry" (ErrInProgress): one of them may retry an op
				// answered in doubt, which "failed" would misreport.
				c.err = fmt.Errorf("%w; every op is refused until then (%w)", err, ErrInProgress)
				slog.Error("ledger commit failed: every op is refused until the node restarts", "err", err, "in_wal", turn.inWAL)
			}
			c.mu.Unlock()
			c.store.fail(err) // the node restarts: Pebble's state is unknown
			answer = err
			if turn.inWAL {
				// The batch was handed to Pebble: it may be durable (the
				// fsync's error, or an earlier group's, says nothing of
				// it). Not "failed" — its callers must not tell a sender
				// that nothing moved — but in doubt, known after the
				// restart (a retry with the same request id then replays
				// it, or runs it).
				answer = fmt.Errorf("%w (its batch entered the WAL: %w)", err, ErrInDoubt)
			}
		}
		turn.err = err
		close(turn.durable)
		for _, e := range group {
			e.done(answer)
		}
	}
}

type tallyID struct {
	name string
	user int64
}

// write commits one group durably, in its turn (see groupTurn): it builds
// the batch, waits for prev to enter the WAL, hands the batch to Pebble,
// passes the turn on, waits for its fsync and then for prev to be durable.
// An error of prev fails this group too (it may be durable, but the ledger
// stops anyway). Its keys go into the batch sorted: the memtable inserts a
// batch in order, reusing the previous insert's position, so sorted keys
// cost far fewer skiplist comparisons than random ones.
func (c *committer) write(group []*commitEntry, prev, turn *groupTurn, hook func(string, []*commitEntry), fail, failSync error) error {
	entered := false
	enter := func(inWAL bool) {
		if !entered {
			entered, turn.inWAL = true, inWAL
			close(turn.entered)
		}
	}
	defer enter(false)
	kvs := c.build(group)
	b := c.store.db.NewBatch()
	defer b.Close()
	for _, kv := range kvs {
		var err error
		if kv.merge {
			err = b.Merge(kv.k, kv.v, nil)
		} else {
			err = b.Set(kv.k, kv.v, nil)
		}
		if err != nil {
			return err
		}
	}
	select {
	case <-prev.entered:
	default:
		if hook != nil {
			hook("wait", group)
		}
		<-prev.entered
	}
	if !prev.inWAL {
		// Nothing of this group may be durable without the earlier one.
		<-prev.durable
		return prev.err
	}
	if hook != nil {
		hook("write", group)
	}
	if fail != nil {
		return fail
	}
	if err := c.store.Failed(); err != nil {
		// Another write failed (Store.Apply) since the group was taken:
		// nothing of it enters the WAL — "retry", as failedLocked.
		return fmt.Errorf("%w (%w)", err, ErrInProgress)
	}
	if err := c.applyNoSyncWait(b); err != nil {
		return err
	}
	enter(true)
	if hook != nil {
		hook("sync", group)
	}
	if err := b.SyncWait(); err != nil {
		return err
	}
	if failSync != nil {
		return failSync
	}
	<-prev.durable
	return prev.err
}

// applyNoSyncWait hands b to Pebble's WAL; a panic there is the store's
// fatal failure (Store.failOnPanic).
func (c *committer) applyNoSyncWait(b *pebble.Batch) error {
	defer c.store.failOnPanic()
	return c.store.db.ApplyNoSyncWait(b, pebble.Sync)
}

// build returns the group's keys and values, sorted.
func (c *committer) build(group []*commitEntry) []batchKV {
	n, idemBytes := 3, 0
	var hour int32
	for _, e := range group {
		n += len(e.rows) + len(e.postings) + len(e.tallies)
		if e.idem != nil {
			idemBytes += len(e.idem)
			hour = max(hour, e.hour)
		}
	}
	kvs := make([]batchKV, 0, n)
	if idemBytes > 0 {
		// One row for the group's idempotency records, keyed by the latest
		// hour among them (none expires before its TTL).
		gid := c.groups.Add(1)
		if gid&locGroupMask == 0 {
			gid = c.groups.Add(1) // group 0 means a row of its own
		}
		v := newIdemGroup(idemBytes + 1)
		loc := mkLoc(hour, gid)
		for _, e := range group {
			if e.idem != nil {
				v = append(v, e.idem...)
				e.loc = loc
			}
		}
		kvs = append(kvs, batchKV{k: idemGroupKey(loc.hour(), loc.group()), v: v},
			batchKV{k: SeqKey("idxg"), v: EncodeInt64(gid), merge: true})
	}
	bal := map[int64]int64{}
	tal := map[tallyID]int64{}
	var maxID int64
	for _, e := range group {
		for _, r := range e.rows {
			kvs = append(kvs, batchKV{k: r.k, v: r.v})
		}
		for _, p := range e.postings {
			bal[p.User] += p.Delta
		}
		for _, t := range e.tallies {
			tal[tallyID{t.Name, t.User}] += t.Delta
		}
		maxID = max(maxID, e.maxID)
	}
	for u, d := range bal {
		if d != 0 {
			kvs = append(kvs, batchKV{k: Key(PrefixBal, uint64(u)), v: EncodeInt64(d), merge: true})
		}
	}
	for t, d := range tal {
		if d != 0 {
			kvs = append(kvs, batchKV{k: TallyKey(t.name, t.user), v: EncodeInt64(d), merge: true})
		}
	}
	if maxID > 0 {
		kvs = append(kvs, batchKV{k: SeqKey("trade"), v: EncodeInt64(maxID), merge: true})
	}
	// Two rows of one key (a record rewritten by a later op of the group)
	// keep their order, so the later one wins.
	for i := range kvs {
		kvs[i].seq = i
	}
	slices.SortFunc(kvs, func(a, b batchKV) int {
		if c := bytes.Compare(a.k, b.k); c != 0 {
			return c
		}
		return a.seq - b.seq
	})
	return kvs
}

type batchKV struct {
	k, v  []byte
	merge bool
	seq   int
}
