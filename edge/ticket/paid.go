package ticket

import (
	"errors"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
)

// The pay centre's Business for ticket orders: paid events of provider
// payments, routed here by the order's business (SPEC §4).

var _ pay.Business = (*Service)(nil)

// Paid is pay.Business: the provider says order o is paid. A PENDING_PAY
// order is sold (its seats locked → sold); a closed one is recorded
// REFUNDED and refused (pay.ErrBizClosed: the pay centre refunds).
// Idempotent: a PAID order answers nil again, a REFUNDED one refuses again.
func (s *Service) Paid(po pay.Order) error {
	id, ok := pay.ParseOrderID(po.OrderID)
	if !ok {
		return pay.ErrBizClosed
	}
	unlock := s.orders.Lock(id)
	defer unlock()
	o, err := s.load1(id)
	if err != nil {
		if proto.AsError(err).Code == proto.CodeNotFound {
			return pay.ErrBizClosed
		}
		return err
	}
	switch o.Status {
	case StatusPaid:
		return nil
	case StatusPendingPay:
		if po.Amount != payAmount(o.Amount) {
			// Placed before the cents upgrade: its pay order asked the
			// coins as cents. Not sold on that payment: closed now, its
			// seats back on sale, the payment refunded as a late one. (Left
			// open, it never closed: the sweep asks the provider before a
			// close, and the provider answers paid.)
			if err := s.closeLocked(o, "paid amount differs from the order's", true); err != nil {
				return err
			}
			return s.refundedLocked(o)
		}
		o.Status, o.UpdatedAt, o.Note = StatusPaid, s.cfg.Now().UnixMilli(), "paid"
		if err := s.store.Put(o.record().Key, o.record().Value); err != nil {
			return err
		}
		s.inv.Sell(o.ProgramID, o.id, o.seats)
		s.unpend(id)
		s.push(o)
		return nil
	case StatusCancelled:
		return s.refundedLocked(o)
	}
	return pay.ErrBizClosed // REFUNDED, or a coins order (it has no provider payment)
}

// Refunded is pay.Business: o's payment came after the pay order closed.
// It runs under the pay order's lock, so it never calls back into the pay
// centre.
func (s *Service) Refunded(po pay.Order) error {
	id, ok := pay.ParseOrderID(po.OrderID)
	if !ok {
		return nil
	}
	defer s.orders.Lock(id)()
	o, err := s.load1(id)
	if err != nil {
		if proto.AsError(err).Code == proto.CodeNotFound {
			return nil
		}
		return err
	}
	switch o.Status {
	case StatusPaid:
		// Sold on this payment (Paid ran), its pay order closed before it
		// recorded PAYED: the payment stands, the seats stay sold.
		return pay.ErrBizPaid
	case StatusPendingPay:
		// The pay centre closed its order first (its reconciler, at the
		// order's deadline): close ours too, then record the refund.
		if err := s.closeLocked(o, "pay order closed", true); err != nil {
			return err
		}
		fallthrough
	case StatusCancelled:
		if err := s.refundedLocked(o); !errors.Is(err, pay.ErrBizClosed) {
			return err
		}
	}
	return nil
}

// refundedLocked records a payment that arrived after o closed as refunded.
func (s *Service) refundedLocked(o *Order) error {
	o.Status, o.UpdatedAt, o.Note = StatusRefunded, s.cfg.Now().UnixMilli(), "paid after close: refunded, not sold"
	r := o.record()
	if err := s.store.Put(r.Key, r.Value); err != nil {
		return err
	}
	s.m.closed.WithLabelValues("late_payment").Inc()
	s.push(o)
	return pay.ErrBizClosed
}
