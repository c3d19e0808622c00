package ticket

import (
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Closing unpaid orders: by the buyer (Cancel) or the timeout sweep.

// Cancel cancels user's PENDING_PAY order id and releases its seats. An
// order already CANCELLED or REFUNDED (a retried cancel whose answer was
// lost — a cancel that found a payment made before it answers REFUNDED —
// or the timeout first) is answered as it is, nothing done again; PAID →
// 40002.
func (s *Service) Cancel(user, id int64) (Order, error) {
	o, err := s.close(id, user, "cancelled by the buyer", false)
	if err != nil {
		return Order{}, err
	}
	return *o, nil
}

// close moves order id from PENDING_PAY to CANCELLED (closeLocked under
// the order's lock), then closes its pay order — after the order's lock:
// the lock order is pay → ticket; a cancel's at the provider too
// (CloseBizOrderAtProvider: a payment the buyer makes after it is refused
// there; one made before it is refunded once). user 0 = the timeout (no
// owner check); onlyExpired refuses an order that is not expired yet (a
// timeout racing a payment).
func (s *Service) close(id, user int64, why string, onlyExpired bool) (*Order, error) {
	unlock := s.orders.Lock(id)
	o, err := s.load1(id)
	if err != nil {
		unlock()
		return nil, err
	}
	if user != 0 && o.UserID != user {
		unlock()
		return nil, proto.Errorf(proto.CodeNotFound, "order not found")
	}
	if user != 0 && (o.Status == StatusCancelled || o.Status == StatusRefunded) {
		// Closed already (a retry, or the timeout first) — REFUNDED is a
		// closed order whose payment came after the close, as a first
		// cancel may answer it: its retry gets the same, not 40002.
		unlock()
		return o, nil
	}
	if o.Status != StatusPendingPay {
		unlock()
		if user == 0 {
			s.unpend(id)
		}
		return nil, proto.Errorf(proto.CodeOrderState, "order is %s: only PENDING_PAY orders can be cancelled", o.Status)
	}
	if onlyExpired && s.cfg.Now().UnixMilli() < o.ExpiresAt {
		unlock()
		return o, nil
	}
	err = s.closeLocked(o, why, !onlyExpired) // the sweep gives coupons back after it has closed every due order
	unlock()
	if err != nil {
		return nil, err
	}
	if user == 0 {
		s.m.closed.WithLabelValues("timeout").Inc()
	} else {
		s.m.closed.WithLabelValues("cancel").Inc()
	}
	if !onlyExpired {
		s.push(o) // a sweep's closes are pushed once their coupons are back (CloseExpired)
	}
	// The pay order: a buyer's cancel has it closed at the provider first
	// (one request, nobody can pay it after); the sweep asked the provider
	// to close it already (askBeforeClose, within its budget: then it is
	// closed), or could not, and leaves that to the pay centre's
	// reconciler (rec/payunasked).
	closePay := s.pay.CloseBizOrder
	if user != 0 {
		closePay = s.pay.CloseBizOrderAtProvider
	}
	if err := closePay(id, why); err != nil {
		// A payment that still lands is refused by Paid (the order is
		// closed) and refunded; pay's reconciler closes the pay order later.
		s.cfg.Log.Warn("ticket: pay order not closed", "order", o.OrderID, "err", err)
	}
	if user != 0 {
		// The buyer is answered the order as it is now: closing at the
		// provider may have found a payment made before the cancel and
		// refunded the order (REFUNDED, not the CANCELLED written above).
		unlock := s.orders.Lock(id)
		cur, err := s.load1(id)
		unlock()
		if err == nil {
			return cur, nil
		}
	}
	return o, nil
}

// closeLocked closes PENDING_PAY order o, with its lock held: CANCELLED
// first (durable), then its seats freed in memory, then its coupon given
// back (a second write). In that order because a coupon store outside
// Pebble (a cluster's Redis) cannot share the order's batch: freed first, a
// crash before the order's write would leave a payable PENDING_PAY order
// whose coupon someone else may take. A give-back that fails (or a crash
// before it) is owed: the order says CouponUsed without CouponBack, and the
// sweep (and the next start) gives it back (settleCoupon). Without
// giveBack it is owed at once: the sweep closes every due order — its seats
// freed — before any coupon waits on a slow coupon store.
func (s *Service) closeLocked(o *Order, why string, giveBack bool) error {
	next := *o
	next.Status, next.Note, next.UpdatedAt = StatusCancelled, why, s.cfg.Now().UnixMilli()
	next.Steps.Released = true
	r := next.record()
	if err := s.store.Put(r.Key, r.Value); err != nil {
		return err
	}
	*o = next
	s.release(o)
	s.unpend(o.id)
	if o.Steps.CouponUsed && !o.Steps.CouponBack {
		if !giveBack {
			s.owe(o.id)
		} else if _, err := s.giveBackCoupon(o); err != nil {
			s.cfg.Log.Warn("ticket: coupon not given back yet, the sweep retries", "order", o.OrderID, "err", err)
			s.owe(o.id)
		}
	}
	return nil
}

// owe records that closed order id still holds its coupon.
func (s *Service) owe(id int64) {
	s.pendMu.Lock()
	s.owed[id] = true
	s.pendMu.Unlock()
}

// settleCoupon gives back the coupon of closed order id if it still holds
// it (an owed give-back).
func (s *Service) settleCoupon(id int64) error {
	defer s.orders.Lock(id)()
	o, err := s.load1(id)
	if err != nil {
		return err
	}
	if (o.Status == StatusCancelled || o.Status == StatusRefunded) && o.Steps.CouponUsed && !o.Steps.CouponBack {
		if _, err := s.giveBackCoupon(o); err != nil {
			return err
		}
	}
	s.pendMu.Lock()
	delete(s.owed, id)
	s.pendMu.Unlock()
	return nil
}

func (s *Service) unpend(id int64) {
	s.pendMu.Lock()
	delete(s.pending, id)
	s.pendMu.Unlock()
}

// CloseExpired closes every PENDING_PAY order past its pay timeout,
// resumes sagas stopped by a storage error and gives back owed coupons; it
// returns how many orders it closed.
func (s *Service) CloseExpired() int {
	now := s.cfg.Now().UnixMilli()
	var due, stuck []int64
	s.pendMu.Lock()
	for id, exp := range s.pending {
		if exp <= now {
			due = append(due, id)
		}
	}
	doubts := 0
	for id := range s.stuck { // in no order: a sweep's share is a random one
		if len(stuck) >= stuckPerSweep {
			break
		}
		if d, ok := s.doubt[id]; ok {
			if d.next > now || doubts >= doubtsPerSweep {
				continue // a debit in doubt, retried later (back-off)
			}
			doubts++
		}
		stuck = append(stuck, id)
	}
	s.pendMu.Unlock()
	closed := s.closeDue(due)
	for _, id := range stuck {
		if err := s.resumeStuck(id); err != nil {
			break // the store or the wallet is failing: the rest at a later sweep
		}
	}
	s.settleOwed()
	// Their buyers are told now, their coupons back (unless the coupon
	// store failed: then at a later sweep): one ordering again at once can
	// use the coupon. Each order as it is now, under its lock: a payment
	// that landed meanwhile made it REFUNDED and pushed that — an older
	// CANCELLED must not follow it.
	for _, id := range closed {
		s.pushIfCancelled(id)
	}
	return len(closed)
}

// closeWorkers close due orders at once: each close is two fsynced writes,
// which the store group-commits only when they come together (a flash
// sale's unpaid orders fall due within seconds of each other: one by one,
// 10,000 of them took tens of seconds to give their seats back).
const closeWorkers = 16

// closeDue closes the due orders (unpaid past their timeout), closeWorkers
// at a time, and returns those it cancelled.
func (s *Service) closeDue(due []int64) []int64 {
	var (
		mu     sync.Mutex
		closed []int64
		wg     sync.WaitGroup
	)
	ask := asking{until: s.cfg.Now().Add(s.cfg.AskBudget)}
	next := make(chan int64)
	for range min(closeWorkers, len(due)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range next {
				if !s.askBeforeClose(id, &ask) {
					continue // paid, says the provider, not applied yet: next sweep
				}
				o, err := s.close(id, 0, "unpaid timeout", true)
				switch {
				case err == nil && o.Status == StatusCancelled:
					mu.Lock()
					closed = append(closed, id)
					mu.Unlock()
				case err != nil && proto.AsError(err).Code != proto.CodeOrderState:
					s.cfg.Log.Error("ticket: close expired order", "order", id, "err", err)
				}
			}
		}()
	}
	for _, id := range due {
		next <- id
	}
	close(next)
	wg.Wait()
	if n := ask.skipped.Load(); n > 0 {
		s.cfg.Log.Warn("ticket: due orders not closed at the provider before their close, closed there after it",
			"orders", n, "unanswered", ask.unanswered.Load(), "budget", s.cfg.AskBudget)
	}
	return closed
}

// asking is one sweep's asking the provider to close its due orders
// (askBeforeClose). It stops when a close goes unanswered (the provider is
// down or slow: each of the rest would wait its QueryTimeout) or at until
// (AskBudget: a provider that answers slowly would hold the sweep
// orders/closeWorkers × its latency, every due order's seats locked
// meanwhile); the rest close here without asking — the pay centre's
// reconciler closes them at the provider after their close
// (rec/payunasked). A close started before until may end after it: a sweep
// asks for at most AskBudget plus one request's time (≤ QueryTimeout).
type asking struct {
	until      time.Time
	stopped    atomic.Bool
	unanswered atomic.Bool  // stopped by a query unanswered (else by until)
	skipped    atomic.Int64 // orders that would have been asked
}

// askBeforeClose has the pay centre close due order id's pay order at the
// provider before the sweep closes it (pay.Service.AskBeforeClose): closed
// there, its buyer can no longer pay it — no payment can come after the
// seats are released (the pay order is closed then, nothing left to ask);
// a payment made before the deadline whose notifies were all lost is
// answered instead, and applied as its notify would have been — the order
// sold (Paid), not closed — instead of being found (if ever) after the
// close. false: the provider reports a payment not applied yet, the order
// stays open until the next sweep. The order is read without its lock:
// close decides under it.
func (s *Service) askBeforeClose(id int64, ask *asking) bool {
	o, err := s.load1(id)
	if err != nil || o.Status != StatusPendingPay || o.Pay != PayMock || s.cfg.Now().UnixMilli() < o.ExpiresAt {
		return true
	}
	if ask.stopped.Load() || !s.cfg.Now().Before(ask.until) {
		ask.stopped.Store(true)
		ask.skipped.Add(1)
		return true
	}
	closable, answered := s.pay.AskBeforeClose(id)
	if !answered {
		ask.unanswered.Store(true)
		ask.stopped.Store(true)
	}
	return closable
}

// pushIfCancelled pushes order id's status to its buyer if it is still
// CANCELLED.
func (s *Service) pushIfCancelled(id int64) {
	defer s.orders.Lock(id)()
	if o, err := s.load1(id); err == nil && o.Status == StatusCancelled {
		s.push(o)
	}
}

// settleOwed gives back the coupons closed orders still hold (at start and
// each sweep), stopping at the first failure: the coupon store is failing
// (Redis down or hanging, each call waiting for its timeout), and the rest
// wait for the next sweep rather than hold this one — or the start — for
// minutes.
func (s *Service) settleOwed() {
	s.pendMu.Lock()
	owed := slices.Collect(maps.Keys(s.owed))
	s.pendMu.Unlock()
	for i, id := range owed {
		if err := s.settleCoupon(id); err != nil {
			s.cfg.Log.Error("ticket: give an owed coupon back; the others next sweep", "order", id, "left", len(owed)-i-1, "err", err)
			return
		}
	}
}

func (s *Service) loop() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.CloseExpired()
		}
	}
}
