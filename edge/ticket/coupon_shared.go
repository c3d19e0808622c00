package ticket

import (
	"context"
	_ "embed"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// SharedCoupons keeps a cluster's coupons in Redis: granted through any
// node, used once cluster-wide whichever node runs the order. A coupon is one
// hash, le:tcoupon:{<id>}, with the buyer, the amount, the order holding it
// (by) and a mark per order that gave it back.
//
//   - Use is coupon_use.lua: free → held by the order, one compare-and-set;
//     the same order again is a retry and answers the coupon again; an order
//     that gave it back cannot take it again (a late retry of its use).
//   - GiveBack is coupon_back.lua: held by this order → free; anything else
//     changes nothing (idempotent, never frees another order's use).
//
// The use is made before the order's durable write (commit), so a crash or
// a failed write in between leaves a use the order does not record: the
// service then gives it back by order id (saga.go: undo), which asks Redis
// who holds it — the owner of the use is the truth.
//
// Redis restarted empty (or reset after the wallet found it rolled back)
// forgets the coupons; they are rebuilt with the shared wallet, from the
// nodes' disks (Contribute, persist.SharedConfig.Contribute): the granting
// node keeps each grant (rec/tcoupon/<id>, fsynced before the grant is
// answered), and every order records its use and give-back (Steps). Every
// script checks the wallet's generation (persist.SharedMetaKey) and does
// nothing unless it is ready — every node has contributed — so no coupon is
// used against a half-rebuilt set. The scripts touch that key beside the
// coupon's (like the wallet's own scripts, not one slot of a Redis Cluster).
//
// gate orders this node's coupon ops against its contribution: an op holds
// it shared from its script to its commit, the contribution exclusively, so
// the contribution reads every order whose script ran before it as that
// order's commit left it (a use the order never recorded is left out: the
// order gives the coupon back anyway).
//
// Coupons granted before a node kept its grants on disk are copied there at
// its start (backfill, once per node).
type SharedCoupons struct {
	rdb     rueidis.Client
	store   *persist.Store
	timeout time.Duration
	gate    sync.RWMutex
	now     func() time.Time // the give-back marks' clock (nil = time.Now; tests move it)
}

var _ CouponStore = (*SharedCoupons)(nil)

var (
	//go:embed lua/coupon_use.lua
	couponUseLua string
	//go:embed lua/coupon_back.lua
	couponBackLua string
	//go:embed lua/coupon_grant.lua
	couponGrantLua string
	//go:embed lua/coupon_get.lua
	couponGetLua      string
	couponUseScript   = rueidis.NewLuaScript(couponUseLua)
	couponBackScript  = rueidis.NewLuaScript(couponBackLua)
	couponGrantScript = rueidis.NewLuaScript(couponGrantLua)
	couponGetScript   = rueidis.NewLuaScript(couponGetLua)
)

// NewSharedCoupons returns the coupons of a cluster, in rdb; this node's
// grants are kept in store too (for a rebuild).
func NewSharedCoupons(rdb rueidis.Client, store *persist.Store) *SharedCoupons {
	return &SharedCoupons{rdb: rdb, store: store, timeout: 2 * time.Second}
}

func sharedCouponKey(id string) string { return SharedCouponPrefix + "{" + id + "}" }

// SharedCouponPrefix is the prefix of the cluster's coupon keys (rebuilt
// with the shared wallet: persist.SharedConfig.ContributedPrefixes).
const SharedCouponPrefix = "le:tcoupon:"

var errCouponsUnavailable = proto.Errorf(proto.CodeInternal, "coupons temporarily unavailable, retry")

func (r *SharedCoupons) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), r.timeout)
}

func (r *SharedCoupons) keys(id string) []string {
	return []string{sharedCouponKey(id), persist.SharedMetaKey}
}

// Grant implements CouponStore: in Redis, then in this node's Pebble before
// it answers. A grant that fails after Redis took it leaves a coupon nobody
// was told the id of.
func (r *SharedCoupons) Grant(c Coupon) error {
	r.gate.RLock()
	defer r.gate.RUnlock()
	ctx, cancel := r.ctx()
	defer cancel()
	ok, err := couponGrantScript.Exec(ctx, r.rdb, r.keys(c.ID), []string{strconv.FormatInt(c.UserID, 10),
		strconv.FormatInt(c.Amount, 10), strconv.FormatInt(c.CreatedAt, 10)}).AsInt64()
	if err == nil && ok == 2 {
		return errCouponIDTaken
	}
	if err != nil || ok != 1 {
		return errCouponsUnavailable
	}
	c.UsedBy = ""
	rec := c.record()
	return r.store.Put(rec.Key, rec.Value)
}

// KeepGrant writes coupon c's grant (not its use) to this node's disk, as
// Grant does after Redis took it: a grant answered through this node is on
// a disk, whichever node wrote it to Redis.
func (r *SharedCoupons) KeepGrant(c Coupon) error {
	c.UsedBy = ""
	rec := c.record()
	return r.store.Put(rec.Key, rec.Value)
}

// couponFillKey marks that this node copied the coupons Redis held at its
// start to its disk (Backfill).
var couponFillKey = recPrefix("tcouponfill")

// Backfill copies the grant of every coupon in Redis to this node's disk,
// once per node (a mark on disk): coupons granted before nodes kept their
// grants (an upgrade) are then rebuilt after a Redis loss too. Run at start,
// before this node grants; the last node of a rolling upgrade sees every
// grant of the nodes before it.
func (r *SharedCoupons) Backfill(ctx context.Context) (int, error) {
	if _, err := r.store.Get(couponFillKey); err == nil {
		return 0, nil
	}
	// Only from a complete set: not while the wallet rebuilds (a coupon
	// may be half written back then); the next start tries again.
	if st, err := r.rdb.Do(ctx, r.rdb.B().Hget().Key(persist.SharedMetaKey).Field("state").Build()).ToString(); err != nil || st != "ready" {
		return 0, errCouponsUnavailable
	}
	n := 0
	for cursor := uint64(0); ; {
		e, err := r.rdb.Do(ctx, r.rdb.B().Scan().Cursor(cursor).Match("le:tcoupon:{*}").Count(1000).Build()).AsScanEntry()
		if err != nil {
			return n, err
		}
		cmds := make(rueidis.Commands, len(e.Elements))
		for i, k := range e.Elements {
			cmds[i] = r.rdb.B().Hmget().Key(k).Field("u", "a", "t").Build()
		}
		var recs []persist.Record
		for i, res := range r.rdb.DoMulti(ctx, cmds...) {
			vals, err := res.ToArray()
			if err != nil {
				return n, err
			}
			k := e.Elements[i]
			id := strings.TrimSuffix(strings.TrimPrefix(k, "le:tcoupon:{"), "}")
			if len(vals) != 3 || vals[0].IsNil() || vals[1].IsNil() || vals[2].IsNil() || id == k {
				continue // not a whole grant
			}
			var c Coupon
			c.ID = id
			for j, f := range []*int64{&c.UserID, &c.Amount, &c.CreatedAt} {
				v, _ := vals[j].ToString()
				*f, _ = strconv.ParseInt(v, 10, 64)
			}
			recs = append(recs, c.record())
		}
		if len(recs) > 0 {
			if err := r.store.Apply(func(b *persist.Batch) error { return setAll(b, recs) }); err != nil {
				return n, err
			}
			n += len(recs)
		}
		if cursor = e.Cursor; cursor == 0 {
			break
		}
	}
	return n, r.store.Put(couponFillKey, []byte{1})
}

// Contribute adds this node's coupon state to a rebuilding wallet generation
// (persist.SharedConfig.Contribute): its grants, and for every order it runs
// that names a coupon, its use or its give-back. An order that is closed or
// being undone (CANCELLED, REFUNDED, a saga compensating) will never use its
// coupon again, whatever its steps say — its give-back may have freed the
// coupon in Redis (and another order taken it) before the order recorded
// CouponBack — so it adds only its give-back mark (b:<order>, which also
// bars a late retry of its use; only for an order closed within
// couponMarkKeep before the generation began); its give-back still owed then finds the
// coupon not held and records CouponBack. A live order (PLACING and running,
// PENDING_PAY, PAID) that recorded its use holds the coupon (by = order).
// It waits for this node's coupon ops under way.
func (r *SharedCoupons) Contribute(since time.Time, add func(op ...string) error) error {
	// Marks of orders closed long before the generation began bar nothing
	// (couponMarkKeep); since is the same on every attempt, so the ops are.
	var markFrom int64
	if !since.IsZero() {
		markFrom = since.Add(-couponMarkKeep).UnixMilli()
	}
	r.gate.Lock()
	defer r.gate.Unlock()
	err := r.store.Scan(prefixCoupon, func(_, v []byte) error {
		var c Coupon
		if err := proto.Unmarshal(v, &c); err != nil {
			return err
		}
		k := sharedCouponKey(c.ID)
		for _, f := range [][2]string{{"u", strconv.FormatInt(c.UserID, 10)},
			{"a", strconv.FormatInt(c.Amount, 10)}, {"t", strconv.FormatInt(c.CreatedAt, 10)}} {
			if err := add("hset", k, f[0], f[1]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return r.store.Scan(prefixOrder, func(_, v []byte) error {
		o, err := decodeOrder(v)
		if err != nil || o.CouponID == "" {
			return err
		}
		switch k := sharedCouponKey(o.CouponID); {
		case o.Status == StatusCancelled || o.Status == StatusRefunded ||
			o.Saga == SagaCompensating || o.Saga == SagaCompensated:
			if o.UpdatedAt < markFrom {
				return nil
			}
			return add("hset", k, "b:"+o.OrderID, strconv.FormatInt(max(o.UpdatedAt, 1), 10))
		case o.Steps.CouponUsed && !o.Steps.CouponBack:
			return add("hset", k, "by", o.OrderID)
		}
		return nil
	})
}

// Get implements CouponStore.
func (r *SharedCoupons) Get(id string) (Coupon, error) {
	ctx, cancel := r.ctx()
	defer cancel()
	arr, err := couponGetScript.Exec(ctx, r.rdb, r.keys(id), nil).ToArray()
	if err != nil || len(arr) != 5 {
		return Coupon{}, errCouponsUnavailable // or not ready: {0}
	}
	if arr[1].IsNil() {
		return Coupon{}, errCouponUnusable
	}
	c := Coupon{ID: id}
	u, _ := arr[1].ToString()
	a, _ := arr[2].ToString()
	t, _ := arr[4].ToString()
	c.UsedBy, _ = arr[3].ToString()
	c.UserID, _ = strconv.ParseInt(u, 10, 64)
	c.Amount, _ = strconv.ParseInt(a, 10, 64)
	c.CreatedAt, _ = strconv.ParseInt(t, 10, 64)
	return c, nil
}

// Use implements CouponStore: the use is in Redis before commit runs, and
// stays there if commit fails (the caller gives it back).
func (r *SharedCoupons) Use(id string, user int64, order string, commit func(Coupon, []persist.Record) error) error {
	r.gate.RLock()
	defer r.gate.RUnlock()
	ctx, cancel := r.ctx()
	arr, err := couponUseScript.Exec(ctx, r.rdb, r.keys(id),
		[]string{strconv.FormatInt(user, 10), order}).ToArray()
	cancel()
	var code int64 = -1
	if err == nil && len(arr) > 0 {
		code, err = arr[0].AsInt64()
	}
	if err != nil {
		return errCouponsUnavailable // the use may have happened: the caller gives it back
	}
	if code == 5 {
		return errCouponsUnavailable // not ready: nothing happened
	}
	if code != 0 || len(arr) != 4 {
		return errCouponUnusable
	}
	c := Coupon{ID: id, UserID: user, UsedBy: order}
	a, _ := arr[1].ToString()
	t, _ := arr[3].ToString()
	c.Amount, _ = strconv.ParseInt(a, 10, 64)
	c.CreatedAt, _ = strconv.ParseInt(t, 10, 64)
	return commit(c, nil)
}

func (r *SharedCoupons) clock() time.Time {
	if r.now != nil {
		return r.now()
	}
	return time.Now()
}

// couponMarkKeep is how long an order's give-back mark (b:<order>) is kept:
// it bars a late use of that order, which comes within a call's timeout
// (seconds); older marks are pruned (coupon_back.lua), and a rebuild after
// a Redis loss adds only those of orders closed within it.
const couponMarkKeep = time.Hour

// GiveBack implements CouponStore.
func (r *SharedCoupons) GiveBack(id string, user int64, order string, commit func(bool, []persist.Record) error) error {
	r.gate.RLock()
	defer r.gate.RUnlock()
	ctx, cancel := r.ctx()
	held, err := couponBackScript.Exec(ctx, r.rdb, r.keys(id), []string{order, strconv.FormatInt(user, 10),
		strconv.FormatInt(r.clock().UnixMilli(), 10), strconv.FormatInt(couponMarkKeep.Milliseconds(), 10)}).AsInt64()
	cancel()
	if err != nil || held < 0 {
		return errCouponsUnavailable
	}
	return commit(held == 1, nil)
}
