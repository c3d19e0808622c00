package redpacket

import (
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

// Packet is one amount of a rain's split; Index is its position in the split
// (0..N-1), which names its grant (rec/rpgrant/<code>/<index>) and its ledger
// request id, so a packet can be granted at most once.
type Packet struct {
	Index  int32 `json:"i"`
	Amount int64 `json:"a"`
}

// Pool holds the packets of running rains that are not granted yet. The
// Service is the only writer of a code's pool: it Loads it once per process
// (start, or restore after a restart) with the split minus the durable grants,
// Pops one packet per grab, and Drops it when the rain is settled.
//
// A Pool is a seam: today MemoryPool (this node's memory) and RedisListPool
// (the seed's design, one Redis list per code). A cluster-wide sharded pool
// (each node holds a slice of the packets in memory and takes more from the
// others, or from a shared remainder, when its slice runs dry) implements the
// same methods; the Service does not change.
//
// A popped packet whose grant the wallet refused as unavailable (nothing
// moved) is pushed back. One otherwise never granted (a crash between Pop
// and the durable grant, a grant in doubt) is not: it is refunded to the
// anchor when the rain is settled, because the refund is computed from the
// durable grants, never from what a pool still holds.
type Pool interface {
	// Load installs left as code's packets, replacing any it held.
	Load(ctx context.Context, code string, left []Packet) error
	// Pop takes one packet of code; ok false when none is left (or code is
	// unknown).
	Pop(ctx context.Context, code string) (p Packet, ok bool, err error)
	// Push puts back p, popped by a grab that granted nothing (best effort:
	// a packet not put back stays out of the pool and is refunded at the
	// end).
	Push(ctx context.Context, code string, p Packet) error
	// Len is the number of packets of code left.
	Len(ctx context.Context, code string) (int, error)
	// Drop forgets code.
	Drop(ctx context.Context, code string) error
}

var (
	_ Pool = (*MemoryPool)(nil)
	_ Pool = (*RedisListPool)(nil)
)

// MemoryPool keeps each rain's packets in a slice in this process, popped
// from the end under the rain's own mutex (the map lock is only read on the
// grab path). Load shuffles, so the order of the split (whose last amount
// takes the rest) does not leak into the order of grabs.
type MemoryPool struct {
	mu    sync.RWMutex
	rains map[string]*memSlice
}

type memSlice struct {
	mu   sync.Mutex
	left []Packet
}

// NewMemoryPool returns an empty in-memory pool.
func NewMemoryPool() *MemoryPool { return &MemoryPool{rains: map[string]*memSlice{}} }

// Load implements Pool.
func (m *MemoryPool) Load(_ context.Context, code string, left []Packet) error {
	s := &memSlice{left: append([]Packet(nil), left...)}
	rand.Shuffle(len(s.left), func(i, j int) { s.left[i], s.left[j] = s.left[j], s.left[i] })
	m.mu.Lock()
	m.rains[code] = s
	m.mu.Unlock()
	return nil
}

func (m *MemoryPool) slice(code string) *memSlice {
	m.mu.RLock()
	s := m.rains[code]
	m.mu.RUnlock()
	return s
}

// Pop implements Pool.
func (m *MemoryPool) Pop(_ context.Context, code string) (Packet, bool, error) {
	s := m.slice(code)
	if s == nil {
		return Packet{}, false, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.left)
	if n == 0 {
		return Packet{}, false, nil
	}
	p := s.left[n-1]
	s.left = s.left[:n-1]
	return p, true, nil
}

// take removes up to n packets of code (a lease to another node).
func (m *MemoryPool) take(code string, n int) []Packet {
	s := m.slice(code)
	if s == nil || n <= 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k := min(n, len(s.left))
	out := append([]Packet(nil), s.left[len(s.left)-k:]...)
	s.left = s.left[:len(s.left)-k]
	return out
}

// add puts packets of code back (returned by another node), at random
// places among those left, so the order of grabs does not follow the
// order of returns.
func (m *MemoryPool) add(code string, pk []Packet) {
	s := m.slice(code)
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range pk {
		s.left = append(s.left, p)
		j := rand.IntN(len(s.left))
		s.left[j], s.left[len(s.left)-1] = s.left[len(s.left)-1], s.left[j]
	}
}

// Push implements Pool.
func (m *MemoryPool) Push(_ context.Context, code string, p Packet) error {
	m.add(code, []Packet{p})
	return nil
}

// Len implements Pool.
func (m *MemoryPool) Len(_ context.Context, code string) (int, error) {
	s := m.slice(code)
	if s == nil {
		return 0, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.left), nil
}

// Drop implements Pool.
func (m *MemoryPool) Drop(_ context.Context, code string) error {
	m.mu.Lock()
	delete(m.rains, code)
	m.mu.Unlock()
	return nil
}

// RedisListPool is the seed's design: one Redis list per code
// (le:rp:<code>), filled with RPUSH in chunks of 100 and popped with one RPOP
// per grab. It is the benchmark's baseline and a fallback; it is usable on
// one node only (Load replaces the list, so two nodes loading the same code
// would hand out its packets twice — a cluster uses a sharded pool).
type RedisListPool struct {
	Client rueidis.Client
	// TTL, when set, expires each list TTL after its Load (a put-back
	// renews it): a list its rain's settlement did not drop (a crash
	// before it, a failed Drop, a rolled-back Redis) does not stay in
	// Redis for good. It must outlast a rain (its longest duration and
	// its settlement); a list reloaded at a restart starts again.
	TTL time.Duration
}

// redisListChunk is how many packets one RPUSH carries (the seed's 100).
const redisListChunk = 100

func redisListKey(code string) string { return "le:rp:" + code }

// Load implements Pool: the list is replaced atomically (MULTI/EXEC), and
// the code no longer marked dropped.
func (r *RedisListPool) Load(ctx context.Context, code string, left []Packet) error {
	key := redisListKey(code)
	cmds := make(rueidis.Commands, 0, 3+len(left)/redisListChunk+1)
	cmds = append(cmds, r.Client.B().Multi().Build(), r.Client.B().Del().Key(key, redisListDroppedKey(code)).Build())
	shuffled := append([]Packet(nil), left...)
	rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	for len(shuffled) > 0 {
		n := min(len(shuffled), redisListChunk)
		vals := make([]string, n)
		for i, p := range shuffled[:n] {
			vals[i] = encodePacket(p)
		}
		cmds = append(cmds, r.Client.B().Rpush().Key(key).Element(vals...).Build())
		shuffled = shuffled[n:]
	}
	if r.TTL > 0 && len(left) > 0 {
		cmds = append(cmds, r.Client.B().Pexpire().Key(key).Milliseconds(r.TTL.Milliseconds()).Build())
	}
	cmds = append(cmds, r.Client.B().Exec().Build())
	for _, res := range r.Client.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return err
		}
	}
	return nil
}

// Pop implements Pool.
func (r *RedisListPool) Pop(ctx context.Context, code string) (Packet, bool, error) {
	s, err := r.Client.Do(ctx, r.Client.B().Rpop().Key(redisListKey(code)).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return Packet{}, false, nil
	}
	if err != nil {
		return Packet{}, false, err
	}
	p, err := decodePacket(s)
	return p, err == nil, err
}

// redisListPush puts a packet back unless the code was dropped: KEYS[1] the
// list, KEYS[2] its dropped mark; ARGV[1] the element, ARGV[2] the list's
// TTL in ms (0: none). Redis deletes a list its last pop emptied, so the
// list's absence cannot tell "emptied" (put the packet back, as the memory
// pool does) from "dropped" (not again).
var redisListPush = rueidis.NewLuaScript(`
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n`)

// redisListDroppedTTL is how long a dropped code's mark is kept (a late
// put-back comes within a grab's timeout).
const redisListDroppedTTL = time.Hour

// redisListDroppedKey is outside le:* (kept whatever the shared wallet's
// reset after a data loss deletes: a late put-back must never make the list
// anew).
func redisListDroppedKey(code string) string { return "liveedge:rpgone:" + code }

// Push implements Pool: into the list, also one its last pop emptied, but
// not after Drop.
func (r *RedisListPool) Push(ctx context.Context, code string, p Packet) error {
	return redisListPush.Exec(ctx, r.Client, []string{redisListKey(code), redisListDroppedKey(code)},
		[]string{encodePacket(p), strconv.FormatInt(r.TTL.Milliseconds(), 10)}).Error()
}

// Len implements Pool.
func (r *RedisListPool) Len(ctx context.Context, code string) (int, error) {
	n, err := r.Client.Do(ctx, r.Client.B().Llen().Key(redisListKey(code)).Build()).AsInt64()
	return int(n), err
}

// Drop implements Pool: the list deleted and the code marked dropped.
func (r *RedisListPool) Drop(ctx context.Context, code string) error {
	for _, res := range r.Client.DoMulti(ctx, r.Client.B().Multi().Build(),
		r.Client.B().Set().Key(redisListDroppedKey(code)).Value("1").Ex(redisListDroppedTTL).Build(),
		r.Client.B().Del().Key(redisListKey(code)).Build(), r.Client.B().Exec().Build()) {
		if err := res.Error(); err != nil {
			return err
		}
	}
	return nil
}

// encodePacket is a list element: "<index>:<amount>".
func encodePacket(p Packet) string {
	return strconv.FormatInt(int64(p.Index), 10) + ":" + strconv.FormatInt(p.Amount, 10)
}

var errBadElement = errors.New("redpacket: bad redis list element")

func decodePacket(s string) (Packet, error) {
	i, a, ok := strings.Cut(s, ":")
	if !ok {
		return Packet{}, errBadElement
	}
	idx, err1 := strconv.ParseInt(i, 10, 32)
	amt, err2 := strconv.ParseInt(a, 10, 64)
	if err1 != nil || err2 != nil || idx < 0 || amt < 1 {
		return Packet{}, errBadElement
	}
	return Packet{Index: int32(idx), Amount: amt}, nil
}
