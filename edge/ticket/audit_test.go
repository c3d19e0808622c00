package ticket

import (
	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
)

// audit checks the durable orders and coupons against the seats in memory
// and the per-user counts (conservation of seats and coupons):
//   - every seat of a PENDING_PAY / PLACING order is locked by that order,
//     every seat of a PAID order sold to it; no other seat is taken;
//   - a program's per-user counts are the seats of its users' live orders;
//   - a coupon is used by exactly the live order that records using it;
//   - a provider-paid order's pay order asks its amount × pay.CentsPerCoin.
func (e *env) audit() {
	e.t.Helper()
	s := e.svc
	type key struct {
		prog int64
		seat Seat
	}
	want := map[key]struct {
		order int64
		st    uint8
	}{}
	held := map[int64]map[int64]int{}
	orders := map[string]*Order{}
	couponOf := map[string]string{} // coupon → order holding it per the orders
	named := map[string]bool{}      // coupons named by any order
	err := s.store.Scan(prefixOrder, func(_, v []byte) error {
		o, err := decodeOrder(v)
		if err != nil {
			return err
		}
		orders[o.OrderID] = o
		var st uint8
		switch o.Status {
		case StatusPendingPay, StatusPlacing:
			st = SeatLocked
		case StatusPaid:
			st = SeatSold
		}
		if st != 0 {
			for _, seat := range o.seats {
				k := key{o.ProgramID, seat}
				if prev, dup := want[k]; dup {
					e.t.Fatalf("seat %s of program %d in live orders %d and %d", seat, o.ProgramID, prev.order, o.id)
				}
				want[k] = struct {
					order int64
					st    uint8
				}{o.id, st}
			}
			if held[o.ProgramID] == nil {
				held[o.ProgramID] = map[int64]int{}
			}
			held[o.ProgramID][o.UserID] += len(o.seats)
		}
		if o.Pay == PayMock {
			// A provider-paid order's pay order asks its amount in cents.
			po, err := e.pay.Get(o.id)
			switch {
			case err == nil:
				if po.Amount != o.Amount*pay.CentsPerCoin || o.PayAmount != po.Amount {
					e.t.Fatalf("order %s: amount %d coins, pay_amount %d; its pay order asks %d cents", o.OrderID, o.Amount, o.PayAmount, po.Amount)
				}
			case proto.AsError(err).Code != proto.CodeNotFound:
				e.t.Fatal(err)
			case o.PayAmount != 0:
				e.t.Fatalf("order %s: pay_amount %d and no pay order", o.OrderID, o.PayAmount)
			}
		}
		if o.CouponID != "" {
			named[o.CouponID] = true
		}
		if o.Steps.CouponUsed && !o.Steps.CouponBack {
			if prev, dup := couponOf[o.CouponID]; dup {
				e.t.Fatalf("coupon %s held by orders %s and %s", o.CouponID, prev, o.OrderID)
			}
			couponOf[o.CouponID] = o.OrderID
		}
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	inv := s.inv.(*memInventory)
	inv.mu.RLock()
	progs := inv.programs
	inv.mu.RUnlock()
	for pid, p := range progs {
		for cid, c := range p.cats {
			c.mu.Lock()
			for i, st := range c.status {
				seat := Seat{cid, i/c.def.Cols + 1, i%c.def.Cols + 1}
				w, live := want[key{pid, seat}]
				switch {
				case !live && st != SeatFree:
					c.mu.Unlock()
					e.t.Fatalf("seat %s of program %d is %d (order %d) with no live order", seat, pid, st, c.owner[i])
				case live && (st != w.st || c.owner[i] != w.order):
					c.mu.Unlock()
					e.t.Fatalf("seat %s of program %d is %d of order %d; its order %d wants %d", seat, pid, st, c.owner[i], w.order, w.st)
				}
			}
			c.mu.Unlock()
		}
		mp := s.program(pid)
		mp.mu.Lock()
		for u, n := range mp.held {
			if held[pid][u] != n {
				mp.mu.Unlock()
				e.t.Fatalf("program %d user %d: count %d, live orders hold %d", pid, u, n, held[pid][u])
			}
		}
		if len(mp.held) != len(held[pid]) {
			mp.mu.Unlock()
			e.t.Fatalf("program %d: %d users counted, %d hold seats", pid, len(mp.held), len(held[pid]))
		}
		mp.mu.Unlock()
	}
	if e.redis != "" {
		// Redis: every coupon an order names holds exactly the order that
		// the orders say (none, if no live order records holding it).
		for id := range named {
			c, err := s.Coupon(id)
			if err != nil {
				e.t.Fatalf("coupon %s: %v", id, err)
			}
			if c.UsedBy != couponOf[id] {
				e.t.Fatalf("coupon %s used by %q, the orders say %q", id, c.UsedBy, couponOf[id])
			}
		}
		return
	}
	err = s.store.Scan(prefixCoupon, func(_, v []byte) error {
		var c Coupon
		if err := proto.Unmarshal(v, &c); err != nil {
			return err
		}
		if c.UsedBy != couponOf[c.ID] {
			e.t.Fatalf("coupon %s used by %q, the orders say %q", c.ID, c.UsedBy, couponOf[c.ID])
		}
		delete(couponOf, c.ID)
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	if len(couponOf) > 0 {
		e.t.Fatalf("orders hold coupons that do not exist: %v", couponOf)
	}
}
