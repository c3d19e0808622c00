package redpacket

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// end stops grabs of r (its time is up); it settles once no grab is in flight.
func (s *Service) end(r *rain) {
	r.mu.Lock()
	if r.rec.State != StateRunning || r.settling {
		r.mu.Unlock()
		return
	}
	r.ending, r.final = true, true
	if r.timer != nil {
		r.timer.Stop()
	}
	settle := r.inflight == 0
	r.settling = settle
	r.mu.Unlock()
	if settle {
		s.goSettle(r)
	}
}

// goSettle runs settle on a goroutine of its own (never on a ledger
// committer: settle waits for the ledger). After Close it does nothing: the
// next start of the node settles.
func (s *Service) goSettle(r *rain) { s.spawn(func() { s.settle(r) }) }

// spawn runs fn on a goroutine that Close waits for (settles); after Close
// it does nothing (what fn would finish, the next start finds again).
func (s *Service) spawn(fn func()) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.settles.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.settles.Done()
		fn()
	}()
}

// settle ends r exactly once: totals from the durable grants, the unclaimed
// rest refunded to the anchor in the same ledger op that marks the rain
// FINISHED (idempotent by "rp-end:<code>"), then biz 5561 to the room and
// biz 5570 to the anchor.
func (s *Service) settle(r *rain) {
	r.mu.Lock()
	r.final = true
	rec, doubt := r.rec, r.doubt
	r.mu.Unlock()
	var err error
	for len(doubt) > 0 && err == nil {
		if err = s.applyDoubtful(doubt[0]); err == nil {
			doubt = doubt[1:]
		}
	}
	r.mu.Lock()
	r.doubt = doubt
	r.mu.Unlock()
	var others []NodeSplit
	if err == nil && s.mem != nil {
		others, err = s.closeHolders(r)
	}
	var fin record
	if err == nil {
		fin, err = s.settleOnce(rec, others)
	}
	if err != nil {
		s.log.Error("red packet rain not settled, retrying", "code", rec.Code, "err", err, "retry_in", settleRetry)
		_ = s.runInRoom(rec) // still the room's rain until it is settled
		r.mu.Lock()
		r.settling = false
		r.mu.Unlock()
		s.mu.RLock()
		if !s.closed {
			time.AfterFunc(settleRetry, func() { s.end(r) })
		}
		s.mu.RUnlock()
		return
	}
	r.mu.Lock()
	r.rec = fin
	r.granted, r.amount, r.maxGrant = fin.GrantedCount, fin.GrantedAmount, fin.MaxGrant
	if r.timer != nil {
		r.timer.Stop() // ended early (pool empty): the rain is not kept until ends_at
	}
	r.mu.Unlock()
	s.mu.Lock()
	delete(s.rains, rec.Code)
	s.release(rec.Anchor)
	if s.running[rec.Room] == rec.Code {
		delete(s.running, rec.Room)
	}
	s.mu.Unlock()
	s.roomDone(rec)
	if s.mem != nil {
		// The lease log only rebuilds a running rain's shards (restore);
		// a finished rain's is dead weight. Left by a crash here, it stays
		// unread.
		if err := s.store.DeletePrefixNoSync(leasePrefix(rec.Code)); err != nil {
			s.log.Warn("red packet lease log not deleted", "code", rec.Code, "err", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
	if err := s.pool.Drop(ctx, rec.Code); err != nil {
		s.log.Warn("red packet pool not dropped", "code", rec.Code, "err", err)
	}
	cancel()
	d, _ := proto.Marshal(FinishedPush{Code: rec.Code, GrantedCount: fin.GrantedCount, GrantedAmount: fin.GrantedAmount, Refunded: fin.Refunded})
	if _, err := s.router.PublishRoom(rec.Room, proto.Push{Biz: proto.BizRainFinished, Room: rec.Room, Data: d, Ack: true}); err != nil {
		s.log.Info("rain end not pushed", "code", rec.Code, "room", rec.Room, "err", err)
	}
}

// applyDoubtful applies op, a grant answered in doubt, before its rain
// settles — unless the wallet found since that it ran (its grant row is
// written): then it is not sent again, as its req id's idempotency record
// expires (a day; a settlement retried that long, an owner away that long)
// and it would then credit twice.
func (s *Service) applyDoubtful(op persist.Op) error {
	landed, err := s.store.Has(op.Static[0].Key)
	if err != nil || landed {
		return err
	}
	res, err := s.wallet.Apply(op)
	if err == nil && !res.Replayed { // it runs only now: nothing was sent for it
		s.creditPush(op, res)
	}
	if err != nil && refusedOutright(err) {
		// Refused as new: both wallets look a request's req id up before
		// its rules and the balance (a first attempt that landed would be
		// replayed), and a first attempt cannot land after its retry ran
		// (the ledger: one process, its index rebuilt at the restart a
		// failed commit needs; the shared wallet: the retry's claim and the
		// fence of the resolve that freed it). Not granted: its packet is
		// refunded with the rest. Before, the settlement failed on it for
		// good — the anchor's rest never refunded.
		s.log.Warn("red packet grant in doubt refused on its retry: not granted, refunded with the rest",
			"req_id", op.ReqID, "user", op.User, "err", err)
		return nil
	}
	return err
}

// settleOnce writes the settlement of rec, whose other holders granted
// others, and returns the final record.
func (s *Service) settleOnce(rec record, others []NodeSplit) (record, error) {
	// A retry of a settlement answered in doubt that the wallet found ran
	// since (and wrote its records): its final record is answered, the op
	// never sent again — its req id's idempotency record expires (a day),
	// and the refund would then be paid twice.
	if b, err := s.store.Get(doneKey(rec.Code)); err == nil {
		var fin record
		if err := proto.Unmarshal(b, &fin); err != nil {
			return rec, fmt.Errorf("%w: %w", errNotSent, err)
		}
		if err := s.store.DeleteNoSync(rainKey(rec.Code)); err != nil {
			s.log.Warn("red packet record not moved", "code", rec.Code, "err", err) // restore moves it
		}
		return fin, nil
	} else if !errors.Is(err, persist.ErrNotFound) {
		return rec, fmt.Errorf("%w: %w", errNotSent, err)
	}
	var n int
	var sum, top int64
	err := s.store.Scan(grantPrefix(rec.Code), func(_, v []byte) error {
		var g grant
		if err := proto.Unmarshal(v, &g); err != nil {
			return err
		}
		n++
		sum += g.Amount
		top = max(top, g.Amount)
		return nil
	})
	if err != nil {
		return rec, fmt.Errorf("%w: %w", errNotSent, err)
	}
	var nodes []NodeSplit
	if len(others) > 0 {
		here := rec.Count
		for _, o := range others {
			here -= o.Count
		}
		nodes = append([]NodeSplit{{Node: rec.Node, Count: here, Granted: n, Amount: sum}}, others...)
		for _, o := range others {
			n += o.Granted
			sum += o.Amount
			top = max(top, o.Max)
		}
	}
	if sum > rec.Total { // cannot happen (each index once, Σ split = T): refuse to settle
		return rec, fmt.Errorf("%w: granted more than the total", errNotSent)
	}
	fin := rec
	fin.State, fin.FinishedAt, fin.Pending = StateFinished, s.cfg.Now().UnixMilli(), ""
	fin.GrantedCount, fin.GrantedAmount, fin.MaxGrant, fin.Refunded = n, sum, top, rec.Total-sum
	fin.Nodes = nodes
	b, err := proto.Marshal(fin)
	if err != nil {
		return rec, fmt.Errorf("%w: %w", errNotSent, err)
	}
	op := persist.Op{User: rec.Anchor, ReqID: settleReqID(rec.Code),
		Tallies: []persist.Tally{{Name: TallyGiven, User: rec.Anchor, Delta: sum}},
		// Both: a crash before rec/rp/ is deleted leaves a FINISHED record
		// there, which restore moves.
		Static: []persist.Record{storeRecord(rainKey(rec.Code), b), storeRecord(doneKey(rec.Code), b)},
	}
	if fin.Refunded > 0 {
		op.Postings = []persist.Posting{{User: rec.Anchor, Delta: fin.Refunded, Reason: persist.ReasonRefund,
			Ref: "redpacket " + rec.Code + " unclaimed"}}
	}
	res, err := s.wallet.Apply(op)
	if err != nil {
		return rec, err
	}
	if err := s.store.DeleteNoSync(rainKey(rec.Code)); err != nil {
		s.log.Warn("red packet record not moved", "code", rec.Code, "err", err) // restore moves it
	}
	if fin.Refunded > 0 && !res.Replayed {
		s.creditPush(op, res)
	}
	return fin, nil
}

// moveDone writes the FINISHED record b of code under rec/rpdone/ and
// deletes it from rec/rp/, in batch wb.
func moveDone(wb *persist.Batch, code string, b []byte) error {
	if err := wb.Set(doneKey(code), b, nil); err != nil {
		return err
	}
	return wb.Delete(rainKey(code), nil)
}

// moveBatch bounds one batch of restore's moves.
const moveBatch = 4096

// restore loads the rains that are not FINISHED (see New): rec/rp/ holds
// those — and FINISHED records not moved yet (a crash right after the
// settlement, an older version's, a store from before the move), which it
// moves to rec/rpdone/, so the next start reads the unfinished rains only.
func (s *Service) restore() error {
	var recs, cancels []record
	type moved struct {
		code string
		b    []byte
	}
	var done []moved
	move := func() error {
		err := s.store.Apply(func(wb *persist.Batch) error {
			for _, m := range done {
				if err := moveDone(wb, m.code, m.b); err != nil {
					return err
				}
			}
			return nil
		})
		done = done[:0]
		return err
	}
	err := s.store.Scan(prefixRain, func(k, v []byte) error {
		var rec record
		if err := proto.Unmarshal(v, &rec); err != nil {
			return err
		}
		if rec.State != StateFinished {
			recs = append(recs, rec)
			return nil
		}
		done = append(done, moved{string(k[len(prefixRain):]), bytes.Clone(v)})
		if len(done) == moveBatch {
			return move() // the scan's view is fixed when it starts
		}
		return nil
	})
	if err == nil && len(done) > 0 {
		err = move()
	}
	if err != nil {
		return err
	}
	now := s.cfg.Now().UnixMilli()
	var due, timed []*rain
	for _, rec := range recs {
		r := &rain{rec: rec}
		s.rains[rec.Code] = r
		s.perAnchor[rec.Anchor]++
		switch rec.State {
		case StatePrepared:
			s.prepared[rec.Room] = rec.Code
			if rec.Pending == pendingCancel {
				cancels = append(cancels, rec)
			}
		case StateRunning:
			s.running[rec.Room] = rec.Code
			granted := map[int32]bool{}
			err := s.store.Scan(grantPrefix(rec.Code), func(k, v []byte) error {
				var g grant
				if err := proto.Unmarshal(v, &g); err != nil {
					return err
				}
				granted[int32(binary.BigEndian.Uint32(k[len(k)-4:]))] = true
				r.granted++
				r.amount += g.Amount
				r.maxGrant = max(r.maxGrant, g.Amount)
				if s.cfg.OnePerUser && s.cfg.Claim == nil {
					if r.users == nil {
						r.users = map[int64]struct{}{}
					}
					r.users[g.User] = struct{}{}
				}
				return nil
			})
			if err != nil {
				return err
			}
			if s.mem != nil {
				if err := s.replayLeases(r); err != nil {
					return err
				}
			} else if leased, err := s.hasLeases(rec.Code); err != nil {
				return err
			} else if leased {
				// Its packets were handed out to other nodes (a memory
				// pool in a cluster): without their lease log this node
				// would put those packets back in its pool and never count
				// what the holders granted — more than T paid out.
				return fmt.Errorf("redpacket: rain %s is running with its packets sharded across the cluster (redpacket.pool: memory, cluster on): start this node with that configuration until the rain has ended", rec.Code)
			}
			if err := s.loadPool(r, rec, granted); err != nil {
				return err
			}
			_ = s.runInRoom(rec) // the room's running rain, wherever Redis lost it
			if now >= rec.EndsAt || r.granted >= rec.Count {
				r.ending, r.settling = true, true
				due = append(due, r)
			} else {
				timed = append(timed, r) // its end armed once the maps are filled
			}
			s.log.Info("red packet rain resumed", "code", rec.Code, "granted", r.granted, "of", rec.Count, "due", now >= rec.EndsAt)
		}
	}
	// The rains resumed, taken before anything runs: a due rain's
	// settlement and a timer that fires deletes from s.rains.
	s.mu.Lock()
	resumed := make([]*rain, 0, len(s.rains))
	for _, r := range s.rains {
		resumed = append(resumed, r)
	}
	s.mu.Unlock()
	for _, r := range due {
		s.goSettle(r)
	}
	for _, r := range timed {
		// After the loop above: an end that fires settles the rain, which
		// deletes from the maps the loop fills without the lock.
		r.mu.Lock()
		r.timer = time.AfterFunc(time.Duration(r.rec.EndsAt-s.cfg.Now().UnixMilli())*time.Millisecond, func() { s.end(r) })
		r.mu.Unlock()
	}
	for _, r := range resumed {
		s.watchEnd(r) // a RUNNING rain with everything out: its holders' last asks may have been lost
	}
	for _, rec := range cancels {
		s.goCancel(rec.Anchor, rec.Code)
	}
	return nil
}

// goCancel completes a cancel that was pending when the node stopped (its
// refund may or may not have landed: the same op lands it once), on a
// goroutine of its own, retried after settleRetry, then twice as long each
// time up to cancelRetryMax, until it is done or the service closes: the
// anchor asked for it, and the rain can neither start nor be cancelled
// another way meanwhile.
func (s *Service) goCancel(anchor int64, code string) { s.cancelLoop(anchor, code, settleRetry) }

// cancelRetryMax bounds the wait between two tries of a pending cancel (one
// refused every time — the anchor's balance at its bound — is tried and
// logged that often, not every settleRetry for the process's life).
const cancelRetryMax = 5 * time.Minute

func (s *Service) cancelLoop(anchor int64, code string, wait time.Duration) {
	if r := s.get(code); r != nil {
		r.mu.Lock()
		r.cancelling = true // this loop retries it: Cancel starts no other
		r.mu.Unlock()
	}
	s.spawn(func() {
		if _, err := s.Cancel(anchor, code); err != nil {
			s.log.Warn("red packet pending cancel not completed, retrying", "code", code, "err", err, "retry_in", wait)
			time.AfterFunc(wait, func() { s.cancelLoop(anchor, code, min(2*wait, cancelRetryMax)) })
		}
	})
}

// retryCancel completes a cancel left pending in this process (Cancel) after
// settleRetry, then as goCancel does.
func (s *Service) retryCancel(anchor int64, code string) {
	time.AfterFunc(settleRetry, func() { s.cancelLoop(anchor, code, 2*settleRetry) })
}

// Close stops the rains' timers and waits for settlements in progress. A
// rain left RUNNING resumes (or settles) at the next start. Call it before
// the wallet closes.
func (s *Service) Close() {
	s.mu.Lock()
	first := !s.closed
	s.closed = true
	for _, r := range s.rains {
		r.mu.Lock()
		if r.timer != nil {
			r.timer.Stop()
		}
		r.mu.Unlock()
	}
	s.mu.Unlock()
	if first {
		close(s.quit)
	}
	if s.keepStop != nil {
		if first {
			close(s.keepStop)
		}
		<-s.keepDone
	}
	s.settles.Wait()
}
