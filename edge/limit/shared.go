package limit

import (
	"context"
	"log/slog"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Shared is Keyed across the nodes of a cluster: the same GCRA, its one
// value per key in Redis (le:rl:<name>:{key}, the theoretical arrival time
// in unix ms by Redis's clock, expiring once idle), so a key's events count
// wherever they happen. A nil *Shared allows everything (limit off).
type Shared struct {
	rdb      rueidis.Client
	name     string
	interval time.Duration // emission interval = per / rate
	burst    time.Duration // tolerance = interval × (burst-1)
}

// SharedTimeout bounds one Allow's Redis call.
const SharedTimeout = 2 * time.Second

// NewShared returns a shared limiter named name (its keys' prefix) of rate
// events per per per key with the given burst (≥ 1); rate ≤ 0 returns nil.
// Intervals are whole milliseconds.
func NewShared(rdb rueidis.Client, name string, rate int, per time.Duration, burst int) *Shared {
	if rate <= 0 || per <= 0 || rdb == nil {
		return nil
	}
	burst = max(burst, 1)
	iv := max(per/time.Duration(rate), time.Millisecond)
	return &Shared{rdb: rdb, name: name, interval: iv, burst: iv * time.Duration(burst-1)}
}

// gcraScript: KEYS the key; ARGV the interval and the tolerance in ms.
// 1 = allowed (recorded), 0 = not.
var gcraScript = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local iv, tol = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
if tat - now > tol then return 0 end
tat = tat + iv
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', string.format('%d', tat - now + 1000))
return 1`)

// Allow reports whether one more event for key is allowed now, and records
// it. An error (Redis did not answer) is for the caller to refuse on: a
// limit that cannot be checked is not skipped.
func (s *Shared) Allow(key uint64) (bool, error) {
	if s == nil {
		return true, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), SharedTimeout)
	defer cancel()
	k := "le:rl:" + s.name + ":{" + strconv.FormatUint(key, 10) + "}"
	n, err := gcraScript.Exec(ctx, s.rdb, []string{k},
		[]string{strconv.FormatInt(s.interval.Milliseconds(), 10), strconv.FormatInt(s.burst.Milliseconds(), 10)}).AsInt64()
	return n == 1, err
}

// Check is Allow as an answer: nil (allowed, recorded), refused (not
// allowed), or — Redis did not answer, logged — a 50000 "retry": a limit that
// cannot be checked is not skipped.
func (s *Shared) Check(key uint64, refused *proto.Error, log *slog.Logger) *proto.Error {
	ok, err := s.Allow(key)
	switch {
	case err != nil:
		log.Warn("a shared limit not checked", "limit", s.name, "key", key, "err", err)
		return errUnchecked
	case !ok:
		return refused
	}
	return nil
}

var errUnchecked = proto.Errorf(proto.CodeInternal, "could not check a rate limit, retry")

// Both checks a rate on this node (local) and then across the cluster
// (shared; nil: off): nil (allowed by both, recorded), refused (by
// either), or — Redis did not answer, logged — a 50000 "retry", and then the
// local event is given back (Undo): a Redis outage does not spend a user's
// rate. A refusal across the cluster keeps the local event (it throttles a
// flood before it reaches Redis).
func Both(local *Keyed, shared *Shared, key uint64, refused *proto.Error, log *slog.Logger) *proto.Error {
	_, perr := Take(local, shared, key, refused, log)
	return perr
}

// Take is Both, and the event it recorded on the node: a step after the
// rate that fails on a dependency (Redis, the wallet) with nothing done
// gives it back (Spent.GiveBack), as Both does for its own Redis call.
func Take(local *Keyed, shared *Shared, key uint64, refused *proto.Error, log *slog.Logger) (Spent, *proto.Error) {
	ok, recorded := local.allow(key)
	if !ok {
		return Spent{}, refused
	}
	perr := shared.Check(key, refused, log)
	if perr != nil && perr != refused {
		local.undo(key, recorded)
	}
	if perr != nil {
		return Spent{}, perr
	}
	return Spent{k: local, key: key, at: recorded}, nil
}

// Spent is one event Take recorded on the node (the zero Spent: none).
// The cluster-wide count keeps it: giving it back there would be another
// Redis call just after one failed (protocol.md: "spends none of the node's
// count").
type Spent struct {
	k   *Keyed
	key uint64
	at  int64
}

// GiveBack returns the event to the node's count, once; an event already
// drained (its interval passed) gives nothing back.
func (s *Spent) GiveBack() {
	if s.k != nil {
		s.k.undo(s.key, s.at)
		s.k = nil
	}
}
