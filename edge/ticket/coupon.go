package ticket

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"strconv"

	"github.com/liveedge/liveedge/edge/keylock"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Coupons: one use, given back only by the order holding them.
//
// Where they live is a CouponStore: this node's Pebble on a single node
// (PebbleCoupons: a use or a give-back is written in the same batch as the
// order that records it), or Redis in a cluster (SharedCoupons: any node
// grants and uses; a use is one Lua compare-and-set with the order id as its
// owner, made before the order's write). The service is written for the
// weaker of the two: a use whose outcome is unknown (the store took it, the
// order's record of it was not written) is settled by asking the store who
// holds the coupon — GiveBack frees it only for the order that holds it — so
// after any crash an order gives back exactly what it holds.

// CouponStore keeps coupons. Every method is safe for concurrent use.
type CouponStore interface {
	// Grant stores a new coupon; errCouponIDTaken (nothing written) when
	// a coupon has its id already.
	Grant(c Coupon) error
	// Get reads coupon id (40005 when unknown).
	Get(id string) (Coupon, error)
	// Use takes coupon id for order, bought by user: usable when it is
	// user's and free, or held by order already (a retry). commit writes the
	// order's records together with recs (the store's own records, when it
	// keeps coupons beside the orders) in one durable batch; its error is
	// Use's. The store's own state may say the coupon is held by order even
	// when commit failed (SharedCoupons): the caller gives it back.
	// 40005 when not usable (another user's, held by another order, given
	// back by this order before, unknown).
	Use(id string, user int64, order string, commit func(c Coupon, recs []persist.Record) error) error
	// GiveBack frees coupon id if order holds it — never a coupon another
	// order holds, so repeating it changes nothing — and then calls commit
	// with held (order held it) and the store's records to write with the
	// order's in one batch. An unknown coupon is not held. user is the
	// order's buyer.
	GiveBack(id string, user int64, order string, commit func(held bool, recs []persist.Record) error) error
}

// PebbleCoupons keeps coupons in this node's Pebble (rec/tcoupon/<id>),
// written in the same batch as the order that uses or gives back one; one
// lock per coupon, held across that batch.
type PebbleCoupons struct {
	store *persist.Store
	locks keylock.Map[string]
}

var _ CouponStore = (*PebbleCoupons)(nil)

// NewPebbleCoupons returns the coupons of a single node, in store.
func NewPebbleCoupons(store *persist.Store) *PebbleCoupons { return &PebbleCoupons{store: store} }

// Grant implements CouponStore.
func (p *PebbleCoupons) Grant(c Coupon) error {
	defer p.locks.Lock(c.ID)()
	if _, err := p.store.Get(couponKey(c.ID)); err == nil {
		return errCouponIDTaken
	} else if !errors.Is(err, persist.ErrNotFound) {
		return err
	}
	r := c.record()
	return p.store.Put(r.Key, r.Value)
}

// Get implements CouponStore.
func (p *PebbleCoupons) Get(id string) (Coupon, error) {
	var c Coupon
	v, err := p.store.Get(couponKey(id))
	if errors.Is(err, persist.ErrNotFound) {
		return c, errCouponUnusable
	}
	if err != nil {
		return c, err
	}
	err = proto.Unmarshal(v, &c) // before c is read: the order of a return's operands is not the spec's
	return c, err
}

// Use implements CouponStore: the coupon's use is in commit's batch.
func (p *PebbleCoupons) Use(id string, user int64, order string, commit func(Coupon, []persist.Record) error) error {
	defer p.locks.Lock(id)()
	c, err := p.Get(id)
	if err != nil {
		return err
	}
	if c.UserID != user || (c.UsedBy != "" && c.UsedBy != order) {
		return errCouponUnusable
	}
	c.UsedBy = order
	return commit(c, []persist.Record{c.record()})
}

// GiveBack implements CouponStore: the coupon freed in commit's batch.
func (p *PebbleCoupons) GiveBack(id string, _ int64, order string, commit func(bool, []persist.Record) error) error {
	defer p.locks.Lock(id)()
	c, err := p.Get(id)
	if err != nil && proto.AsError(err).Code != proto.CodeCouponUnusable {
		return err
	}
	if err != nil || c.UsedBy != order {
		return commit(false, nil)
	}
	c.UsedBy = ""
	return commit(true, []persist.Record{c.record()})
}

var errCouponUnusable = proto.Errorf(proto.CodeCouponUnusable, "coupon not usable")

// errCouponOnFreeOrder refuses a coupon on an order whose seats cost
// nothing: it would take nothing off and be used up.
var errCouponOnFreeOrder = proto.Errorf(proto.CodeCouponUnusable, "coupon not usable: the order costs nothing, a coupon would take nothing off it")

// errCouponIDTaken: Grant found a coupon with the new one's id (ids are made
// from the clock: one set back may make an id again).
var errCouponIDTaken = errors.New("ticket: coupon id taken")

// maxCouponIDTries bounds CreateCoupon's ids tried past taken ones.
const maxCouponIDTries = 32

// CreateCoupon grants user a one-use coupon worth amount. Its id is made
// like an order id (gene method: unique across the nodes of one moment);
// one a clock set back makes again is found taken by the store, never
// written over the coupon that has it, and the next id above it is tried.
func (s *Service) CreateCoupon(user, amount int64) (Coupon, error) {
	if user <= 0 || amount <= 0 || amount > maxCouponValue {
		return Coupon{}, proto.BadRequest("user_id > 0 and 0 < amount <= %d", maxCouponValue)
	}
	for range maxCouponIDTries {
		id, err := s.pay.NewOrderID(user)
		if err != nil {
			return Coupon{}, err
		}
		c := Coupon{ID: "c" + strconv.FormatInt(id, 10), UserID: user, Amount: amount, CreatedAt: s.cfg.Now().UnixMilli()}
		err = s.cstore.Grant(c)
		if errors.Is(err, errCouponIDTaken) {
			s.pay.OrderIDsAbove(id)
			continue
		}
		if err != nil {
			return Coupon{}, err
		}
		return c, nil
	}
	return Coupon{}, proto.Errorf(proto.CodeInternal, "internal error: no free coupon id, retry")
}

// GrantCoupon is CreateCoupon made idempotent by the granting admin's
// reqID (≤ 64 bytes; "" = CreateCoupon): the coupon's id is derived from
// (admin, reqID), so a grant sent again — its reply lost, through any node —
// finds its coupon and answers it instead of granting a second one; the
// same reqID for another user or amount is a conflict (10409).
func (s *Service) GrantCoupon(admin int64, reqID string, user, amount int64) (Coupon, error) {
	if reqID == "" {
		return s.CreateCoupon(user, amount)
	}
	if len(reqID) > 64 {
		return Coupon{}, proto.BadRequest("req_id must be at most 64 bytes")
	}
	if user <= 0 || amount <= 0 || amount > maxCouponValue {
		return Coupon{}, proto.BadRequest("user_id > 0 and 0 < amount <= %d", maxCouponValue)
	}
	c := Coupon{ID: grantCouponID(admin, reqID), UserID: user, Amount: amount, CreatedAt: s.cfg.Now().UnixMilli()}
	err := s.cstore.Grant(c)
	if !errors.Is(err, errCouponIDTaken) {
		return c, err
	}
	had, err := s.cstore.Get(c.ID)
	if err != nil {
		return Coupon{}, err
	}
	if had.UserID != user || had.Amount != amount {
		return Coupon{}, proto.Errorf(proto.CodeConflict, "req_id %q already granted a coupon of %d to user %d", reqID, had.Amount, had.UserID)
	}
	if k, ok := s.cstore.(interface{ KeepGrant(Coupon) error }); ok {
		// The first grant's node may have died between Redis and its
		// disk: this one keeps the grant before answering, so a Redis
		// that loses its data gets the coupon back from a disk.
		if err := k.KeepGrant(had); err != nil {
			return Coupon{}, err
		}
	}
	return had, nil
}

// grantCouponID is the coupon id of admin's grant reqID: "c" and 62 bits of
// a hash of the two — the form of the other coupon ids (which carry a time
// in their high bits: the two meet with a chance of about one in 2^62 per
// pair).
func grantCouponID(admin int64, reqID string) string {
	h := sha256.Sum256([]byte("liveedge coupon grant\x00" + strconv.FormatInt(admin, 10) + "\x00" + reqID))
	return "c" + strconv.FormatUint(binary.BigEndian.Uint64(h[:8])>>2, 10)
}

// Coupon reads coupon id (tests and ops).
func (s *Service) Coupon(id string) (Coupon, error) { return s.cstore.Get(id) }

func (c *Coupon) record() persist.Record {
	v, _ := proto.Marshal(c)
	return persist.Record{Key: couponKey(c.ID), Value: v}
}

// giveBackCoupon gives o's coupon back if o holds it and records
// Steps.CouponBack in o (written with the store's records in one batch),
// with o's lock held. It writes nothing when o never held the coupon (a use
// refused, or one that never reached the store); repeating it changes
// nothing. It reports whether it recorded a give-back.
func (s *Service) giveBackCoupon(o *Order) (bool, error) {
	if o.CouponID == "" || o.Steps.CouponBack {
		return false, nil
	}
	did := false
	err := s.cstore.GiveBack(o.CouponID, o.UserID, o.OrderID, func(held bool, recs []persist.Record) error {
		if !held && !o.Steps.CouponUsed {
			return nil // never taken: nothing to give back or record
		}
		next := *o
		next.Steps.CouponBack = true
		next.UpdatedAt = s.cfg.Now().UnixMilli()
		recs = append(recs, next.record())
		if err := s.store.Apply(func(b *persist.Batch) error { return setAll(b, recs) }); err != nil {
			return err
		}
		*o, did = next, true
		return nil
	})
	return did, err
}
