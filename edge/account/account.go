package account

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Account statuses (SPEC §2; 0 "invalid" is not used by LiveEdge).
const (
	StatusNormal = 1
	StatusFrozen = 2
)

// errRebuilding: a status change while the shared wallet is rebuilt.
var errRebuilding = proto.Errorf(proto.CodeInternal, "account statuses are being rebuilt after a Redis data loss; retry")

// ErrFrozen is the refusal of anything a frozen account may not do.
var ErrFrozen = &proto.Error{Code: proto.CodeAccountFrozen, Msg: "account frozen"}

// Refuse is the one check of a frozen account before coins would move:
// frozen (a Statuses' Frozen; nil = no account is) says user is frozen →
// 20004 "account frozen: " + what; a status it cannot read is its error
// (nothing moved); nil otherwise.
func Refuse(frozen func(user int64) (bool, error), user int64, what string) error {
	if frozen == nil {
		return nil
	}
	fr, err := frozen(user)
	if err != nil {
		return err
	}
	if fr {
		return proto.Errorf(proto.CodeAccountFrozen, "account frozen: %s", what)
	}
	return nil
}

// Statuses reads and sets account statuses.
type Statuses interface {
	// Status is user's status (StatusNormal for a user never set).
	Status(user int64) (int, error)
	// SetStatus sets user's status durably (StatusNormal or StatusFrozen).
	SetStatus(user int64, status int) error
	// Frozen reports whether user's account is frozen.
	Frozen(user int64) (bool, error)
}

func checkStatus(status int) error {
	if status != StatusNormal && status != StatusFrozen {
		return proto.BadRequest("status must be %d (normal) or %d (frozen)", StatusNormal, StatusFrozen)
	}
	return nil
}

var prefix = []byte("rec/acctstatus/")

// Local keeps statuses in Pebble: rec/acctstatus/<user> exists (value
// "2") only for frozen users, all of whom are held in memory.
type Local struct {
	store  *persist.Store
	wmu    sync.Mutex   // serializes SetStatus (held across its fsync)
	mu     sync.RWMutex // guards frozen; never held across I/O
	frozen map[int64]bool
}

var (
	_ Statuses = (*Local)(nil)
	_ Statuses = (*Shared)(nil)
)

// NewLocal loads the frozen users from store.
func NewLocal(store *persist.Store) (*Local, error) {
	l := &Local{store: store, frozen: map[int64]bool{}}
	err := store.Scan(prefix, func(k, v []byte) error {
		// "2" (Local's), or at×10+status (Shared's, a node that ran in
		// shared mode before).
		n, err := strconv.ParseInt(string(v), 10, 64)
		if err != nil {
			return fmt.Errorf("account: bad status record %x: %q", k, v)
		}
		if statusOf(n) == StatusFrozen {
			l.frozen[int64(persist.KeyID(k))] = true
		}
		return nil
	})
	return l, err
}

// Status implements Statuses.
func (l *Local) Status(user int64) (int, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.frozen[user] {
		return StatusFrozen, nil
	}
	return StatusNormal, nil
}

// SetStatus implements Statuses: the change is fsynced before it applies.
func (l *Local) SetStatus(user int64, status int) error {
	if err := checkStatus(status); err != nil {
		return err
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	k := persist.Key(prefix, uint64(user))
	var err error
	if status == StatusFrozen {
		err = l.store.Put(k, []byte(strconv.Itoa(status)))
	} else {
		err = l.store.Delete(k)
	}
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if status == StatusFrozen {
		l.frozen[user] = true
	} else {
		delete(l.frozen, user)
	}
	return nil
}

// Frozen implements Statuses.
func (l *Local) Frozen(user int64) (bool, error) {
	st, err := l.Status(user)
	return st == StatusFrozen, err
}

// Frozen implements Statuses.
func (s *Shared) Frozen(user int64) (bool, error) {
	st, err := s.Status(user)
	return st == StatusFrozen, err
}

// Shared keeps statuses in Redis, for every node sharing it: key
// SharedKey(user) holds the user's last status change as at×10+status (at:
// Redis's clock in ms when it was made, above the previous change's), so
// that the latest change is the largest value; a user never changed has no
// key. Each change is also written, fsynced, to the Pebble of the node that
// made it (rec/acctstatus/<user>, the same value) before it is
// acknowledged, and Contribute puts every node's changes back into a
// rebuilding shared wallet generation, the largest winning — a Redis that
// lost its data does not unfreeze anyone. (A value "2" written before
// changes carried their time reads as frozen at time 0.)
type Shared struct {
	Client rueidis.Client
	Store  *persist.Store // this node's durable copy of its changes (nil: none)
	wmu    sync.Mutex     // serializes SetStatus's disk writes in change order
}

// sharedKeyPrefix begins every status key.
const sharedKeyPrefix = "liveedge:acct:status:"

// SharedKey is the Redis key of user's status.
func SharedKey(user int64) string { return sharedKeyPrefix + strconv.FormatInt(user, 10) }

// statusOf is the status a stored value says (StatusNormal for none).
func statusOf(v int64) int {
	if v%10 == StatusFrozen {
		return StatusFrozen
	}
	return StatusNormal
}

// Status implements Statuses (client-side cached, kept coherent by Redis).
// It fails closed: while the shared state is not ready (Redis lost its data
// and the nodes are putting it back, Contribute), a user whose key is
// missing, or says normal, may have a freeze on some node's disk not put
// back yet — errRebuilding (retry), never "normal"; a freeze already back
// is answered.
func (s *Shared) Status(user int64) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r := s.Client.DoMultiCache(ctx,
		rueidis.CT(s.Client.B().Get().Key(SharedKey(user)).Cache(), time.Minute),
		rueidis.CT(s.Client.B().Hget().Key(persist.SharedMetaKey).Field("state").Cache(), time.Minute))
	st := StatusNormal
	v, err := r[0].AsInt64()
	switch {
	case err == nil:
		st = statusOf(v)
	case !rueidis.IsRedisNil(err):
		return 0, err
	}
	state, err := r[1].ToString()
	if err != nil && !rueidis.IsRedisNil(err) {
		return 0, err
	}
	if state != "ready" && st != StatusFrozen {
		return 0, errRebuilding
	}
	return st, nil
}

// setStatusScript stores change ARGV[1] (a status) of KEYS[1] as
// at×10+status, at = Redis's clock in ms, above the key's last change; it
// returns the stored value. Refused while the shared wallet (KEYS[2], its
// meta hash) is not ready: its generation is being rebuilt from the nodes'
// disks, which must not change meanwhile (persist.SharedConfig.Contribute).
var setStatusScript = rueidis.NewLuaScript(`
if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then
  return redis.error_reply('NOTREADY the shared state is being rebuilt')
end
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local last = math.floor(cur / 10)
if at <= last then at = last + 1 end
local v = at * 10 + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', v))
return v`)

// SetStatus implements Statuses: the change is in Redis and fsynced on this
// node's disk before it returns.
func (s *Shared) SetStatus(user int64, status int) error {
	if err := checkStatus(status); err != nil {
		return err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	v, err := setStatusScript.Exec(ctx, s.Client, []string{SharedKey(user), persist.SharedMetaKey}, []string{strconv.Itoa(status)}).AsInt64()
	if rerr, ok := rueidis.IsRedisErr(err); ok && strings.HasPrefix(rerr.Error(), "NOTREADY") {
		return errRebuilding
	}
	if err != nil {
		return errors.Join(errors.New("account: set status in redis"), err)
	}
	if s.Store == nil {
		return nil
	}
	return s.Store.Put(persist.Key(prefix, uint64(user)), strconv.AppendInt(nil, v, 10))
}

// Backfill copies to this node's disk the statuses Redis holds under a key
// its disk has nothing (or less) for — the freezes made before changes were
// kept on disk ("2"), by a node that is gone, or through another node (a
// Redis that loses its data later gets them back from any node that copied
// them). Run at every start (cheap: one SCAN of the status keys; users
// whose status ever changed).
func (s *Shared) Backfill(ctx context.Context) (int, error) {
	if s.Store == nil {
		return 0, nil
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	copied := 0
	var cursor uint64
	for {
		e, err := s.Client.Do(ctx, s.Client.B().Scan().Cursor(cursor).Match(sharedKeyPrefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			return copied, err
		}
		for _, key := range e.Elements {
			user, err := strconv.ParseInt(strings.TrimPrefix(key, sharedKeyPrefix), 10, 64)
			if err != nil || user <= 0 {
				continue
			}
			v, err := s.Client.Do(ctx, s.Client.B().Get().Key(key).Build()).AsInt64()
			if rueidis.IsRedisNil(err) {
				continue
			}
			if err != nil {
				return copied, err
			}
			k := persist.Key(prefix, uint64(user))
			if cur, err := s.Store.Get(k); err == nil {
				if n, perr := strconv.ParseInt(string(cur), 10, 64); perr == nil && n >= v {
					continue
				}
			} else if !errors.Is(err, persist.ErrNotFound) {
				return copied, err
			}
			if err := s.Store.Put(k, strconv.AppendInt(nil, v, 10)); err != nil {
				return copied, err
			}
			copied++
		}
		if cursor = e.Cursor; cursor == 0 {
			return copied, nil
		}
	}
}

// raiseScript raises KEYS[1] to at least ARGV[1] (a status change: the
// latest is the largest); it returns 1 when it did.
var raiseScript = rueidis.NewLuaScript(`
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0`)

// mendBatch is how many status changes one round trip of Mend carries.
const mendBatch = 256

// Mend puts back into Redis every status change on this node's disk that
// Redis holds an older one for, or none: a Redis that came back from an
// older snapshot without losing any wallet op (a quiet moment) rebuilds
// nothing, and a freeze it lost would stay lost — the user sending and
// receiving again — until the next loss. Run every mendEvery (a SCAN of
// this node's few status rows, one pipelined script per mendBatch); it
// only raises (a later change made elsewhere stays). It returns how many
// it put back.
func (s *Shared) Mend(ctx context.Context) (int, error) {
	if s.Store == nil {
		return 0, nil
	}
	mended := 0
	var batch []rueidis.LuaExec
	flush := func() error {
		for _, r := range raiseScript.ExecMulti(ctx, s.Client, batch...) {
			n, err := r.AsInt64()
			if err != nil {
				return err
			}
			mended += int(n)
		}
		batch = batch[:0]
		return nil
	}
	err := s.Store.Scan(prefix, func(k, v []byte) error {
		if _, err := strconv.ParseInt(string(v), 10, 64); err != nil {
			return fmt.Errorf("account: bad status record %x: %q", k, v)
		}
		batch = append(batch, rueidis.LuaExec{Keys: []string{SharedKey(int64(persist.KeyID(k)))}, Args: []string{string(v)}})
		if len(batch) == mendBatch {
			return flush()
		}
		return nil
	})
	if err == nil && len(batch) > 0 {
		err = flush()
	}
	return mended, err
}

// MendEvery is how often a node runs Mend.
const MendEvery = 30 * time.Second

// Contribute adds the status changes made through this node (its disk) to
// a rebuilding shared wallet generation (persist.SharedConfig.Contribute):
// each as contrib's "seq" op, which keeps the largest value — the latest
// change of a user, whichever node made it; none is made meanwhile
// (SetStatus waits for the wallet to be ready). Its keys are not le:*, which
// a reset after a detected rollback deletes: a rolled-back value is kept
// until this raises it to the latest change again.
func (s *Shared) Contribute(_ time.Time, add func(op ...string) error) error {
	if s.Store == nil {
		return nil
	}
	// After a change whose script ran before Redis was lost and whose disk
	// write is on its way: the scan includes it (and sees the same rows at
	// every attempt).
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.Store.Scan(prefix, func(k, v []byte) error {
		if _, err := strconv.ParseInt(string(v), 10, 64); err != nil {
			return fmt.Errorf("account: bad status record %x: %q", k, v)
		}
		return add("seq", SharedKey(int64(persist.KeyID(k))), string(v))
	})
}
