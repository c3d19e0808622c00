package pay

import (
	"errors"
	"strconv"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// BizCoins is the business of recharge orders: a paid order credits coins.
const BizCoins = "coins"

// Business is a business other than coin recharge whose orders are paid
// through the pay centre (SPEC §4 biz routing: the order records its
// business; a verified paid event goes to that business instead of the
// wallet). Both methods are called with the pay order's lock held (lock
// order: pay order → the business's own locks) and before the pay order's
// new state is recorded, so they must be idempotent per order: a crash or an
// error after them makes the provider (or the reconciler) deliver again.
type Business interface {
	// Paid: the provider says o is paid. nil = the business took the
	// payment (the pay order becomes PAYED); ErrBizClosed = the business
	// order was already closed and has recorded the payment as refunded (the
	// pay order becomes PAY_BACK with a refund record); any other error =
	// retry later (the provider is answered 500).
	Paid(o Order) error
	// Refunded: o's payment arrived after the pay order was closed and is
	// refunded; the business records that (idempotent). ErrBizPaid = the
	// business took this payment already (its Paid ran before the pay order
	// closed, and the PAYED write did not land): the pay order becomes
	// PAYED, nothing is refunded.
	Refunded(o Order) error
}

// ErrBizClosed is Business.Paid's answer for a business order that no
// longer takes a payment.
var ErrBizClosed = errors.New("pay: business order closed")

// ErrBizPaid is Business.Refunded's answer for a business order that took
// the payment already.
var ErrBizPaid = errors.New("pay: business order paid")

// RegisterBusiness routes the paid events of orders of biz to b. Call it
// before the node serves traffic.
func (s *Service) RegisterBusiness(biz string, b Business) {
	s.bizMu.Lock()
	defer s.bizMu.Unlock()
	if s.biz == nil {
		s.biz = map[string]Business{}
	}
	s.biz[biz] = b
}

func (s *Service) business(biz string) Business {
	s.bizMu.RLock()
	defer s.bizMu.RUnlock()
	return s.biz[biz]
}

// NewOrderID returns a new gene-method order id for user (see IDGen), so a
// business's orders and the pay centre's share one id space.
func (s *Service) NewOrderID(user int64) (int64, error) {
	if s.cfg.WorkerHeld != nil && !s.cfg.WorkerHeld() {
		return 0, errors.New("pay: order-id worker lease not held; refusing to make order ids")
	}
	return s.ids.Next(user), nil
}

// OrderIDsAbove makes every id NewOrderID (and CreateOrder) makes from now on
// greater than id: a business whose orders are stored apart from the pay
// orders (tickets paid with coins have none) names its highest at start, so
// a clock set back across a restart cannot make one of its ids again.
func (s *Service) OrderIDsAbove(id int64) { s.ids.notBelow(id) }

// BizOrderReq is a business's request for a provider payment.
type BizOrderReq struct {
	ID        int64 // from NewOrderID: the business order and the pay order share it
	User      int64
	Biz       string // a registered business
	Amount    int64  // cents, as every pay order's (goods priced in coins: × CentsPerCoin)
	Channel   string // "" = mock
	ReqID     string
	ExpiresAt int64 // unix ms: the reconciler closes the pay order after it (0 = OrderTimeout)
}

// CreateBizOrder records a PAYING pay order for a business order, together
// with the business's own records (one durable batch: both exist or
// neither), and returns it with its pay_url.
func (s *Service) CreateBizOrder(r BizOrderReq, extra ...persist.Record) (Order, error) {
	if r.Channel == "" {
		r.Channel = "mock"
	}
	if !KnownChannel(r.Channel) {
		return Order{}, proto.BadRequest("unknown channel (known: mock)")
	}
	if r.Biz == "" || r.Biz == BizCoins || s.business(r.Biz) == nil {
		return Order{}, errors.New("pay: CreateBizOrder of an unregistered business " + r.Biz)
	}
	if err := s.refuseFrozen(r.User); err != nil {
		return Order{}, err
	}
	now := s.cfg.Now().UnixMilli()
	o := Order{OrderID: strconv.FormatInt(r.ID, 10), UserID: r.User, Amount: r.Amount, Channel: r.Channel,
		Biz: r.Biz, Status: StatusPaying, ReqID: r.ReqID, CreatedAt: now, UpdatedAt: now, ExpiresAt: r.ExpiresAt}
	o.PayURL = s.payURL(&o)
	v, _ := proto.Marshal(o)
	err := s.store.Apply(func(b *persist.Batch) error {
		if err := b.Set(orderKey(r.ID), v, nil); err != nil {
			return err
		}
		for _, t := range []persist.Record{
			s.transitionRecord(r.ID, "", StatusPaying, "business "+r.Biz+" order", now),
		} {
			if err := b.Set(t.Key, t.Value, nil); err != nil {
				return err
			}
		}
		for _, e := range extra {
			if err := b.Set(e.Key, e.Value, nil); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return Order{}, err
	}
	s.addOpen(r.ID, o, false)
	return o, nil
}

// CloseBizOrder closes a business's unpaid pay order (PAYING → IN_VALID)
// here only, without asking the provider: the business closed its order
// and could not wait for the provider (a sweep past its AskBudget, or
// whose provider did not answer). A payment that arrives later is refunded
// — also one whose notifies are all lost: the order is closed without the
// provider's word, so the reconciler closes it at the provider after the
// close (rec/payunasked, in the closing batch; reconcileClosed), which
// answers a payment made meanwhile. Closing a closed or settled order
// changes nothing.
func (s *Service) CloseBizOrder(id int64, why string) error {
	defer s.orders.Lock(id)()
	o, open, err := s.openBizOrder(id)
	if !open {
		return err
	}
	return s.moveLocked(&o, id, StatusInvalid, why, unaskedRecord(id))
}

// openBizOrder reads order id; open is false when it is gone (no error
// then) or no longer open.
func (s *Service) openBizOrder(id int64) (o Order, open bool, err error) {
	o, err = s.Get(id)
	if err != nil {
		if proto.AsError(err).Code == proto.CodeNotFound {
			err = nil
		}
		return o, false, err
	}
	return o, OpenStatus(o.Status), nil
}

// CloseBizOrderAtProvider closes a business's unpaid pay order after its
// business closed its own (a buyer's cancel), asking the provider to close
// it first (closeAtProvider, one request of at most QueryTimeout, outside
// every lock): closed there, the pay order is closed for good (IN_VALID,
// nothing left to ask: the buyer can no longer pay it, so no payment can
// escape); already paid there, the payment is applied as its notify would
// be — the business's order closed, a late payment refunded once (as the
// order or not); no answer, it is closed as CloseBizOrder closes it, and
// the reconciler closes it at the provider later (rec/payunasked).
func (s *Service) CloseBizOrderAtProvider(id int64, why string) error {
	o, open, err := s.openBizOrder(id)
	if !open {
		return err
	}
	ev, answer := s.closeAtProvider(o)
	switch answer {
	case queryClosed:
		defer s.orders.Lock(id)()
		cur, err := s.Get(id)
		if err != nil || !OpenStatus(cur.Status) {
			return err
		}
		return s.moveLocked(&cur, id, StatusInvalid, why+" (closed at the provider)", nil)
	case queryPaid:
		s.applyFound(o, id, ev, "pay: payment found by the close of a closed business order")
	}
	return s.CloseBizOrder(id, why) // nothing if the payment settled it
}

// applyFound applies ev, a payment of open order o the provider reported
// (to a query or a close), as its notify would be; one not as the order is
// remembered, to be refunded once the order is closed (rememberMismatch).
// It returns the notify status.
func (s *Service) applyFound(o Order, id int64, ev Event, what string) int {
	st, msg := s.apply(o.Channel, ev)
	if st == NotifyConflict && ev.Amount != o.Amount {
		s.rememberMismatch(id, ev)
	}
	if st != NotifyOK {
		s.cfg.Log.Warn(what, "order", o.OrderID, "status", st, "msg", msg)
	}
	return st
}

// AskBeforeClose asks the provider to close business order id before its
// business closes it unpaid at its deadline (closeAtProvider), as real
// payment systems do: closed there, nobody can pay it any more, so the
// business closes its order with no payment left to escape, and the pay
// order is closed here at once (IN_VALID, nothing left to ask); a payment
// made just before the deadline whose notifies were all lost is found
// before the close, not after it (then only refunded). A payment the
// provider reports is applied as its notify would be: as the order, the
// business takes it (Paid; its order is then not closed); not as the order,
// it is remembered and refunded once the order is closed (rememberMismatch,
// as the reconciler's queries do). closable is false only when the provider
// reports a payment that could not be applied now (a store error, its
// business not registered yet): the business keeps its order open and asks
// again later. answered is false when the provider gave no verified answer:
// the order may close all the same — CloseBizOrder has it closed at the
// provider after the close — and the business need not wait QueryTimeout
// on each of its other due orders.
func (s *Service) AskBeforeClose(id int64) (closable, answered bool) {
	o, err := s.Get(id)
	if err != nil || !OpenStatus(o.Status) {
		return true, true // nothing to ask: CloseBizOrder does what is left
	}
	ev, answer := s.closeAtProvider(o)
	switch answer {
	case queryUnknown:
		return true, false
	case queryClosed:
		// Closed there: ours is closed here now, before its business
		// closes its own (CloseBizOrder then finds it closed). Should the
		// business not close its order (a store error), nothing can pay
		// it meanwhile, and its next sweep closes it.
		unlock := s.orders.Lock(id)
		if cur, err := s.Get(id); err == nil && OpenStatus(cur.Status) {
			if err := s.moveLocked(&cur, id, StatusInvalid, "unpaid timeout (closed at the provider)", nil); err != nil {
				s.cfg.Log.Warn("pay: order closed at the provider not closed here, its business closes it", "order", o.OrderID, "err", err)
			}
		}
		unlock()
		return true, true
	}
	st := s.applyFound(o, id, ev, "pay: payment found before its order's close")
	return st != NotifyRetry, true
}
