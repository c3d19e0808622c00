package limit

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
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
	drops chan heldDrop
	stop  chan struct{}
	once  sync.Once
	done  sync.WaitGroup
}

type heldDrop struct {
	key  uint64
	item string
}

// heldDropQueue bounds the drops waiting for Redis; past it a drop is left
// to its item's deadline.
const heldDropQueue = 4096

// NewHeld returns a bound of max items per key named name (its keys'
// prefix), or nil if max ≤ 0 or rdb is nil. Close stops its drop worker.
func NewHeld(rdb rueidis.Client, name string, max int, log *slog.Logger) *Held {
	if max <= 0 || rdb == nil {
		return nil
	}
	h := &Held{rdb: rdb, name: name, max: max, log: log, drops: make(chan heldDrop, heldDropQueue), stop: make(chan struct{})}
	h.done.Add(1)
	go h.dropLoop()
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

func (h *Held) key(key uint64) string {
	return "le:held:" + h.name + ":{" + strconv.FormatUint(key, 10) + "}"
}

// Take counts item as open under key for at most ttl, unless key holds the
// bound already (false). Taking an item held already is true and changes
// nothing. An error (Redis did not answer) is for the caller to refuse on.
func (h *Held) Take(key uint64, item string, ttl time.Duration) (bool, error) {
	if h == nil {
		return true, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), SharedTimeout)
	defer cancel()
	n, err := takeScript.Exec(ctx, h.rdb, []string{h.key(key)},
		[]string{item, strconv.FormatInt(max(ttl.Milliseconds(), 1), 10), strconv.Itoa(h.max)}).AsInt64()
	return n == 1, err
}

// Check is Take as an answer: nil (taken), refused (the bound is reached),
// or — Redis did not answer, logged — a 50000 "retry".
func (h *Held) Check(key uint64, item string, ttl time.Duration, refused *proto.Error) *proto.Error {
	ok, err := h.Take(key, item, ttl)
	switch {
	case err != nil:
		h.log.Warn("a shared bound not checked", "bound", h.name, "key", key, "err", err)
		return errUnchecked
	case !ok:
		return refused
	}
	return nil
}

// Drop stops counting item under key. It never blocks: the removal is made
// by a worker, and left to the item's deadline if too many wait.
func (h *Held) Drop(key uint64, item string) {
	if h == nil {
		return
	}
	select {
	case h.drops <- heldDrop{key, item}:
	default:
		h.log.Warn("a shared bound's drop left to its deadline (queue full)", "bound", h.name, "key", key)
	}
}

func (h *Held) dropLoop() {
	defer h.done.Done()
	for {
		var d heldDrop
		select {
		case d = <-h.drops:
		case <-h.stop:
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), SharedTimeout)
		err := h.rdb.Do(ctx, h.rdb.B().Zrem().Key(h.key(d.key)).Member(d.item).Build()).Error()
		cancel()
		if err != nil {
			h.log.Warn("a shared bound's drop left to its deadline", "bound", h.name, "key", d.key, "err", err)
		}
	}
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

// Close stops the drop worker; drops still queued are left to their
// deadlines.
func (h *Held) Close() {
	if h == nil {
		return
	}
	h.once.Do(func() { close(h.stop) })
	h.done.Wait()
}
