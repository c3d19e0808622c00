package redpacket

import (
	"context"
	"encoding/binary"
	"errors"
	"hash/fnv"
	"strconv"
	"strings"
	"time"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// grabKey is the rate-limit key of (user, code): the same on every node
// (Config.SharedGrabs counts it across them). Codes reaching a limit are
// rains' (a made-up code is refused before), so its keys are not chosen
// by clients.
func grabKey(user int64, code string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(code))
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(user))
	_, _ = h.Write(b[:])
	return h.Sum64()
}

// grabRate checks GrabInterval for (user, code) on this node and, with
// Config.SharedGrabs, across the nodes: nil, 10429, or 50000 when Redis
// did not answer (the node's count then given back). A later step that
// fails on a dependency gives the node's count back (Spent.GiveBack).
func (s *Service) grabRate(user int64, code string) (limit.Spent, *proto.Error) {
	return limit.Take(s.grabLimit, s.cfg.SharedGrabs, grabKey(user, code), proto.ErrRateLimited, s.log)
}

// Grab grabs a packet of rain code for user and returns once the grant (with
// the credit) is durable, or refused.
func (s *Service) Grab(user int64, code string) (GrabReply, *proto.Error) {
	var (
		rep GrabReply
		err *proto.Error
	)
	ch := make(chan struct{})
	s.GrabAsync(user, code, func(r GrabReply, e *proto.Error) { rep, err = r, e; close(ch) })
	<-ch
	return rep, err
}

// GrabAsync is Grab calling done with the outcome: on the caller's goroutine
// when it is known at once, else on a wallet goroutine once the grant is
// durable. done must be quick and must not block. The grabber gets biz 5570
// (ack) with the credit.
func (s *Service) GrabAsync(user int64, code string, done func(GrabReply, *proto.Error)) {
	r := s.get(code)
	if r == nil {
		if rec, err := s.loadRecord(code); err == nil && rec.State == StateFinished {
			done(GrabReply{}, errEmpty)
			return
		}
		done(GrabReply{}, errGrabNone)
		return
	}
	r.mu.Lock()
	state, room, ending, endsAt := r.rec.State, r.rec.Room, r.ending, r.rec.EndsAt
	r.mu.Unlock()
	if state == StateWait || state == StatePrepared {
		done(GrabReply{}, errGrabNone)
		return
	}
	if perr := s.roomRefusal(room, user); perr != nil {
		done(GrabReply{}, perr)
		return
	}
	if ending || state == StateFinished {
		done(GrabReply{}, errEmpty)
		return
	}
	spent, perr := s.grabRate(user, code)
	if perr != nil {
		done(GrabReply{}, perr)
		return
	}
	if perr := s.frozen(user); perr != nil {
		done(GrabReply{}, perr)
		return
	}
	pl, perr := s.claim(code, user, endsAt)
	if perr != nil {
		if perr.Code == proto.CodeInternal {
			spent.GiveBack() // Redis did not answer: the node's count back (one_per_user: no shared count)
		}
		done(GrabReply{}, perr)
		return
	}
	r.mu.Lock()
	if r.ending || r.rec.State != StateRunning {
		r.mu.Unlock()
		if pl != nil {
			s.unclaim(pl)
		}
		done(GrabReply{}, errEmpty)
		return
	}
	if s.cfg.OnePerUser && s.cfg.Claim == nil {
		if _, dup := r.users[user]; dup {
			r.mu.Unlock()
			done(GrabReply{}, errTaken)
			return
		}
		if r.users == nil {
			r.users = map[int64]struct{}{}
		}
		r.users[user] = struct{}{}
	}
	r.inflight++
	r.mu.Unlock()

	p, ok, err := s.popFresh(r, code)
	if err == nil && !ok && s.mem != nil {
		// Sharded: take back what other nodes do not use before ending.
		pk, unsure, last := s.takeOrReclaim(r, false, false, time.Now().Add(leaseLimit), func(int) int { return 1 })
		if len(pk) == 1 && !r.take(pk[0].Index) {
			s.log.Error("red packet taken back from a holder was taken here already: not granted again", "code", code, "index", pk[0].Index)
			err = errTakenTwice
		} else if len(pk) == 1 {
			p, ok = pk[0], true
			if last { // nothing unused anywhere now: no grab after this one
				r.mu.Lock()
				r.ending = true
				r.mu.Unlock()
			}
		} else if unsure {
			s.grabFailed(r, pl, user, false, false) // a holder did not answer: not over
			done(GrabReply{}, errUnsure)
			return
		}
	} else if ok && s.mem != nil {
		s.watchEnd(r) // this may have been the last packet anywhere
	}
	if err != nil || !ok {
		s.grabFailed(r, pl, user, !ok && err == nil, false)
		if err != nil {
			s.log.Error("red packet pool", "code", code, "err", err)
			done(GrabReply{}, proto.ErrInternal)
			return
		}
		done(GrabReply{}, errEmpty)
		return
	}
	s.applyGrant(user, code, p, pl.pinned(), func(res persist.Result, err error, op persist.Op) {
		if err != nil {
			if !inDoubt(err) {
				// Nothing moved (the wallet unavailable, or a definite
				// refusal such as the balance's upper bound: kept in doubt,
				// its retry at the end failed the same way and the rain
				// never settled): the packet goes back before the grab
				// counts out (a Redis call for the list pool: not on the
				// ledger's goroutine).
				go func() {
					if s.pushBack(r, code, p) {
						s.reopen(r)
					}
					s.grabFailed(r, pl, user, false, false)
					done(GrabReply{}, proto.ErrInternal)
				}()
				return
			}
			r.mu.Lock()
			r.doubt = append(r.doubt, op)
			r.mu.Unlock()
			s.grabFailed(r, pl, user, false, true)
			done(GrabReply{}, proto.ErrInternal)
			return
		}
		r.mu.Lock()
		r.granted++
		r.amount += p.Amount
		r.maxGrant = max(r.maxGrant, p.Amount)
		r.inflight--
		if r.granted >= r.rec.Count {
			r.ending = true
		}
		settle := r.ending && r.inflight == 0 && !r.settling
		r.settling = r.settling || settle
		r.mu.Unlock()
		done(grabReply(p.Amount), nil)
		if settle {
			s.goSettle(r)
		}
	})
}

// maxStalePops bounds the packets one grab skips because they were taken
// already (see popFresh); past it the grab fails (internal) and the next
// grab goes on skipping.
const maxStalePops = 64

// errTakenTwice: the pool gave only packets this node had taken already.
var errTakenTwice = errors.New("redpacket: the pool yields packets taken already")

// popFresh pops a packet of code that this node has not taken before (see
// rain.taken): a packet the pool yields again — its Redis list rolled back
// by a restart that lost the last pops — is skipped and logged, never
// granted a second time. Packets of the memory pool are never yielded
// twice; the check costs one atomic OR.
func (s *Service) popFresh(r *rain, code string) (Packet, bool, error) {
	for range maxStalePops {
		ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
		p, ok, err := s.pool.Pop(ctx, code)
		cancel()
		if err != nil || !ok || r.take(p.Index) {
			return p, ok, err
		}
		s.log.Error("red packet pool yielded a packet taken already (a Redis list rolled back?): skipped, not granted again", "code", code, "index", p.Index)
	}
	return Packet{}, false, errTakenTwice
}

func grabReply(amount int64) GrabReply {
	return GrabReply{Amount: amount, Msg: "恭喜领取到红包：" + strconv.FormatInt(amount, 10)}
}

// applyGrant grants p of rain code to user: the grant row, the credit and the
// tally in one ledger op, idempotent by (user, "rp:<code>:<index>"), pinned
// to wallet generation gen if set (its one-per-user place's: refused,
// nothing moved, in a generation rebuilt without that place); then done
// (on a ledger goroutine: quick, never blocking) with the op to apply again
// if its outcome is in doubt (unpinned: its place is rebuilt from the
// grants in doubt, InDoubtClaims, and a retry of an op that may have run
// must replay) and, if the credit is new, biz 5570 to the grabber. A packet
// whose grant failed is not put back (the outcome may be unknown); the
// settlement refunds whatever has no durable grant.
func (s *Service) applyGrant(user int64, code string, p Packet, gen string, done func(persist.Result, error, persist.Op)) {
	gb, _ := proto.Marshal(grant{User: user, Amount: p.Amount, At: s.cfg.Now().UnixMilli()})
	op := persist.Op{User: user, ReqID: grantReqID(code, p.Index),
		Postings: []persist.Posting{{User: user, Delta: p.Amount, Reason: persist.ReasonRedPacket, Ref: "redpacket " + code}},
		Tallies:  []persist.Tally{{Name: TallyGrabbed, User: user, Delta: p.Amount}},
		Static:   []persist.Record{storeRecord(grantKey(code, p.Index), gb)},
	}
	first := op
	first.Gen = gen
	s.wallet.ApplyAsync(first, func(res persist.Result, err error) {
		if err != nil {
			s.log.Error("red packet grant not recorded", "code", code, "index", p.Index, "user", user, "err", err)
		}
		done(res, err, op)
		if err == nil && !res.Replayed {
			s.creditPush(op, res)
		}
	})
}

// creditPush sends biz 5570 for op, a grant or a refund whose credit res
// moved (the op's first posting).
func (s *Service) creditPush(op persist.Op, res persist.Result) {
	if len(op.Postings) == 0 || len(res.Balances) == 0 || op.Postings[0].Delta <= 0 {
		return
	}
	p := op.Postings[0]
	d, _ := proto.Marshal(CreditPush{Balance: res.Balances[0], Delta: p.Delta, Reason: p.Reason})
	s.router.SendUser(p.User, proto.Push{Biz: proto.BizWalletCredit, Data: d, Ack: true})
}

// onSettled sends the 5570 of a grant or refund of this service answered in
// doubt (or not answered, before a restart: AtOpen) that the wallet then
// found ran.
func (s *Service) onSettled(st persist.Settled) {
	if !st.Ran || !(strings.HasPrefix(st.ReqID, "rp:") || strings.HasPrefix(st.ReqID, "rp-end:")) {
		return
	}
	s.creditPush(persist.Op{Postings: st.Postings}, st.Result)
}

// grabFailed undoes a grab's reservation (pl: its shared place, if any);
// empty: the pool had nothing left, so the rain ends; keepUser: the grant
// may still land, so the user keeps their one-per-user place.
func (s *Service) grabFailed(r *rain, pl *place, user int64, empty, keepUser bool) {
	if s.cfg.OnePerUser && !keepUser {
		if s.cfg.Claim != nil {
			if pl != nil {
				s.unclaim(pl) // never blocks: this may run on a ledger goroutine
			}
		} else {
			r.mu.Lock()
			delete(r.users, user)
			r.mu.Unlock()
		}
	}
	s.finishInflight(r, empty)
}

// pushBack returns p, popped by a grab the wallet refused as unavailable
// (nothing moved), to the pool, so it is granted later rather than refunded;
// false if it could not.
func (s *Service) pushBack(r *rain, code string, p Packet) bool {
	ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
	defer cancel()
	r.untake(p.Index) // before it is back: a grab may pop it at once
	if err := s.pool.Push(ctx, code, p); err != nil {
		s.log.Warn("red packet not put back (refunded at the end)", "code", code, "err", err)
		return false
	}
	return true
}

// reopen undoes an ending of r that only said "the pool is empty" (this
// grab took the last packet, or another grab found none while it was out),
// now that a packet is back in the pool. The grab putting it back is still
// in flight, so no settlement has begun; an end for good (time up, a
// settlement begun) stays.
func (s *Service) reopen(r *rain) {
	r.mu.Lock()
	if r.ending && !r.final && !r.settling && r.rec.State == StateRunning && r.granted < r.rec.Count {
		r.ending = false
	}
	r.mu.Unlock()
}
