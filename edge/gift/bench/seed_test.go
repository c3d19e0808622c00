package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble"
	"github.com/redis/rueidis"
)

// seedDebit re-creates the seed's gift debit (seed 000,
// QiyuCurrencyAccountServiceImpl.consumeForSendGift and decr) faithfully,
// weaknesses included; it is the baseline, not something to improve:
//
//	lock = SET lock:{user} 1 NX PX 1000      (setIfAbsent(lockKey, 1, 1 s))
//	if !lock: sleep uniform [0.5 s, 1 s), retry from the top   (recursive in the seed)
//	GET balance:{user}; if < price: fail     (check, then decrement: not atomic)
//	DECRBY balance:{user} price
//	threadPoolExecutor.execute(DB write)     (2..4 threads, ArrayBlockingQueue(1000),
//	                                          AbortPolicy: a full queue throws)
//	DEL lock:{user}                          (finally)
//	return success                           (before the DB write is done)
//
// The DB write (account decrement + trade row) goes to a Pebble database
// without waiting for it and without fsync: nobody waits for it anyway, and
// it keeps the baseline's DB from being its bottleneck. The consumer's
// consume-once SETNX (gift_consume_key, one more round trip per gift) is left
// out, which also favours the baseline.
type seedDebit struct {
	rdb rueidis.Client
	db  *pebble.DB

	// sleep waits d or until ctx ends (tests replace it).
	sleep func(ctx context.Context, d time.Duration) error

	jobs    chan seedDBJob
	workers sync.WaitGroup
	tradeID atomic.Int64

	redisPID int // for its CPU time (0: unknown)

	retries  atomic.Int64 // lock busy → slept and retried
	rejected atomic.Int64 // DB queue full (RejectedExecutionException)
	dbErrors atomic.Int64
}

type seedDBJob struct {
	user, num int64
}

// The seed's pool: core 2, max 4 threads, queue 1000.
const (
	seedDBThreads = 4
	seedDBQueue   = 1000
	seedLockTTL   = time.Second
)

var (
	errSeedInsufficient = errors.New("seed: 账户余额不足 (insufficient balance)")
	errSeedRejected     = errors.New("seed: DB task rejected (thread pool queue full)")
)

func newSeedDebit(rdb rueidis.Client, db *pebble.DB) *seedDebit {
	s := &seedDebit{rdb: rdb, db: db, sleep: sleepCtx, jobs: make(chan seedDBJob, seedDBQueue)}
	for range seedDBThreads {
		s.workers.Add(1)
		go s.dbWorker()
	}
	return s
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func seedLockKey(user int64) string {
	return "qiyu-live-bank-provider:balance:lock:" + strconv.FormatInt(user, 10)
}
func seedBalKey(user int64) string {
	return "qiyu-live-bank-provider:balance:" + strconv.FormatInt(user, 10)
}

// debit is consumeForSendGift(user, num).
func (s *seedDebit) debit(ctx context.Context, g giftOp) error {
	user, num := g.sender, g.price
	lockKey := seedLockKey(user)
	for {
		err := s.rdb.Do(ctx, s.rdb.B().Set().Key(lockKey).Value("1").Nx().Px(seedLockTTL).Build()).Error()
		if err == nil {
			return s.lockedDebit(ctx, lockKey, user, num)
		}
		if !rueidis.IsRedisNil(err) {
			return err
		}
		// Lock busy: Thread.sleep(ThreadLocalRandom.nextLong(500, 1000)), then retry.
		s.retries.Add(1)
		if err := s.sleep(ctx, time.Duration(500+rand.Int64N(500))*time.Millisecond); err != nil {
			return err
		}
	}
}

func (s *seedDebit) lockedDebit(ctx context.Context, lockKey string, user, num int64) error {
	defer func() { // finally { redisTemplate.delete(lockKey) }
		_ = s.rdb.Do(context.WithoutCancel(ctx), s.rdb.B().Del().Key(lockKey).Build()).Error()
	}()
	bal, err := s.rdb.Do(ctx, s.rdb.B().Get().Key(seedBalKey(user)).Build()).AsInt64()
	if rueidis.IsRedisNil(err) {
		return errSeedInsufficient // the seed would read MySQL and negative-cache; every sender here is cached
	}
	if err != nil {
		return err
	}
	if bal < num {
		return errSeedInsufficient
	}
	// decr: Redis first, then the DB write on the thread pool.
	if err := s.rdb.Do(ctx, s.rdb.B().Decrby().Key(seedBalKey(user)).Decrement(num).Build()).Error(); err != nil {
		return err
	}
	select {
	case s.jobs <- seedDBJob{user: user, num: num}:
	default:
		s.rejected.Add(1)
		return errSeedRejected
	}
	return nil
}

// dbWorker is one pool thread: consumeDBHandler(user, num) = account
// decrement + trade row in one transaction.
func (s *seedDebit) dbWorker() {
	defer s.workers.Done()
	for j := range s.jobs {
		id := s.tradeID.Add(1)
		b := s.db.NewBatch()
		var acct [16]byte
		copy(acct[:], "acct/")
		binary.BigEndian.PutUint64(acct[5:], uint64(j.user))
		_ = b.Merge(acct[:13], binary.BigEndian.AppendUint64(nil, uint64(-j.num)), nil)
		row := fmt.Appendf(nil, `{"user_id":%d,"num":%d,"type":"SEND_GIFT_TRADE","at":%d}`, j.user, -j.num, time.Now().UnixMilli())
		_ = b.Set(binary.BigEndian.AppendUint64([]byte("trade/"), uint64(id)), row, nil)
		if err := b.Commit(pebble.NoSync); err != nil {
			s.dbErrors.Add(1)
		}
		_ = b.Close()
	}
}

// credit sets every user's Redis balance.
func (s *seedDebit) credit(ctx context.Context, users []int64, amount int64) error {
	const chunk = 1000
	for i := 0; i < len(users); i += chunk {
		var cmds rueidis.Commands
		for _, u := range users[i:min(i+chunk, len(users))] {
			cmds = append(cmds, s.rdb.B().Set().Key(seedBalKey(u)).Value(strconv.FormatInt(amount, 10)).Build())
		}
		for _, r := range s.rdb.DoMulti(ctx, cmds...) {
			if err := r.Error(); err != nil {
				return err
			}
		}
	}
	return nil
}

// close drains the DB pool.
func (s *seedDebit) close() {
	close(s.jobs)
	s.workers.Wait()
}

// extCPU is redis-server's CPU time (the seed's debit runs there).
func (s *seedDebit) extCPU() time.Duration { return procCPU(s.redisPID) }

// quietLogger silences Pebble.
type quietLogger struct{}

func (quietLogger) Infof(string, ...any)  {}
func (quietLogger) Errorf(string, ...any) {}
func (quietLogger) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf("pebble: "+format, args...))
}
