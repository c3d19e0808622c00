package gift

import (
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// Limits of a gift request.
const (
	MaxCount    = 99
	MaxReqIDLen = 64
	// TallyReceived is the persist tally of gift value a user received.
	TallyReceived = "recv"
)

// Req is the d of a gift frame.
type Req struct {
	RoomID     int64  `json:"room_id"`
	GiftID     int64  `json:"gift_id"`
	ReceiverID int64  `json:"receiver_id"`
	Count      int    `json:"count"`
	ReqID      string `json:"req_id"`
	PK         bool   `json:"pk,omitempty"` // extension: count towards the room's PK score
}

// Validate checks the shape of the request (not the business rules).
func (r *Req) Validate() *proto.Error {
	switch {
	case r.RoomID <= 0:
		return proto.BadRequest("missing or bad field room_id")
	case r.GiftID <= 0:
		return proto.BadRequest("missing or bad field gift_id")
	case r.ReceiverID <= 0:
		return proto.BadRequest("missing or bad field receiver_id")
	case r.Count < 1 || r.Count > MaxCount:
		return proto.BadRequest("count must be 1..%d", MaxCount)
	case r.ReqID == "" || len(r.ReqID) > MaxReqIDLen:
		return proto.BadRequest("req_id must be 1..%d bytes", MaxReqIDLen)
	}
	return nil
}

// Reply is the d of a successful gift reply.
type Reply struct {
	OrderID string `json:"order_id"`
	Balance int64  `json:"balance"`
}

// AppendJSON encodes r as Marshal would (proto.JSONAppender).
func (r Reply) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"order_id":`...)
	dst = proto.AppendString(dst, r.OrderID)
	dst = append(dst, `,"balance":`...)
	dst = strconv.AppendInt(dst, r.Balance, 10)
	return append(dst, '}')
}

// EffectPush is the d of biz 5556.
type EffectPush struct {
	From      int64  `json:"from"`
	To        int64  `json:"to"`
	GiftID    int64  `json:"gift_id"`
	Count     int    `json:"count"`
	EffectURL string `json:"effect_url"`
	Combo     int    `json:"combo,omitempty"` // extension: gifts merged into this effect
	OrderID   string `json:"order_id,omitempty"`
}

// AppendJSON encodes e as Marshal would (proto.JSONAppender).
func (e *EffectPush) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"from":`...)
	dst = strconv.AppendInt(dst, e.From, 10)
	dst = append(dst, `,"to":`...)
	dst = strconv.AppendInt(dst, e.To, 10)
	dst = append(dst, `,"gift_id":`...)
	dst = strconv.AppendInt(dst, e.GiftID, 10)
	dst = append(dst, `,"count":`...)
	dst = strconv.AppendInt(dst, int64(e.Count), 10)
	dst = append(dst, `,"effect_url":`...)
	dst = proto.AppendString(dst, e.EffectURL)
	if e.Combo != 0 {
		dst = append(dst, `,"combo":`...)
		dst = strconv.AppendInt(dst, int64(e.Combo), 10)
	}
	if e.OrderID != "" {
		dst = append(dst, `,"order_id":`...)
		dst = proto.AppendString(dst, e.OrderID)
	}
	return append(dst, '}')
}

// encode is e as the d of a push.
func (e *EffectPush) encode() []byte { return e.AppendJSON(make([]byte, 0, 128+len(e.EffectURL))) }

// FailedPush is the d of biz 5557.
type FailedPush struct {
	ReqID string `json:"req_id"`
	Code  int    `json:"code"`
	Msg   string `json:"msg"`
}

// Scorer receives PK gifts (the PK service); nil = PK off.
type Scorer interface {
	// Enter returns the contest room is in and the wallet tally that keeps
	// its score (ok false: none), and counts a PK gift in flight until leave
	// is called (its debit answered): the contest's end waits for it. A PK
	// gift's op adds its value to that tally, atomically with the debit.
	Enter(room int64) (contest, tally string, leave func(), ok bool)
	// AddScore adds a durable PK gift to contest's running score.
	AddScore(room int64, contest string, amount int64)
}

// Receivers decides who may receive a gift in a room. A gift to anyone else
// is refused with 10003 before anything is debited. The node's
// implementation (gateway) accepts the room's anchor and users joined to the
// room (in a cluster on any live node; a presence it could not read is an
// error: 50000 "retry").
type Receivers interface {
	// CanReceive reports whether user may receive a gift in room; an
	// error: it could not tell (a cluster's presence unread) — the gift is
	// refused 50000 "retry", nothing moved.
	CanReceive(room, user int64) (bool, error)
}

// Config configures Service.
type Config struct {
	// Receivers checks gift receivers (nil = no check: for tests and
	// benchmarks of the debit path only; the node always sets one).
	Receivers Receivers
	PerSecond int // gifts per user per second (0 = no limit)
	// SharedRate, if set, counts PerSecond across a cluster's nodes (one
	// Redis call per gift that is not a duplicate, in op.Check: set it only
	// with a wallet whose Check may block — the shared wallet runs each op
	// on a goroutine of its own).
	SharedRate   *limit.Shared
	EffectWindow time.Duration // combo merging window of room effects (0 = 100 ms)
	// RoomEffectsPerSecond paces a room's effect pushes: at most this many
	// a second, the longest-waiting first, the rest merging while they wait
	// (0 = no cap).
	RoomEffectsPerSecond int
}

// AttemptFactor: a sender's gift requests reach the wallet at most this many
// times Config.PerSecond a second (per node); beyond it they are answered
// 10429 at once — "retry with the same req_id", since such a request may be
// the retry of a gift that went through (whose retry then replays it) — and
// without a 5557 push (nothing is known to have failed). A gift this node
// answered in doubt is never refused so.
const AttemptFactor = 4

// Service sends gifts. Safe for concurrent use; Send blocks until the debit
// is durable (or refused) and never on pushes.
type Service struct {
	wallet persist.Wallet
	router router.Router
	cat    *Catalogue
	limit  *limit.Keyed
	shared *limit.Shared // the limit across a cluster (nil: off)
	// attempts bounds a sender's gift requests that reach the wallet at all
	// (AttemptFactor × PerSecond a second on this node): the rules and the
	// rate are checked only after the wallet claimed the req_id — with a
	// shared wallet two Redis scripts for a refused gift — so without it a
	// flood of fresh req_ids (not in the room, over the rate) was never
	// refused before costing them.
	attempts *limit.Keyed
	effects  *effects
	log      *slog.Logger
	scorer   Scorer
	recv     Receivers

	accounts Accounts // frozen accounts (SetAccounts); nil = none

	// doubted are the gifts (sender, req_id) answered 10409 because their
	// own debit's outcome is unknown (persist.ErrInDoubt — not a
	// duplicate's "in progress", whose first request sends the effects):
	// the debit may land without an answer here, and its retry is then a
	// replay — whose effects are owed, not sent "the first time". Bounded
	// (an LRU); the value is what that request debited for.
	doubtMu  sync.Mutex
	doubted  *simplelru.LRU[doubtKey, owedGift]
	nDoubted atomic.Int32 // doubted's length: the hot path skips the lock when 0
	// settledEarly are outcomes the wallet told (onSettled) before the
	// gift's answer in doubt was remembered (the watcher may settle an op
	// between Apply's return and the callback that calls doubt).
	settledEarly *simplelru.LRU[doubtKey, persist.Settled]
}

// doubtKey is a gift answered in doubt.
type doubtKey struct {
	sender int64
	reqID  string
}

// owedGift is a gift answered in doubt: its effect, room, amount and PK
// contest ("" = none) — a retry with the same req_id replays that debit,
// whatever the retry's own fields say.
type owedGift struct {
	ev      EffectPush
	room    int64
	amount  int64
	contest string
}

// maxDoubted bounds the gifts remembered as answered in doubt — above the
// shared wallet's bound on the ops it waits to settle (each such gift is
// one, and its settle or replay forgets it), so none is evicted while its
// effects are owed; maxSettledEarly the outcomes told before their gift was.
const (
	maxDoubted      = 10_000
	maxSettledEarly = 1_000
)

var _ = [maxDoubted - persist.DefaultMaxUnsettled]struct{}{} // maxDoubted ≥ the wallet's bound

// New returns a gift service.
func New(w persist.Wallet, r router.Router, cat *Catalogue, cfg Config, log *slog.Logger) *Service {
	if cfg.EffectWindow <= 0 {
		cfg.EffectWindow = 100 * time.Millisecond
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Service{wallet: w, router: r, cat: cat, log: log, recv: cfg.Receivers,
		limit: limit.New(cfg.PerSecond, time.Second, max(1, cfg.PerSecond), nil), shared: cfg.SharedRate,
		attempts: limit.New(AttemptFactor*cfg.PerSecond, time.Second, AttemptFactor*max(1, cfg.PerSecond), nil)}
	s.effects = newEffects(r, cfg.EffectWindow, cfg.RoomEffectsPerSecond)
	s.doubted, _ = simplelru.NewLRU[doubtKey, owedGift](maxDoubted, nil)
	s.settledEarly, _ = simplelru.NewLRU[doubtKey, persist.Settled](maxSettledEarly, nil)
	if n, ok := w.(persist.SettleNotifier); ok {
		n.OnSettled(s.onSettled)
	}
	return s
}

// doubt remembers that gift k was answered in doubt — or, if the wallet
// told its outcome already, sends what it owes now. The first request's
// entry is kept (a later one replays what that one debited).
func (s *Service) doubt(k doubtKey, g owedGift) {
	s.doubtMu.Lock()
	st, early := s.settledEarly.Peek(k)
	if early {
		s.settledEarly.Remove(k)
	} else if !s.doubted.Contains(k) {
		s.doubted.Add(k, g)
		s.nDoubted.Store(int32(s.doubted.Len()))
	}
	s.doubtMu.Unlock()
	if early && st.Ran && len(st.Result.TradeIDs) > 0 {
		s.sendEffects(strconv.FormatInt(st.Result.TradeIDs[0], 10), g)
	}
}

// isDoubted reports whether gift k was answered in doubt here and is not
// settled yet.
func (s *Service) isDoubted(k doubtKey) bool {
	if s.nDoubted.Load() == 0 {
		return false
	}
	s.doubtMu.Lock()
	defer s.doubtMu.Unlock()
	return s.doubted.Contains(k)
}

// owed reports and forgets whether gift k, which succeeded, was answered in
// doubt, and what it debited for then.
func (s *Service) owed(k doubtKey) (g owedGift, was bool) {
	if s.nDoubted.Load() == 0 {
		return g, false
	}
	s.doubtMu.Lock()
	defer s.doubtMu.Unlock()
	return s.takeOwedLocked(k)
}

// takeOwedLocked removes and returns gift k's owed entry (s.doubtMu held).
func (s *Service) takeOwedLocked(k doubtKey) (g owedGift, was bool) {
	g, was = s.doubted.Peek(k)
	if was {
		s.doubted.Remove(k)
		s.nDoubted.Store(int32(s.doubted.Len()))
	}
	return g, was
}

// SetScorer connects the PK service.
func (s *Service) SetScorer(sc Scorer) { s.scorer = sc }

// SetWallet replaces the wallet gifts are debited from. For diagnostics and
// tests only (the gift benchmark measures the node with a wallet that does no
// work); call it before the node serves gifts.
func (s *Service) SetWallet(w persist.Wallet) { s.wallet = w }

// Catalogue returns the catalogue.
func (s *Service) Catalogue() *Catalogue { return s.cat }

// Send performs a gift from sender, who must be in r.RoomID (inRoom), and
// returns once the debit is durable (or refused). On failure the sender also
// gets a reliable biz 5557.
func (s *Service) Send(sender int64, inRoom bool, r Req) (Reply, *proto.Error) {
	var (
		rep Reply
		err *proto.Error
	)
	ch := make(chan struct{})
	s.SendAsync(sender, inRoom, r, func(r Reply, e *proto.Error) { rep, err = r, e; close(ch) })
	<-ch
	return rep, err
}

// SendAsync is Send calling done with the outcome instead of returning it:
// on the caller's goroutine when it is known at once, else on a wallet
// goroutine once the debit is durable. done must be quick and not block.
func (s *Service) SendAsync(sender int64, inRoom bool, r Req, done func(Reply, *proto.Error)) {
	s.send(sender, inRoom, r, func(rep Reply, err *sendErr) {
		if err == nil {
			done(rep, nil)
			return
		}
		if !err.quiet {
			d, _ := proto.Marshal(FailedPush{ReqID: r.ReqID, Code: err.Code, Msg: err.Msg})
			s.router.SendUser(sender, proto.Push{Biz: proto.BizGiftFailed, Room: r.RoomID, Data: d, Ack: true})
		}
		done(rep, &err.Error)
	})
}

type sendErr struct {
	proto.Error
	// quiet: no biz 5557 — the failure was told the first time (a replayed
	// answer), or nothing failed yet (the first request is still in progress).
	quiet bool
}

func fail(code int, msg string) *sendErr {
	return &sendErr{Error: proto.Error{Code: code, Msg: msg}}
}

// Ref is the trade reference of a gift: what was given to whom, where. The
// trade row is the gift's durable record; its id is the gift's order id.
func Ref(room, gift int64, count int, receiver int64, pk bool) string {
	b := make([]byte, 0, 64)
	b = append(b, "gift "...)
	b = strconv.AppendInt(b, gift, 10)
	b = append(b, " x"...)
	b = strconv.AppendInt(b, int64(count), 10)
	b = append(b, " to "...)
	b = strconv.AppendInt(b, receiver, 10)
	b = append(b, " in room "...)
	b = strconv.AppendInt(b, room, 10)
	if pk {
		b = append(b, " pk"...)
	}
	return string(b)
}

func (s *Service) send(sender int64, inRoom bool, r Req, done func(Reply, *sendErr)) {
	// The attempts' rate first: a gift to oneself is refused (with its
	// 5557) no more often than any other.
	if s.attempts != nil && !s.attempts.Allow(uint64(sender)) && !s.isDoubted(doubtKey{sender, r.ReqID}) {
		e := fail(proto.CodeRateLimited, "too many gift requests, slow down; retry with the same req_id")
		e.quiet = true
		done(Reply{}, e)
		return
	}
	if r.ReceiverID == sender {
		done(Reply{}, fail(proto.CodeGiftToSelf, "cannot send a gift to yourself"))
		return
	}
	g, ok := s.cat.Get(r.GiftID)
	if !ok {
		// Not in this node's catalogue (removed, or not loaded here yet):
		// refused by Check below — only if the req_id is new. A retry of a
		// gift debited through another node replays its result; refused
		// here at once it was told "failed, nothing moved" and paid again
		// under a new req_id.
		g = Gift{ID: r.GiftID, Status: StatusDisabled}
	}
	amount := g.Price * int64(r.Count)
	var contest string
	var spent limit.Spent // the rate event, given back when nothing was debited
	var leave func()      // the PK gift's exit from its contest's in-flight count
	op := persist.Op{
		User:  sender,
		ReqID: "gift:" + r.ReqID,
		Postings: []persist.Posting{{User: sender, Delta: -amount, Reason: persist.ReasonGift,
			Ref: Ref(r.RoomID, g.ID, r.Count, r.ReceiverID, r.PK)}},
		Tallies: []persist.Tally{{Name: TallyReceived, User: r.ReceiverID, Delta: amount}},
		// The rules that can change between a request and its retry (who is
		// in the room, the gift's status, frozen accounts, the rate) are
		// checked only for a request that is not a duplicate: a retry of a
		// gift that went through replays its result, it is never refused
		// with "nothing moved" while the first debit stands.
		Check: func() error {
			if !inRoom {
				return refusal{fail(proto.CodeForbidden, "not in room")}
			}
			if s.recv != nil {
				switch ok, err := s.recv.CanReceive(r.RoomID, r.ReceiverID); {
				case err != nil:
					s.log.Debug("gift: room members unread", "room", r.RoomID, "receiver", r.ReceiverID, "err", err)
					return refusal{fail(proto.CodeInternal, "the room's members could not be read, nothing moved; retry with the same req_id")}
				case !ok:
					return refusal{fail(proto.CodeForbidden, "receiver is not the room's anchor or in the room")}
				}
			}
			// Read now, right before the debit (not only at arrival: the
			// request may have waited — a wallet slot, a duplicate's first,
			// the claim — while an admin disabled or repriced the gift; a
			// gift unknown here at arrival is refused so too).
			if now, ok := s.cat.Get(g.ID); !ok || now.Status != StatusEnabled {
				return refusal{fail(proto.CodeGiftUnavailable, "gift not found or disabled")}
			} else if now.Price != g.Price {
				// A definite refusal (with its 5557), not 10409's "retry with
				// the same req_id": the sender sees the new price and sends
				// anew if they still want it.
				return refusal{fail(proto.CodeGiftPriceChanged, "the gift's price changed meanwhile, nothing was debited")}
			}
			if err := s.checkFrozen(sender, r.ReceiverID); err != nil {
				return refusal{err}
			}
			var perr *proto.Error
			switch spent, perr = limit.Take(s.limit, s.shared, uint64(sender), proto.ErrRateLimited, s.log); {
			case perr == proto.ErrRateLimited:
				return errRateLimited
			case perr != nil: // Redis did not answer: nothing moved, retry
				return refusal{fail(perr.Code, perr.Msg)}
			}
			return nil
		},
	}
	if r.PK && inRoom && s.scorer != nil { // (not in the room: refused by Check; no lookup of a client-chosen room)
		if id, tally, l, ok := s.scorer.Enter(r.RoomID); ok {
			contest, leave = id, l
			op.Tallies = append(op.Tallies, persist.Tally{Name: tally, User: r.RoomID, Delta: amount})
		}
	}
	s.wallet.ApplyAsync(op, func(res persist.Result, err error) {
		if leave != nil {
			defer leave() // after its score was added (sendEffects), or its failure
		}
		if err != nil {
			e := fail(proto.CodeInternal, "internal error")
			var refused refusal
			switch {
			case errors.As(err, &refused): // op.Check
				e = refused.e
			case errors.Is(err, persist.ErrInsufficient):
				e = fail(proto.CodeInsufficientBalance, "insufficient balance")
			case errors.Is(err, persist.ErrBalanceLimit): // an amount past the wallet's bound; nothing moved
				e = fail(proto.CodeBadRequest, "amount out of range")
			case errors.Is(err, errRateLimited):
				e = fail(proto.CodeRateLimited, "too many gifts, slow down")
			case errors.Is(err, persist.ErrWalletUnavailable):
				e = fail(proto.CodeInternal, "wallet temporarily unavailable, nothing was debited; retry with the same req_id")
				spent.GiveBack() // an outage spends none of the sender's rate
			case errors.Is(err, persist.ErrInProgress):
				e = fail(proto.CodeConflict, "a gift with this req_id is still being processed; retry with the same req_id")
			default:
				s.log.Error("gift debit failed", "sender", sender, "req_id", r.ReqID, "err", err)
			}
			e.quiet = res.Replayed || errors.Is(err, persist.ErrInProgress)
			if errors.Is(err, persist.ErrInDoubt) {
				s.doubt(doubtKey{sender, r.ReqID}, owedGift{room: r.RoomID, amount: amount, contest: contest,
					ev: EffectPush{From: sender, To: r.ReceiverID, GiftID: g.ID, Count: r.Count, EffectURL: g.SvgaURL}})
			}
			done(Reply{}, e)
			return
		}
		orderID := strconv.FormatInt(res.TradeIDs[0], 10)
		rep := Reply{OrderID: orderID, Balance: res.Balances[0]}
		first, owed := s.owed(doubtKey{sender, r.ReqID})
		switch {
		case res.Replayed && !owed:
			// Effects went out the first time (or when the wallet settled
			// a gift answered in doubt: onSettled).
		case res.Replayed:
			// The replay of a gift answered in doubt here, whose debit
			// landed later: its effects were never sent (those of the first
			// request, which the replayed debit paid for).
			s.sendEffects(orderID, first)
		default:
			s.sendEffects(orderID, owedGift{room: r.RoomID, amount: amount, contest: contest,
				ev: EffectPush{From: sender, To: r.ReceiverID, GiftID: g.ID, Count: r.Count, EffectURL: g.SvgaURL}})
		}
		done(rep, nil)
	})
}

// sendEffects sends the effects of gift g, debited as orderID: the
// receiver's push, the room's effect, its PK score.
func (s *Service) sendEffects(orderID string, g owedGift) {
	ev := g.ev
	ev.OrderID = orderID
	s.router.SendUser(ev.To, proto.Push{Biz: proto.BizGift, Room: g.room, Data: ev.encode(), Ack: true})
	s.effects.add(g.room, ev)
	if g.contest != "" {
		s.scorer.AddScore(g.room, g.contest, g.amount)
	}
}

// onSettled is told by the wallet the outcome of a debit it answered in
// doubt: a gift whose debit landed gets its effects now, not at a retry that
// may never come; one that did not land owes nothing.
func (s *Service) onSettled(st persist.Settled) {
	req, ok := strings.CutPrefix(st.ReqID, "gift:")
	if !ok {
		return
	}
	if st.AtOpen {
		// Settled when this node started: nothing in memory owes for it.
		if g, id, ok := s.rebuild(st); ok {
			s.sendEffects(id, g)
		}
		return
	}
	k := doubtKey{st.User, req}
	s.doubtMu.Lock()
	g, owed := s.takeOwedLocked(k)
	if !owed {
		s.settledEarly.Add(k, st) // its answer in doubt is on its way
	}
	s.doubtMu.Unlock()
	if owed && st.Ran && len(st.Result.TradeIDs) > 0 {
		s.sendEffects(strconv.FormatInt(st.Result.TradeIDs[0], 10), g)
	}
}

// rebuild makes the effects a gift settled at the wallet's start owes from
// its op: the debit's Ref names the gift, count, receiver and room. Not
// its PK score: that is in the op's durable tally, which a contest's end
// takes (and a single node's restore reads) — added live as well, it would
// count twice. False: not a gift's op, or one that did not run.
func (s *Service) rebuild(st persist.Settled) (owedGift, string, bool) {
	if !st.Ran || len(st.Result.TradeIDs) == 0 || len(st.Postings) == 0 || st.Postings[0].Delta >= 0 {
		return owedGift{}, "", false
	}
	gift, count, receiver, room, ok := parseRef(st.Postings[0].Ref)
	if !ok {
		s.log.Warn("gift settled at start: unreadable ref", "ref", st.Postings[0].Ref, "req_id", st.ReqID)
		return owedGift{}, "", false
	}
	g := owedGift{room: room, amount: -st.Postings[0].Delta,
		ev: EffectPush{From: st.User, To: receiver, GiftID: gift, Count: count}}
	if c, ok := s.cat.Get(gift); ok {
		g.ev.EffectURL = c.SvgaURL
	}
	return g, strconv.FormatInt(st.Result.TradeIDs[0], 10), true
}

// parseRef reads a Ref back: "gift G xN to R in room M[ pk]".
func parseRef(ref string) (gift int64, count int, receiver, room int64, ok bool) {
	f := strings.Fields(ref)
	if len(f) < 8 || f[0] != "gift" || f[3] != "to" || f[5] != "in" || f[6] != "room" || !strings.HasPrefix(f[2], "x") {
		return 0, 0, 0, 0, false
	}
	var e [4]error
	gift, e[0] = strconv.ParseInt(f[1], 10, 64)
	count, e[1] = strconv.Atoi(f[2][1:])
	receiver, e[2] = strconv.ParseInt(f[4], 10, 64)
	room, e[3] = strconv.ParseInt(f[7], 10, 64)
	return gift, count, receiver, room, errors.Join(e[:]...) == nil
}

var errRateLimited = errors.New("gift: rate limited")

// refusal carries a gift's refusal by op.Check through the wallet.
type refusal struct{ e *sendErr }

func (r refusal) Error() string { return r.e.Msg }

// effects is the per-room effect queue: gifts of one sender, gift and
// receiver are merged into one push (a combo) while they wait, in
// first-arrival order. The debit reply never waits for it.
//
// A room's effect pushes are paced at perSecond: every tick (the merging
// window, or 1/perSecond when that is longer) the room sends the effects
// that have waited longest, up to its share of the tick; the rest wait and
// keep merging. A storm of distinct senders thus reaches viewers as a steady
// stream of combos (a few pushes per tick), never as a burst of every
// sender at once, and no gift is lost from the display: its count is in the
// combo. A room holds at most maxEffectKeys waiting effects; each new one
// beyond that sends the oldest at once.
type effects struct {
	router router.Router
	tick   time.Duration
	quota  int // effects a room sends per tick; 0 = all (no cap)

	mu    sync.Mutex
	rooms map[int64]*roomEffects // rooms with effects waiting (each has its tick scheduled)
	out   map[int64]*roomOut     // rooms whose effects are being published
}

// roomOut is a room's effects taken from the queue and not yet published:
// one caller publishes them (in the order taken) while the others — a tick,
// an add past the bound, a stop's flush — append and go on, so a room's
// effects reach the router in the order they left its queue.
type roomOut struct {
	q    []*EffectPush
	done chan struct{} // closed when q is drained
}

type roomEffects struct {
	order []effectKey // waiting, by first arrival
	acc   map[effectKey]*EffectPush
}

type effectKey struct {
	from, to, gift int64
}

// maxEffectKeys bounds a room's waiting effects.
const maxEffectKeys = 1024

func newEffects(r router.Router, window time.Duration, perSecond int) *effects {
	if window <= 0 {
		window = 100 * time.Millisecond
	}
	e := &effects{router: r, tick: window, rooms: map[int64]*roomEffects{}, out: map[int64]*roomOut{}}
	if perSecond > 0 {
		e.tick = max(window, time.Second/time.Duration(perSecond))
		e.quota = max(1, int(int64(perSecond)*int64(e.tick)/int64(time.Second)))
	}
	return e
}

func (e *effects) add(room int64, ev EffectPush) {
	k := effectKey{ev.From, ev.To, ev.GiftID}
	e.mu.Lock()
	re, ok := e.rooms[room]
	if !ok {
		re = &roomEffects{acc: map[effectKey]*EffectPush{}}
		e.rooms[room] = re
		time.AfterFunc(e.tick, func() { e.flush(room) })
	}
	if acc, ok := re.acc[k]; ok {
		acc.Count += ev.Count
		acc.Combo++
		acc.OrderID = ev.OrderID
		e.mu.Unlock()
		return
	}
	ev.Combo = 1
	re.acc[k] = &ev
	re.order = append(re.order, k)
	if len(re.order) > maxEffectKeys {
		e.send(room, re.take(1))
		return
	}
	e.mu.Unlock()
}

// take removes the n effects that waited longest and returns them: no
// longer in the room's map, they are the caller's alone (encoded outside
// e.mu, which every room's gifts share). Under e.mu.
func (re *roomEffects) take(n int) []*EffectPush {
	out := make([]*EffectPush, n)
	for i, k := range re.order[:n] {
		out[i] = re.acc[k]
		delete(re.acc, k)
	}
	re.order = re.order[:copy(re.order, re.order[n:])]
	return out
}

// send publishes batch, taken from room's queue, after what the room has
// taken before it; called with e.mu held, which it releases. When another
// caller is publishing the room's effects it appends batch for that caller
// and returns at once, with a channel closed once they are all published;
// otherwise it publishes them itself and returns nil.
func (e *effects) send(room int64, batch []*EffectPush) <-chan struct{} {
	if o := e.out[room]; o != nil {
		o.q = append(o.q, batch...)
		e.mu.Unlock()
		return o.done
	}
	if len(batch) == 0 {
		e.mu.Unlock()
		return nil
	}
	o := &roomOut{q: batch, done: make(chan struct{})}
	e.out[room] = o
	e.drain(room, o)
	return nil
}

// drain publishes o's queue — and what is appended meanwhile — in order
// (encoded and pushed outside e.mu, which every room's gifts share), then
// drops it; called with e.mu held by the caller that registered o, which
// it releases.
func (e *effects) drain(room int64, o *roomOut) {
	for len(o.q) > 0 {
		q := o.q
		o.q = nil
		e.mu.Unlock()
		for _, ev := range q {
			_, _ = e.router.PublishRoom(room, proto.Push{Biz: proto.BizGift, Data: ev.encode()})
		}
		e.mu.Lock()
	}
	delete(e.out, room)
	close(o.done)
	e.mu.Unlock()
}

// flushAll sends every room's waiting effects at once, unpaced (a node
// stopping: its rooms' viewers on other nodes still see them), and returns
// once they and what ticks took before are published. Every room's batch
// is registered for publishing in the same hold of e.mu as the rooms are
// taken, so an effect added meanwhile (a new queue, ticked while this
// publishes another room) goes out behind the room's older ones.
func (e *effects) flushAll() {
	e.mu.Lock()
	rooms := e.rooms
	e.rooms = map[int64]*roomEffects{} // the rooms' ticks find nothing left
	own := map[int64]*roomOut{}        // registered here: published by this call
	var wait []chan struct{}
	for _, o := range e.out { // published by ticks: appended to below, or waited for
		wait = append(wait, o.done)
	}
	for room, re := range rooms {
		batch := re.take(len(re.order))
		switch o := e.out[room]; {
		case o != nil:
			o.q = append(o.q, batch...)
		case len(batch) > 0:
			own[room] = &roomOut{q: batch, done: make(chan struct{})}
			e.out[room] = own[room]
		}
	}
	e.mu.Unlock()
	for room, o := range own {
		e.mu.Lock()
		e.drain(room, o)
	}
	for _, done := range wait {
		<-done
	}
}

// FlushEffects sends the room effects still waiting for their pace, at
// once: call it when the node stops, after the last gift was answered and
// before the router closes — a gift answered ok is not missing from its
// room's display on the other nodes.
func (s *Service) FlushEffects() { s.effects.flushAll() }

// flush is a room's tick: it sends the room's share of its waiting effects
// and schedules the next tick while any are left.
func (e *effects) flush(room int64) {
	e.mu.Lock()
	re := e.rooms[room]
	if re == nil {
		e.mu.Unlock()
		return
	}
	n := len(re.order)
	if e.quota > 0 {
		n = min(n, e.quota)
	}
	batch := re.take(n)
	if len(re.order) == 0 {
		delete(e.rooms, room)
	} else {
		time.AfterFunc(e.tick, func() { e.flush(room) })
	}
	e.send(room, batch)
}
