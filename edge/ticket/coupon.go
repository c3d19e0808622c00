package ticket

import (
	"errors"
	"strconv"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Coupons: one use, given back only by the order holding them.

// CreateCoupon grants user a one-use coupon worth amount.
func (s *Service) CreateCoupon(user, amount int64) (Coupon, error) {
	if user <= 0 || amount <= 0 || amount > maxCouponValue {
		return Coupon{}, proto.BadRequest("user_id > 0 and 0 < amount <= %d", maxCouponValue)
	}
	id, err := s.pay.NewOrderID(user)
	if err != nil {
		return Coupon{}, err
	}
	c := Coupon{ID: "c" + strconv.FormatInt(id, 10), UserID: user, Amount: amount, CreatedAt: s.cfg.Now().UnixMilli()}
	r := c.record()
	if err := s.store.Put(r.Key, r.Value); err != nil {
		return Coupon{}, err
	}
	return c, nil
}

// Coupon reads coupon id (tests and ops).
func (s *Service) Coupon(id string) (Coupon, error) {
	var c Coupon
	v, err := s.store.Get(couponKey(id))
	if errors.Is(err, persist.ErrNotFound) {
		return c, proto.Errorf(proto.CodeCouponUnusable, "coupon not usable")
	}
	if err != nil {
		return c, err
	}
	return c, proto.Unmarshal(v, &c)
}

func (c *Coupon) record() persist.Record {
	v, _ := proto.Marshal(c)
	return persist.Record{Key: couponKey(c.ID), Value: v}
}

// usableCoupon reads o's coupon, with its lock held: usable when it is the
// buyer's and unused, or already used by o itself (a step replayed).
func (s *Service) usableCoupon(o *Order) (*Coupon, error) {
	c, err := s.Coupon(o.CouponID)
	if err != nil {
		return nil, err
	}
	if c.UserID != o.UserID || (c.UsedBy != "" && c.UsedBy != o.OrderID) {
		return nil, proto.Errorf(proto.CodeCouponUnusable, "coupon not usable")
	}
	return &c, nil
}

// giveBackCoupon writes o (its new state) with, if o holds its coupon, the
// coupon made usable again: one batch, under the coupon's lock. The coupon
// is given back only while this order holds it, so repeating it changes
// nothing.
func (s *Service) giveBackCoupon(o *Order) error {
	if !o.Steps.CouponUsed || o.Steps.CouponBack {
		r := o.record()
		return s.store.Put(r.Key, r.Value)
	}
	defer s.coupons.Lock(o.CouponID)()
	recs := []persist.Record{}
	c, err := s.Coupon(o.CouponID)
	if err != nil && proto.AsError(err).Code != proto.CodeCouponUnusable {
		return err
	}
	o.Steps.CouponBack = true
	if err == nil && c.UsedBy == o.OrderID {
		c.UsedBy = ""
		recs = append(recs, c.record())
	}
	recs = append(recs, o.record())
	if err := s.store.Apply(func(b *persist.Batch) error { return setAll(b, recs) }); err != nil {
		o.Steps.CouponBack = false
		return err
	}
	return nil
}
