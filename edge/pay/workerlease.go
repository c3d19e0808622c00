package pay

import (
	"context"
	"fmt"
	"hash/fnv"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// MaxWorkers is the number of order-id worker ids (the id's worker bits).
const MaxWorkers = 1 << workerBits

// DefaultLeaseTTL is how long a worker lease lives without a refresh.
const DefaultLeaseTTL = 30 * time.Second

// refreshMax is the longest time between two refreshes of a lease.
const refreshMax = time.Second

// WorkerLeaseKey is the Redis key of worker id's lease; its value is the
// holding node's id.
func WorkerLeaseKey(id int) string { return "liveedge:pay:worker:" + strconv.Itoa(id) }

// WorkerOwnerKey is the Redis key naming the node that last held worker id's
// lease; it has no TTL: the id stays that node's — its orders, programs and
// rains carry the id, and the cluster routes them by it — while the node is
// away (a restart, an outage), and a node choosing an id (-1) takes one no
// node owns before another node's.
// (Its hash tag is the lease key: one slot for the claim script's two keys.)
func WorkerOwnerKey(id int) string { return "{" + WorkerLeaseKey(id) + "}:owner" }

// WorkerHighKey is the Redis key of the highest time (unix ms) worker id's
// holders may have put in an id: each claim and refresh raises it to the
// holder's clock plus the lease's TTL (the holder makes no id once a TTL
// has passed without a refresh). It has no TTL: a node taking the id over
// makes its ids after it (WorkerLease.Since), whatever its own clock says,
// so a clock more than the TTL behind the earlier holder's cannot make that
// holder's ids again.
func WorkerHighKey(id int) string { return "{" + WorkerLeaseKey(id) + "}:high" }

// WorkerLease is an order-id worker id held in Redis, so that the nodes of a
// cluster (which share Redis) never generate ids with the same worker bits:
// the key WorkerLeaseKey(id) names the holder (SET with a TTL, only when
// free or already this node's), a goroutine refreshes it every TTL/3 — at
// most a second apart, so a Redis restarted empty has the key back within a
// second (the cluster routes a program's and an order's requests by it, and a
// missing key lets another node claim the id) — and
// Close deletes it if it is still this node's. A node restarting under the
// same node.id takes its own lease back at once. Held turns false when the
// lease was taken by another node (after it expired, e.g. Redis unreachable
// for longer than the TTL) or was not refreshed within the TTL; the order
// service refuses to make ids then.
type WorkerLease struct {
	client rueidis.Client
	node   string
	id     int
	ttl    time.Duration
	log    *slog.Logger

	// lastOK is when the last successful claim or refresh was SENT, in ns
	// of the monotonic clock since base: Redis counts the TTL from when it
	// ran the claim, which is after the send, so a lease counted from the
	// send never outlives Redis's (a slow reply or a wall-clock step does
	// not stretch it).
	lastOK atomic.Int64
	base   time.Time
	lost   atomic.Bool // another node holds the key
	now    func() time.Time
	// since is Since in unix ms: when this node took the lease, or the high
	// mark its earlier holders left if later (adopt raises it).
	since atomic.Int64
	// claimed: a claim of this process succeeded (the next are refreshes:
	// a mark is adopted only when another node held the id since).
	claimed atomic.Bool
	onSince atomic.Pointer[func(time.Time)]

	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

// claimScript takes KEYS[1] for node ARGV[1] for ARGV[2] ms when it is free
// or already the node's, names the node in KEYS[2] (the id's owner, no TTL)
// and raises KEYS[3] (the high mark) to ARGV[3]. When the mark found is an
// earlier holder's — ARGV[4] "1" (the process's first claim: its own before
// a restart, or another node's) or KEYS[2] named another node (it held the
// id since this node's last claim) — this node's ids start after it, so the
// mark is raised a TTL past it instead. Never more than ARGV[5] ms past
// Redis's clock (a node whose clock is far ahead cannot push every later
// holder's ids into the future). Returns {the mark found, the mark left,
// 1 if the mark found is an earlier holder's} when taken, {-1} when another
// node holds the key.
var claimScript = rueidis.NewLuaScript(`
local v = redis.call('GET', KEYS[1])
if v ~= false and v ~= ARGV[1] then return {-1} end
local owner = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
local h = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
local m = tonumber(ARGV[3])
local earlier = 0
if ARGV[4] == '1' or (owner and owner ~= ARGV[1]) then
  earlier = 1
  m = math.max(m, h + tonumber(ARGV[2]))
end
local t = redis.call('TIME')
m = math.min(m, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[5]))
if m > h then
  redis.call('SET', KEYS[3], string.format('%d', m))
  return {h, m, earlier}
end
return {h, h, earlier}`)

// markAhead bounds how far past Redis's clock a high mark may be set.
const markAhead = time.Hour

// releaseScript deletes KEYS[1] only when it is still node ARGV[1]'s. (The
// high mark stays: the node's ids may reach it — after an adopted mark they
// start past it and borrow milliseconds ahead of any clock.)
var releaseScript = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// LeaseWorker takes a worker id for node: want ≥ 0 takes exactly that id (an
// error when another node holds it); want < 0 takes a free id — prefer (the
// id the node held last, from its own disk; < 0 = none) if free and no other
// node owns it now (Redis may have lost the owners), then an id
// the node owns (WorkerOwnerKey), then one no node owns, starting from a hash
// of node, and only then one another node owns (its lease free: that node is
// away; logged) — an error when all MaxWorkers are held. ttl ≤ 0 means
// DefaultLeaseTTL.
func LeaseWorker(ctx context.Context, client rueidis.Client, node string, want, prefer int, ttl time.Duration, log *slog.Logger) (*WorkerLease, error) {
	return leaseWorker(ctx, client, node, want, prefer, ttl, log, time.Now)
}

// leaseWorker is LeaseWorker with the wall clock the high marks are read from.
func leaseWorker(ctx context.Context, client rueidis.Client, node string, want, prefer int, ttl time.Duration, log *slog.Logger, now func() time.Time) (*WorkerLease, error) {
	if ttl <= 0 {
		ttl = DefaultLeaseTTL
	}
	if log == nil {
		log = slog.Default()
	}
	if want >= MaxWorkers {
		return nil, fmt.Errorf("pay: worker id %d out of range 0..%d", want, MaxWorkers-1)
	}
	l := &WorkerLease{client: client, node: node, ttl: ttl, log: log, stop: make(chan struct{}), base: time.Now(), now: now}
	l.since.Store(now().UnixMilli())
	candidates := []int{want}
	owners := make([]string, MaxWorkers)
	if want < 0 {
		var err error
		if candidates, owners, err = workerCandidates(ctx, client, node, prefer); err != nil {
			return nil, fmt.Errorf("pay: lease worker id: %w", err)
		}
	}
	for _, id := range candidates {
		sent := l.sinceBase()
		ok, err := l.claim(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("pay: lease worker id: %w", err)
		}
		if ok {
			if o := owners[id]; o != "" && o != node {
				log.Warn("pay: took over the worker id of another node (every id has an owner): its orders, programs and rains made under it are routed here until it is back under another id",
					"worker_id", id, "owner", o)
			}
			l.id = id
			l.lastOK.Store(sent)
			l.wg.Add(1)
			go l.refreshLoop()
			return l, nil
		}
	}
	if want >= 0 {
		holder, _ := client.Do(ctx, client.B().Get().Key(WorkerLeaseKey(want)).Build()).ToString()
		return nil, fmt.Errorf("pay: worker id %d is held by node %q (pay.worker_id must differ per node)", want, holder)
	}
	return nil, fmt.Errorf("pay: all %d worker ids are held by other nodes", MaxWorkers)
}

// workerCandidates orders the ids node may take (want < 0): prefer, the
// ids node owns, the ids no node owns, the other nodes' — each group from a
// hash of node on — and returns the owners read.
func workerCandidates(ctx context.Context, client rueidis.Client, node string, prefer int) ([]int, []string, error) {
	cmds := make(rueidis.Commands, MaxWorkers)
	for i := range cmds {
		cmds[i] = client.B().Get().Key(WorkerOwnerKey(i)).Build()
	}
	owners := make([]string, MaxWorkers)
	for i, r := range client.DoMulti(ctx, cmds...) {
		v, err := r.ToString()
		if err != nil && !rueidis.IsRedisNil(err) {
			return nil, nil, err
		}
		owners[i] = v // "" = no owner
	}
	h := fnv.New32a()
	h.Write([]byte(node))
	start := int(h.Sum32() % MaxWorkers)
	if prefer >= 0 && prefer < MaxWorkers && owners[prefer] != "" && owners[prefer] != node {
		prefer = -1 // taken over by another node since: its ids are that node's now
	}
	var mine, free, others []int
	for i := range MaxWorkers {
		id := (start + i) % MaxWorkers
		switch {
		case id == prefer:
		case owners[id] == node:
			mine = append(mine, id)
		case owners[id] == "":
			free = append(free, id)
		default:
			others = append(others, id)
		}
	}
	var out []int
	if prefer >= 0 && prefer < MaxWorkers {
		out = append(out, prefer)
	}
	return append(append(append(out, mine...), free...), others...), owners, nil
}

// claim takes or refreshes id's lease (ok), raising the high mark to the
// latest time this node's ids can carry until its next claim: its clock,
// or Since if later (ids start after it), plus the TTL. A mark that is an
// earlier holder's (the process's first claim, or another node held the id
// since this node's last claim — the owner key says so, whatever the
// clocks) raises Since to it (adopt). (A claim whose reply was lost left
// this node's own mark, which the next claim does not take for another's.)
func (l *WorkerLease) claim(ctx context.Context, id int) (bool, error) {
	first := "0"
	if !l.claimed.Load() {
		first = "1"
	}
	mark := max(l.now().UnixMilli(), l.since.Load()) + l.ttl.Milliseconds()
	vs, err := claimScript.Exec(ctx, l.client, []string{WorkerLeaseKey(id), WorkerOwnerKey(id), WorkerHighKey(id)},
		[]string{l.node, strconv.FormatInt(l.ttl.Milliseconds(), 10), strconv.FormatInt(mark, 10),
			first, strconv.FormatInt(markAhead.Milliseconds(), 10)}).AsIntSlice()
	if err != nil || len(vs) == 0 || vs[0] < 0 {
		return false, err
	}
	if len(vs) != 3 {
		return false, fmt.Errorf("pay: worker lease claim answered %v", vs)
	}
	l.claimed.Store(true)
	if vs[2] == 1 {
		l.adopt(id, vs[0])
	}
	return true, nil
}

// adopt raises Since to high, another holder's mark: its ids may reach it
// (this node's own before a restart within a TTL, or another's whose clock
// is ahead of this one's, or that held the id while this node's lease had
// lapsed), so this node's start after it (OnSince).
func (l *WorkerLease) adopt(id int, high int64) {
	now := l.now().UnixMilli()
	for {
		cur := l.since.Load()
		if high <= cur {
			return
		}
		if l.since.CompareAndSwap(cur, high) {
			break
		}
	}
	if ahead := time.Duration(high-now) * time.Millisecond; ahead > l.ttl {
		l.log.Warn("pay: the worker id's earlier holder had a clock ahead of this one's; new ids start after its last possible one",
			"worker_id", id, "ahead", ahead-l.ttl)
	}
	if fn := l.onSince.Load(); fn != nil {
		(*fn)(time.UnixMilli(high))
	}
}

// SetOnSince sets fn, called with the new Since each time it is raised
// after this call (a lease lost and taken again after another holder's);
// call it before any id is made.
func (l *WorkerLease) SetOnSince(fn func(time.Time)) { l.onSince.Store(&fn) }

// ID is the leased worker id.
func (l *WorkerLease) ID() int { return l.id }

// Held reports whether the lease is this node's: refreshed within its TTL
// and not taken by another node.
func (l *WorkerLease) Held() bool {
	// A tenth of the TTL spare for the clock rates of this host and Redis's.
	return !l.lost.Load() && time.Duration(l.sinceBase()-l.lastOK.Load()) < l.ttl-l.ttl/10
}

func (l *WorkerLease) sinceBase() int64 { return int64(time.Since(l.base)) }

func (l *WorkerLease) refreshLoop() {
	defer l.wg.Done()
	t := time.NewTicker(min(l.ttl/3, refreshMax))
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), l.ttl/3)
		sent := l.sinceBase()
		ok, err := l.claim(ctx, l.id)
		cancel()
		switch {
		case err != nil:
			// Its reply lost, the claim may have run — and found another
			// holder's mark, which the next claim would then take for this
			// node's own (the owner key names this node now): the next is
			// a first claim again, adopting whatever mark it finds (this
			// node's own: its ids start a TTL later, harmless).
			l.claimed.Store(false)
			l.log.Warn("pay: worker lease not refreshed", "worker_id", l.id, "err", err)
		case !ok:
			if !l.lost.Swap(true) {
				l.log.Error("pay: worker lease taken by another node; order creation stops", "worker_id", l.id)
			}
		default:
			l.lost.Store(false)
			l.lastOK.Store(sent)
		}
	}
}

// Close stops refreshing and releases the lease if it is still this node's.
func (l *WorkerLease) Close() {
	l.once.Do(func() {
		close(l.stop)
		l.wg.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := releaseScript.Exec(ctx, l.client, []string{WorkerLeaseKey(l.id)}, []string{l.node}).Error(); err != nil {
			l.log.Warn("pay: worker lease not released (expires by itself)", "worker_id", l.id, "err", err)
		}
	})
}

// Since is when this node took the lease, or the high mark its earlier
// holders left (WorkerHighKey) if that is later: an id with this worker id
// and an earlier time was made by an earlier holder (another node, or this
// one before a restart), and the ids this node makes must be after it.
func (l *WorkerLease) Since() time.Time { return time.UnixMilli(l.since.Load()) }
