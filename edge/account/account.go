package account

import (
	"context"
	"errors"
	"strconv"
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
	err := store.Scan(prefix, func(k, _ []byte) error {
		l.frozen[int64(persist.KeyID(k))] = true
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

// Shared keeps statuses in Redis: liveedge:acct:status:<user> = "2" for a
// frozen user, no key otherwise.
type Shared struct {
	Client rueidis.Client
}

// SharedKey is the Redis key of user's status.
func SharedKey(user int64) string { return "liveedge:acct:status:" + strconv.FormatInt(user, 10) }

// Status implements Statuses (client-side cached, kept coherent by Redis).
func (s *Shared) Status(user int64) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	v, err := s.Client.DoCache(ctx, s.Client.B().Get().Key(SharedKey(user)).Cache(), time.Minute).AsInt64()
	if rueidis.IsRedisNil(err) {
		return StatusNormal, nil
	}
	if err != nil {
		return 0, err
	}
	if v == StatusFrozen {
		return StatusFrozen, nil
	}
	return StatusNormal, nil
}

// SetStatus implements Statuses.
func (s *Shared) SetStatus(user int64, status int) error {
	if err := checkStatus(status); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var cmd rueidis.Completed
	if status == StatusFrozen {
		cmd = s.Client.B().Set().Key(SharedKey(user)).Value(strconv.Itoa(status)).Build()
	} else {
		cmd = s.Client.B().Del().Key(SharedKey(user)).Build()
	}
	if err := s.Client.Do(ctx, cmd).Error(); err != nil {
		return errors.Join(errors.New("account: set status in redis"), err)
	}
	return nil
}
