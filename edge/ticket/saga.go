package ticket

import (
	"errors"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// The coins saga (docs/tickets.md has the state machine and crash table):
//
//	lock seats → use coupon → debit coins → confirm
//
// Each step's effect and the order record that says it happened are one
// atomic durable write: the seats' lock is the PLACING order record itself;
// the coupon's use is one batch with the order (Steps.CouponUsed); the
// debit is one ledger op carrying the order record (Steps.Debited) as a
// static record. So the durable order alone tells which steps happened, and
// compensation undoes exactly those, in reverse, each guarded by its own
// flag (Steps.Refunded, Steps.CouponBack, Steps.Released) written with its
// effect — repeating a compensation finds its flag set and changes nothing;
// the ledger also refuses a second credit of the same req id.
//
// Named points for tests (Config.Hook):
//
//	fail:lock  fail:coupon  fail:debit  fail:confirm  fail:refund
//	fail:coupon_write (the order's write recording the coupon's use)
//	crash:after_lock  crash:after_coupon  crash:after_debit
//	crash:after_refund  crash:after_coupon_back
//	crash:coupon_unrecorded (the coupon store took the coupon, the order
//	does not say so yet: in a cluster the use is in Redis only)
//
// Start-up recovery of a PLACING order: if only the confirm step is left
// (the coins are debited, or nothing had to be paid), the saga completes
// forward — every step that could fail for a business reason succeeded and
// confirming is a local write; otherwise (a coupon or a debit not yet done)
// it is compensated — nobody is waiting for the answer any more, and the
// steps left could still fail (balance spent meanwhile), so the buyer gets
// everything back rather than a charge made on their behalf after a crash.

func (s *Service) hook(point string) error {
	if s.cfg.Hook == nil {
		return nil
	}
	return s.cfg.Hook(point)
}

// placeCoins runs the saga of a new coins order whose seats are locked in
// memory.
func (s *Service) placeCoins(o *Order) (Order, error) {
	defer s.orders.Lock(o.id)()
	o.Status, o.Saga = StatusPlacing, SagaRunning
	if err := s.hook("fail:lock"); err != nil {
		s.release(o) // nothing durable yet: the in-memory lock is all there is to undo
		return Order{}, err
	}
	if o.CouponID != "" {
		// A coupon store that cannot answer now (Redis unreachable, or
		// rebuilt after a loss) refuses before the order is written: its
		// req_id stays free for the retry. So does a coupon that is not
		// the buyer's, or not there, or used (as placeMockCoupon): no
		// order names a coupon id a client made up or read elsewhere — a
		// rebuild marks the coupon of every cancelled order (Contribute).
		if c, err := s.cstore.Get(o.CouponID); err != nil || c.UserID != o.UserID || c.UsedBy != "" {
			s.release(o)
			if err == nil || proto.AsError(err).Code == proto.CodeCouponUnusable {
				err = errCouponUnusable
			}
			return Order{}, err
		}
	}
	recs := []persist.Record{{Key: orderReqKey(o.UserID, o.ReqID), Value: persist.EncodeUint64(uint64(o.id))}, o.record()}
	if err := s.store.Apply(func(b *persist.Batch) error { return setAll(b, recs) }); err != nil {
		s.release(o)
		return Order{}, err
	}
	_ = s.hook("crash:after_lock")
	return s.forward(o)
}

// forward runs the steps of o not done yet, with o's lock held; a failed
// step compensates.
func (s *Service) forward(o *Order) (Order, error) {
	if o.CouponID != "" && !o.Steps.CouponUsed {
		if err := s.hook("fail:coupon"); err != nil {
			return s.compensate(o, err)
		}
		if err := s.useCoupon(o); err != nil {
			return s.compensate(o, err)
		}
		_ = s.hook("crash:after_coupon")
	}
	if o.Amount > 0 && !o.Steps.Debited {
		if err := s.hook("fail:debit"); err != nil {
			return s.compensate(o, err)
		}
		err := s.debit(o)
		if s.debitDoubtful(o.id, err) {
			// The wallet cannot tell yet whether the debit landed (the
			// shared wallet lost the script's reply, or could not write
			// its share: its watcher settles the op later, writing the
			// order record with Debited). Neither on nor back now — an undo
			// would refund nothing, and the late record would revive the
			// order over its CANCELLED one. The order stays PLACING, its
			// seats and coupon held; the sweep applies the same op again
			// until the answer is definite (recoverSaga).
			s.cfg.Log.Warn("ticket: debit outcome unknown, the sweep retries it", "order", o.OrderID, "err", err)
			return Order{}, errSettling
		}
		if err != nil {
			return s.compensate(o, err)
		}
		_ = s.hook("crash:after_debit")
	}
	if err := s.hook("fail:confirm"); err != nil {
		return s.compensate(o, err)
	}
	next := *o
	next.Status, next.Saga, next.UpdatedAt = StatusPaid, SagaDone, s.cfg.Now().UnixMilli()
	r := next.record()
	if err := s.store.Put(r.Key, r.Value); err != nil {
		return s.compensate(o, err)
	}
	*o = next
	s.inv.Sell(o.ProgramID, o.id, o.seats)
	s.push(o)
	return *o, nil
}

// useCoupon marks o's coupon used by o and o's step done: one batch with
// the coupon's record on a single node; in a cluster the coupon is taken in
// Redis first, and a crash before the order's write leaves a use only the
// store knows of — undone by the compensation, which asks the store who
// holds the coupon (giveBackCoupon).
func (s *Service) useCoupon(o *Order) error {
	return s.cstore.Use(o.CouponID, o.UserID, o.OrderID, func(c Coupon, recs []persist.Record) error {
		_ = s.hook("crash:coupon_unrecorded")
		if err := s.hook("fail:coupon_write"); err != nil {
			return err
		}
		next := *o
		next.Steps.CouponUsed = true
		next.Discount = min(c.Amount, o.Total)
		next.Amount = o.Total - next.Discount
		next.UpdatedAt = s.cfg.Now().UnixMilli()
		recs = append(recs, next.record())
		if err := s.store.Apply(func(b *persist.Batch) error { return setAll(b, recs) }); err != nil {
			return err
		}
		*o = next
		return nil
	})
}

// debit takes o.Amount coins from the buyer: one ledger op (req id
// "ticket:<order>", exactly once) that also writes o with Steps.Debited.
func (s *Service) debit(o *Order) error {
	next := *o
	next.Steps.Debited = true
	next.UpdatedAt = s.cfg.Now().UnixMilli()
	_, err := s.wallet.Apply(persist.Op{User: o.UserID, ReqID: "ticket:" + o.OrderID,
		Postings: []persist.Posting{{User: o.UserID, Delta: -o.Amount, Reason: ReasonTicket, Ref: "ticket order " + o.OrderID}},
		Static:   []persist.Record{next.record()}})
	if errors.Is(err, persist.ErrInsufficient) {
		return proto.Errorf(proto.CodeInsufficientBalance, "insufficient balance")
	}
	if err != nil {
		return err
	}
	*o = next
	return nil
}

// errSettling answers a saga stopped by an internal failure: its outcome
// comes later (compensated, or completed once a debit in doubt is known).
var errSettling = &proto.Error{Code: proto.CodeInternal, Msg: "internal error: the order is being settled; retry with the same req_id for its final state"}

// errUndone is the final answer of a saga that an internal failure stopped,
// once it is undone: the order's failure from then on, so that a retry
// with the same req_id — which errSettling asks for — gets an answer that
// ends, not errSettling again.
var errUndone = &proto.Error{Code: proto.CodeOrderState, Msg: "the order stopped on an internal error and was undone, nothing taken; place it again with a new req_id"}

// finalFailure is the answer a compensated order gives for good: its
// failed step's error, or errUndone for an internal one (also for orders
// an older version recorded with errSettling).
func finalFailure(code int, msg string) *proto.Error {
	if code == proto.CodeInternal {
		return errUndone
	}
	return &proto.Error{Code: code, Msg: msg}
}

// compensate undoes what o's saga did, with o's lock held, and answers the
// failed step's error. What happened is read back from Pebble (a step whose
// call failed may or may not have written: its durable flag is the truth).
func (s *Service) compensate(o *Order, cause error) (Order, error) {
	e := proto.AsError(cause)
	if e.Code == proto.CodeInternal {
		s.cfg.Log.Error("ticket: saga step failed", "order", o.OrderID, "err", cause)
		e = errSettling
	}
	cur, err := s.load1(o.id)
	if err != nil {
		s.markStuck(o.id)
		return Order{}, errSettling
	}
	cur.Saga, cur.FailCode, cur.FailMsg, cur.UpdatedAt = SagaCompensating, e.Code, e.Msg, s.cfg.Now().UnixMilli()
	r := cur.record()
	if err := s.store.Put(r.Key, r.Value); err != nil {
		s.markStuck(o.id)
		return Order{}, errSettling
	}
	if err := s.undo(cur); err != nil {
		s.cfg.Log.Error("ticket: compensation stopped, the sweep resumes it", "order", o.OrderID, "err", err)
		s.markStuck(o.id)
	}
	*o = *cur
	if cur.Saga == SagaCompensated {
		return Order{}, finalFailure(cur.FailCode, cur.FailMsg) // undone: its final answer
	}
	// Not undone yet (the sweep resumes it): not the failed step's error,
	// whatever it was — "insufficient balance" says every earlier step is
	// undone, while the seats and the coupon are still held.
	return Order{}, errSettling
}

// undo runs the compensations of a COMPENSATING order not done yet, in
// reverse order of the steps, with its lock held. Each is guarded by its
// durable flag, so running undo again (a retry, a restart) changes nothing
// already undone.
func (s *Service) undo(o *Order) error {
	if o.Steps.Debited && !o.Steps.Refunded {
		if err := s.hook("fail:refund"); err != nil {
			return err
		}
		next := *o
		next.Steps.Refunded = true
		next.UpdatedAt = s.cfg.Now().UnixMilli()
		_, err := s.wallet.Apply(persist.Op{User: o.UserID, ReqID: "ticket-refund:" + o.OrderID,
			Postings: []persist.Posting{{User: o.UserID, Delta: o.Amount, Reason: persist.ReasonRefund, Ref: "ticket order " + o.OrderID + " undone"}},
			Static:   []persist.Record{next.record()}})
		if err != nil {
			return err
		}
		*o = next
		s.m.compensations.WithLabelValues("refund").Inc()
		_ = s.hook("crash:after_refund")
	}
	// Also when the order does not record a use: a use the store made
	// but the order never recorded (a crash or a failed write in between)
	// is found by asking the store who holds the coupon.
	if o.CouponID != "" && !o.Steps.CouponBack {
		if err := s.hook("fail:coupon_back"); err != nil {
			return err
		}
		did, err := s.giveBackCoupon(o)
		if err != nil {
			return err
		}
		if did {
			s.m.compensations.WithLabelValues("coupon").Inc()
			_ = s.hook("crash:after_coupon_back")
		}
	}
	next := *o
	next.Status, next.Saga, next.UpdatedAt = StatusCancelled, SagaCompensated, s.cfg.Now().UnixMilli()
	next.Steps.Released = true
	if f := finalFailure(next.FailCode, next.FailMsg); next.FailCode != 0 {
		next.FailCode, next.FailMsg = f.Code, f.Msg
	}
	r := next.record()
	if err := s.store.Put(r.Key, r.Value); err != nil {
		return err
	}
	*o = next
	s.release(o)
	s.m.compensations.WithLabelValues("seats").Inc()
	s.unstuck(o.id)
	s.push(o)
	return nil
}

// recoverSaga settles a PLACING order found at start-up or left by a
// storage error (see the package comment above for forward vs back).
func (s *Service) recoverSaga(id int64) error {
	defer s.orders.Lock(id)()
	o, err := s.load1(id)
	if err != nil {
		return err
	}
	if o.Status != StatusPlacing {
		s.unstuck(id)
		return nil
	}
	switch {
	case o.Saga == SagaCompensating:
		return s.undo(o)
	case o.Pay == PayMock:
		// A provider order with a coupon, stopped between its PLACING record
		// and its PENDING_PAY batch: the coupon may be held, nothing is paid.
		return notSettled(s.compensate(o, errInterrupted))
	case (o.CouponID == "" || o.Steps.CouponUsed) && (o.Amount == 0 || o.Steps.Debited || s.debitInDoubt(id)):
		// Every step done — or the debit in doubt: the same op again
		// (applied at most once) says whether it landed, and the saga goes
		// on, or back if it is refused.
		s.clearInProgress(id)
		_, err := s.forward(o)
		if err == nil {
			s.unstuck(id)
		}
		// A failed confirm compensates (or is marked stuck) inside forward.
		if s.answeredInProgress(id) {
			// This retry of the debit in doubt was answered "in progress"
			// (at once: the wallet's first op still unsettled): retried
			// with its back-off, not a failing store — the sweep goes on
			// to the others.
			return nil
		}
		return notSettled(Order{}, err)
	default:
		return notSettled(s.compensate(o, errInterrupted))
	}
}

var errInterrupted = proto.Errorf(proto.CodeOrderState,
	"the order was interrupted (a restart, or a step that failed) and undone; place it again with a new req_id")

// errNotSettled: a recovered saga is neither through nor undone (a step or
// a compensation failed: the store, the wallet or the coupon store); it is
// marked stuck, the sweep resumes it.
var errNotSettled = errors.New("ticket: saga not settled, the sweep resumes it")

// notSettled is errNotSettled when a saga's answer says it is still being
// settled (errSettling), else nil: through, or undone with its final answer.
func notSettled(_ Order, err error) error {
	if err == errSettling { //nolint:errorlint // the sentinel itself, never wrapped
		return errNotSettled
	}
	return nil
}

func (s *Service) markStuck(id int64) {
	s.pendMu.Lock()
	s.stuck[id] = true
	s.pendMu.Unlock()
}

func (s *Service) unstuck(id int64) {
	s.pendMu.Lock()
	delete(s.stuck, id)
	delete(s.doubt, id)
	s.pendMu.Unlock()
}

// doubt is a debit in doubt's retry schedule.
type doubt struct {
	next int64         // unix ms: the sweep retries it from then
	wait time.Duration // the back-off after the next retry
	// inProgress: the last retry's answer was the wallet's "in progress"
	// (at once: its first op still unsettled), not a failure that took
	// the call's timeout (recoverSaga).
	inProgress bool
}

// Back-off of a debit in doubt's retries (each can hold the sweep up to the
// wallet's call timeout), and at most this many retried per sweep.
const (
	doubtWaitMin   = 2 * time.Second
	doubtWaitMax   = time.Minute
	doubtsPerSweep = 16
	// stuckPerSweep bounds the stuck sagas (in doubt or not) one sweep
	// resumes; it stops at the first that fails again (its store or
	// wallet is failing: each would wait for a timeout).
	stuckPerSweep = 32
)

func (s *Service) debitInDoubt(id int64) bool {
	s.pendMu.Lock()
	defer s.pendMu.Unlock()
	_, ok := s.doubt[id]
	return ok
}

// debitDoubtful records the outcome err of order id's debit and reports
// whether it is (still) in doubt: the wallet's ErrInProgress; and, for a
// debit already in doubt, any answer but the balance's refusal — a retry
// that failed (Redis still unreachable, say) says nothing about the first
// attempt, which may still land, whereas "insufficient" is final (the
// wallet checks the request id before the balance: the first attempt never
// ran). A definite answer ends the doubt.
func (s *Service) debitDoubtful(id int64, err error) bool {
	s.pendMu.Lock()
	defer s.pendMu.Unlock()
	d, was := s.doubt[id]
	// A first attempt is in doubt only if the wallet says its own op may
	// have landed (ErrInDoubt; a plain ErrInProgress then is a wallet that
	// refuses everything — a single-node ledger after a failed commit —
	// nothing reserved: this order's req id is used by no other call).
	doubtful := errors.Is(err, persist.ErrInDoubt)
	if was {
		doubtful = errors.Is(err, persist.ErrInProgress) || err != nil && proto.AsError(err).Code != proto.CodeInsufficientBalance
	}
	if !doubtful {
		delete(s.doubt, id)
		return false
	}
	d.wait = min(max(2*d.wait, doubtWaitMin), doubtWaitMax)
	d.next = s.cfg.Now().Add(d.wait).UnixMilli()
	d.inProgress = errors.Is(err, persist.ErrInProgress)
	s.doubt[id] = d
	s.stuck[id] = true
	return true
}

// clearInProgress forgets the last debit retry's "in progress" answer of
// order id (before another retry: answeredInProgress then tells that one's).
func (s *Service) clearInProgress(id int64) {
	s.pendMu.Lock()
	defer s.pendMu.Unlock()
	if d, ok := s.doubt[id]; ok {
		d.inProgress = false
		s.doubt[id] = d
	}
}

// answeredInProgress reports whether order id's debit is in doubt and its
// last retry was answered "in progress".
func (s *Service) answeredInProgress(id int64) bool {
	s.pendMu.Lock()
	defer s.pendMu.Unlock()
	d, ok := s.doubt[id]
	return ok && d.inProgress
}

// resumeStuck retries the settlement of a saga a storage error stopped.
func (s *Service) resumeStuck(id int64) error {
	err := s.recoverSaga(id)
	if err != nil {
		s.cfg.Log.Error("ticket: resume saga", "order", id, "err", err)
	}
	return err
}
