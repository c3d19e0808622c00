package limit

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Held bounds, per key, the items open at once on every node of a cluster
// (a user's unpaid orders): le:held:<name>:{key} is a sorted set of item →
// deadline in unix ms by Redis's clock. An item counts from Take until Drop
// or its deadline, whichever comes first, so an item whose Drop was lost (a
// node died, Redis did not answer) stops counting on its own. A nil *Held
// allows everything (bound off).
type Held struct {
	rdb   rueidis.Client
	name  string
	max   int
	log   *slog.Logger
	ops   chan heldOp
	stop  chan struct{}
	once  sync.Once
	done  sync.WaitGroup
	lost  atomic.Int64 // ops left to their deadline (queue full, Redis not answering, after Close)
	warn  atomic.Int64 // unix ns of the last "left to its deadline" warning
	takes atomic.Int64 // Take calls (Takes)
}

// heldOp is a drop (ttl 0) or a keep of item under key, made by the worker.
type heldOp struct {
	key  uint64
	item string
	ttl  int64 // ms
}

// heldQueue bounds the ops waiting for Redis; past it a drop is left to its
// item's deadline. heldBatch ops go in one round trip. A batch Redis did not
// answer is sent again heldRetries times, pausing heldPause, then twice as
// long each time (~6 s in all: a Redis restart or failover), before its ops
// are left to their deadlines; meanwhile new ops wait in the queue.
const (
	heldQueue   = 4096
	heldBatch   = 256
	heldRetries = 5
	heldPause   = 200 * time.Millisecond
)

// NewHeld returns a bound of max items per key named name (its keys'
// prefix), or nil if max ≤ 0 or rdb is nil. Close stops its worker.
func NewHeld(rdb rueidis.Client, name string, max int, log *slog.Logger) *Held {
	if max <= 0 || rdb == nil {
		return nil
	}
	h := &Held{rdb: rdb, name: name, max: max, log: log, ops: make(chan heldOp, heldQueue), stop: make(chan struct{})}
	h.done.Add(1)
	go h.work()
	return h
}

// takeScript: KEYS the set; ARGV the item, its lifetime in ms, the bound.
// 1 = taken (or held already), 0 = the key holds the bound.
var takeScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1`)

// opScript makes one queued op: ARGV the item and a TTL in ms — 0 drops
// the item, more keeps it (takeScript without the bound: an item open
// already; one held already keeps its deadline). One script for both, so a
// batch's ops are made in their queue order (a keep never undoes a later
// drop of the same item).
//
// A batch is sent as EVALSHA commands in one round trip; the script is
// loaded (SCRIPT LOAD on every node) only when Redis answers NOSCRIPT — its
// first use, or after a restart or SCRIPT FLUSH — not before every batch.
const opScript = `
local ttl = tonumber(ARGV[2])
if ttl == 0 then return redis.call('ZREM', KEYS[1], ARGV[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'NX', now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1`

var opSHA = func() string { h := sha1.Sum([]byte(opScript)); return hex.EncodeToString(h[:]) }()

func (h *Held) key(key uint64) string {
	return "le:held:" + h.name + ":{" + strconv.FormatUint(key, 10) + "}"
}

// Take counts item as open under key for at most ttl, unless key holds the
// bound already (false). Taking an item held already is true and changes
// nothing. An error (Redis did not answer: the item may or may not be taken)
// is for the caller to refuse on, and to Drop the item.
func (h *Held) Take(key uint64, item string, ttl time.Duration) (bool, error) {
	if h == nil {
		return true, nil
	}
	h.takes.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), SharedTimeout)
	defer cancel()
	n, err := takeScript.Exec(ctx, h.rdb, []string{h.key(key)},
		[]string{item, strconv.FormatInt(max(ttl.Milliseconds(), 1), 10), strconv.Itoa(h.max)}).AsInt64()
	return n == 1, err
}

// Check is Take as an answer: nil (taken: the caller Drops it when the item
// closes), refused (the bound is reached: nothing taken), or — Redis did not
// answer, logged — a 50000 "retry". Then the Take may have been made and
// only its reply lost, so Check drops the item itself (queued, made once
// Redis answers again): nothing is left for the caller to give back.
func (h *Held) Check(key uint64, item string, ttl time.Duration, refused *proto.Error) *proto.Error {
	ok, err := h.Take(key, item, ttl)
	switch {
	case err != nil:
		h.log.Warn("a shared bound not checked", "bound", h.name, "key", key, "err", err)
		h.Drop(key, item)
		return errHeldUnchecked
	case !ok:
		return refused
	}
	return nil
}

var errHeldUnchecked = proto.Errorf(proto.CodeInternal, "could not check a limit, retry")

// Takes reports how many Take calls were made (diagnostics, tests).
func (h *Held) Takes() int64 {
	if h == nil {
		return 0
	}
	return h.takes.Load()
}

// Drop stops counting item under key. It never blocks: the removal is made
// by the worker, and left to the item's deadline if too many wait or after
// Close.
func (h *Held) Drop(key uint64, item string) {
	if h == nil {
		return
	}
	select {
	case <-h.stop:
		h.leftToDeadline(nil, 1)
		return
	default:
	}
	select {
	case h.ops <- heldOp{key: key, item: item}:
	default:
		h.leftToDeadline(nil, 1)
	}
}

// TryKeep queues a keep of item, open already (an order loaded at a node's
// start), under key for at most ttl, whatever the bound; an item held
// already keeps its deadline. It never blocks: false when the queue is half
// full (the other half is for drops, which must not be crowded out) — the
// caller tries again later. Keeps and drops are made in their queue order,
// so a caller that queues both under one lock of its own (the item open or
// closed) never has a keep undo a drop.
func (h *Held) TryKeep(key uint64, item string, ttl time.Duration) bool {
	if h == nil || ttl <= 0 {
		return true
	}
	select {
	case <-h.stop:
		return true // nothing more is made: nothing to wait for
	default:
	}
	if len(h.ops) >= heldQueue/2 {
		return false
	}
	select {
	case h.ops <- heldOp{key: key, item: item, ttl: max(ttl.Milliseconds(), 1)}:
		return true
	default:
		return false
	}
}

// leftToDeadline counts n ops that did not reach Redis and warns at most
// every 10 s (it may run under its caller's locks: no blocking, little
// logging).
func (h *Held) leftToDeadline(err error, n int) {
	total := h.lost.Add(int64(n))
	now := time.Now().UnixNano()
	if last := h.warn.Load(); now-last >= int64(10*time.Second) && h.warn.CompareAndSwap(last, now) {
		h.log.Warn("a shared bound's drops or keeps left to their deadlines", "bound", h.name, "total", total, "err", err)
	}
}

// work makes the queued ops, up to heldBatch per round trip; at Close it
// makes what is queued within a second.
func (h *Held) work() {
	defer h.done.Done()
	batch := make([]heldOp, 0, heldBatch)
	for {
		select {
		case <-h.stop: // first: Close is not kept waiting by a busy queue
			h.drain()
			return
		default:
		}
		select {
		case op := <-h.ops:
			batch = h.more(append(batch[:0], op))
		case <-h.stop:
			h.drain()
			return
		}
		h.sendRetrying(batch)
	}
}

// sendRetrying makes ops; those Redis did not answer are sent again, from
// the first of them on and in their order (making an op twice changes
// nothing), until every one is made, heldRetries retries have failed, or
// Close (the rest is left to the items' deadlines).
func (h *Held) sendRetrying(ops []heldOp) {
	pause := heldPause
	for try := 0; ; try++ {
		failed, err := h.send(ops, SharedTimeout)
		if failed < 0 {
			return
		}
		ops = ops[failed:]
		if try == heldRetries {
			h.leftToDeadline(err, len(ops))
			return
		}
		select {
		case <-time.After(pause):
			pause *= 2
		case <-h.stop:
			h.leftToDeadline(err, len(ops))
			return
		}
	}
}

// more appends the ops queued now to batch, up to heldBatch.
func (h *Held) more(batch []heldOp) []heldOp {
	for len(batch) < heldBatch {
		select {
		case op := <-h.ops:
			batch = append(batch, op)
		default:
			return batch
		}
	}
	return batch
}

// drain makes the ops queued at Close, within a second.
func (h *Held) drain() {
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		batch := h.more(nil)
		if len(batch) == 0 {
			return
		}
		if failed, err := h.send(batch, time.Until(deadline)); failed >= 0 {
			h.leftToDeadline(err, len(batch)-failed)
		}
	}
}

// send makes ops in one round trip, in their order, and returns the index of
// the first op Redis did not answer or answered "not now" (loading, busy, a
// failover: -1 when none) and its error; an op Redis refused for good is
// counted and skipped.
func (h *Held) send(ops []heldOp, timeout time.Duration) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), max(timeout, time.Millisecond))
	defer cancel()
	from := 0
	for loaded := false; ; loaded = true {
		failed, err := h.sendFrom(ctx, ops, from)
		if re, ok := rueidis.IsRedisErr(err); !ok || !re.IsNoScript() || loaded {
			return failed, err
		}
		// The op at failed was not made (the script unknown on its node;
		// in a cluster, later ops on other nodes may have been): load the
		// script and send again from that op, in order — making an op twice
		// changes nothing.
		h.loadScript(ctx)
		from = failed
	}
}

// loadScript loads opScript on every node of the client it can reach; a node
// it cannot is left to the resend (its NOSCRIPT is "retry" then): one dead
// replica must not keep the script from the others.
func (h *Held) loadScript(ctx context.Context) {
	for _, n := range h.rdb.Nodes() {
		_ = n.Do(ctx, n.B().ScriptLoad().Script(opScript).Build().ToRetryable()).Error()
	}
}

// sendFrom is send of ops[from:] in one round trip of EVALSHA commands; the
// index it returns counts from the start of ops.
func (h *Held) sendFrom(ctx context.Context, ops []heldOp, from int) (int, error) {
	cmds := make(rueidis.Commands, 0, len(ops)-from)
	for _, op := range ops[from:] {
		cmds = append(cmds, h.rdb.B().Evalsha().Sha1(opSHA).Numkeys(1).Key(h.key(op.key)).
			Arg(op.item, strconv.FormatInt(op.ttl, 10)).Build())
	}
	for i, r := range h.rdb.DoMulti(ctx, cmds...) {
		i += from
		err := r.Error()
		if err == nil {
			continue
		}
		if re, ok := rueidis.IsRedisErr(err); ok && !transient(re) {
			// Redis ran it and refused (a key of another type, say): the
			// same again would be refused too — left to its deadline.
			h.leftToDeadline(err, 1)
			continue
		}
		return i, err
	}
	return -1, nil
}

// transient reports whether Redis refused an op for now only: loading, busy,
// a failover or a read-only replica, out of memory or unable to persist, a
// script cache flushed — made again, it may pass. (On Redis 6 an error
// inside a script comes back as "ERR Error running script…": by content.)
func transient(re *rueidis.RedisError) bool {
	if re.IsLoading() || re.IsTryAgain() || re.IsClusterDown() || re.IsNoScript() {
		return true
	}
	msg := re.Error()
	for _, s := range []string{"BUSY", "MASTERDOWN", "READONLY", "OOM", "MISCONF", "NOREPLICAS"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// Held reports how many items key holds now (tests, diagnostics).
func (h *Held) Held(key uint64) (int, error) {
	if h == nil {
		return 0, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), SharedTimeout)
	defer cancel()
	t, err := h.rdb.Do(ctx, h.rdb.B().Time().Build()).AsStrSlice()
	if err != nil || len(t) != 2 {
		return 0, err
	}
	sec, _ := strconv.ParseInt(t[0], 10, 64)
	usec, _ := strconv.ParseInt(t[1], 10, 64)
	now := sec*1000 + usec/1000
	n, err := h.rdb.Do(ctx, h.rdb.B().Zcount().Key(h.key(key)).Min("("+strconv.FormatInt(now, 10)).Max("+inf").Build()).AsInt64()
	return int(n), err
}

// Close stops the worker once it has made what is queued: after the round
// trip in progress (up to SharedTimeout with Redis not answering), within a
// second; the rest is left to the items' deadlines, as are drops after
// Close.
func (h *Held) Close() {
	if h == nil {
		return
	}
	h.once.Do(func() { close(h.stop) })
	h.done.Wait()
}
