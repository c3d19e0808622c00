package ticket

import (
	"context"
	_ "embed"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// SharedCoupons keeps a cluster's coupons in Redis: granted through any
// node, used once cluster-wide whichever node runs the order. A coupon is one
// hash, le:tcoupon:{<id>} (its own slot in a Redis Cluster: every script
// touches one key), with the buyer, the amount, the order holding it (by)
// and a mark per order that gave it back.
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
// Redis is the only copy: a Redis restarted empty forgets the coupons (not
// rebuilt from the nodes, unlike the wallet; docs/tickets.md).
type SharedCoupons struct {
	rdb     rueidis.Client
	timeout time.Duration
}

var _ CouponStore = (*SharedCoupons)(nil)

var (
	//go:embed lua/coupon_use.lua
	couponUseLua string
	//go:embed lua/coupon_back.lua
	couponBackLua    string
	couponUseScript  = rueidis.NewLuaScript(couponUseLua)
	couponBackScript = rueidis.NewLuaScript(couponBackLua)
)

// NewSharedCoupons returns the coupons of a cluster, in rdb.
func NewSharedCoupons(rdb rueidis.Client) *SharedCoupons {
	return &SharedCoupons{rdb: rdb, timeout: 2 * time.Second}
}

func sharedCouponKey(id string) string { return "le:tcoupon:{" + id + "}" }

var errCouponsUnavailable = proto.Errorf(proto.CodeInternal, "coupons temporarily unavailable, retry")

func (r *SharedCoupons) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), r.timeout)
}

// Grant implements CouponStore.
func (r *SharedCoupons) Grant(c Coupon) error {
	ctx, cancel := r.ctx()
	defer cancel()
	err := r.rdb.Do(ctx, r.rdb.B().Hset().Key(sharedCouponKey(c.ID)).FieldValue().
		FieldValue("u", strconv.FormatInt(c.UserID, 10)).
		FieldValue("a", strconv.FormatInt(c.Amount, 10)).
		FieldValue("t", strconv.FormatInt(c.CreatedAt, 10)).Build()).Error()
	if err != nil {
		return errCouponsUnavailable
	}
	return nil
}

// Get implements CouponStore.
func (r *SharedCoupons) Get(id string) (Coupon, error) {
	ctx, cancel := r.ctx()
	defer cancel()
	arr, err := r.rdb.Do(ctx, r.rdb.B().Hmget().Key(sharedCouponKey(id)).Field("u", "a", "by", "t").Build()).ToArray()
	if err != nil || len(arr) != 4 {
		return Coupon{}, errCouponsUnavailable
	}
	if arr[0].IsNil() {
		return Coupon{}, errCouponUnusable
	}
	c := Coupon{ID: id}
	u, _ := arr[0].ToString()
	a, _ := arr[1].ToString()
	t, _ := arr[3].ToString()
	c.UsedBy, _ = arr[2].ToString()
	c.UserID, _ = strconv.ParseInt(u, 10, 64)
	c.Amount, _ = strconv.ParseInt(a, 10, 64)
	c.CreatedAt, _ = strconv.ParseInt(t, 10, 64)
	return c, nil
}

// Use implements CouponStore: the use is in Redis before commit runs, and
// stays there if commit fails (the caller gives it back).
func (r *SharedCoupons) Use(id string, user int64, order string, commit func(Coupon, []persist.Record) error) error {
	ctx, cancel := r.ctx()
	arr, err := couponUseScript.Exec(ctx, r.rdb, []string{sharedCouponKey(id)},
		[]string{strconv.FormatInt(user, 10), order}).ToArray()
	cancel()
	var code int64 = -1
	if err == nil && len(arr) > 0 {
		code, err = arr[0].AsInt64()
	}
	if err != nil {
		return errCouponsUnavailable // the use may have happened: the caller gives it back
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

// GiveBack implements CouponStore.
func (r *SharedCoupons) GiveBack(id, order string, commit func(bool, []persist.Record) error) error {
	ctx, cancel := r.ctx()
	held, err := couponBackScript.Exec(ctx, r.rdb, []string{sharedCouponKey(id)}, []string{order}).AsInt64()
	cancel()
	if err != nil {
		return errCouponsUnavailable
	}
	return commit(held == 1, nil)
}
