package redpacket

import (
	"context"
	"encoding/binary"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// A sharded rain (Config.Peers set: a cluster with the memory pool) keeps
// its packets in the memory of every node whose viewers grab, not only of
// the node that owns it.
//
// The owner (the node that created the rain: its split and its record are
// in the owner's Pebble) keeps the remainder of the pool. A node that serves
// a grab for a rain it does not own — a holder — leases a slice of packets
// from the owner (LeaseReq, one NATS round trip per slice, not per grab) and
// grants from it locally: the grant row and the grabber's credit are one
// ledger op in the holder's own Pebble, exactly as on the owner. When the
// holder's slice runs low it leases more; when the owner's remainder is empty
// it takes back half of every other holder's unused packets (Reclaim) before
// answering "none left", so no packet is stranded on a node whose viewers
// stopped grabbing while viewers elsewhere still grab.
//
// Every hand-over is durable on the owner before it takes effect: a lease
// is written to the owner's lease log (rec/rplease/<code>/<seq>, fsynced)
// before the packets leave, and a return before the packets go back into
// its pool, so after a restart the owner rebuilds its remainder as the split
// minus its own grants minus what is out with holders — an index is never
// in two places. A holder keeps its slice in memory only: if it restarts,
// or a lease (or reclaim) answer is lost on the way, the owner finds those
// packets missing there in a reclaim round (recoverFrom: the holder names
// every index it has or durably granted, and drops any lease answer it
// asked for before that) and pools them again; while it is down they stay
// "out" (refunded if the rain ends first).
//
// Settlement stays on the owner and happens once: at the end it closes every
// holder (Close: no more grabs there, grabs in flight completed, doubtful
// grants applied again) and takes the holder's totals from the holder's
// durable grants; the refund is T minus the durable grants of all nodes. A
// holder that is down is waited for (retried every settleRetry): its slice
// is settled from what it durably granted, never guessed.

// Peers carries a sharded rain's requests to other nodes.
type Peers interface {
	// Lease asks owner for packets of a rain (holder → owner).
	Lease(ctx context.Context, owner string, req LeaseReq) (LeaseRep, error)
	// Reclaim asks holder to give back unused packets (owner → holder).
	Reclaim(ctx context.Context, holder string, req ReclaimReq) (ReclaimRep, error)
	// Close ends a rain on holder and returns its durable totals (owner →
	// holder).
	Close(ctx context.Context, holder, code string) (ShardTotals, error)
	// Recover asks holder which packets of a rain it has: those it received
	// and did not give back, and those it durably granted (owner → holder).
	Recover(ctx context.Context, holder string, req RecoverReq) (RecoverRep, error)
}

// LeaseReq asks the owner of Code for packets for node Node (Meta: only the
// rain's room and end, so the holder checks its grabber against its own
// members — just-joined ones included — before it takes packets). Granted,
// Amount and Max are the holder's totals so far (shown by GET while the rain
// runs).
type LeaseReq struct {
	Code    string `json:"code"`
	Node    string `json:"node"`
	Meta    bool   `json:"meta,omitempty"`
	Granted int    `json:"granted"`
	Amount  int64  `json:"amount"`
	Max     int64  `json:"max"`  // the largest grant so far
	Free    int    `json:"free"` // unused packets the holder still has (a lease ahead)
	// BudgetMS is how long the holder waits for the answer: a lease that
	// cannot be handed over within it (from its arrival) is not made, so no
	// packets go out to a holder that has given up.
	BudgetMS int64 `json:"budget_ms"`
}

// LeaseRep is a lease: the rain's room and end, and the packets now held by
// the asking node.
type LeaseRep struct {
	Room   int64 `json:"room"`
	EndsAt int64 `json:"ends_at"`
	// LeftMS is the time the rain has left when the owner answers: the
	// holder ends it by its own clock from this, not from EndsAt (another
	// machine's clock).
	LeftMS  int64    `json:"left_ms"`
	Packets []Packet `json:"packets"`
}

// ReclaimReq asks a holder for at most Max of its unused packets of Code.
type ReclaimReq struct {
	Code string `json:"code"`
	Max  int    `json:"max"`
}

// ReclaimRep is a holder's answer to a ReclaimReq: the packets it gives back,
// how many unused ones it still has (Left) and how many it holds in all
// (Held: received in lease answers and not given back — granted, being
// granted or unused). Held below what the owner has leased to it means a
// lease answer is still on its way there.
type ReclaimRep struct {
	Packets []Packet
	Left    int
	Held    int // −1: not known (a holder of an older version)
}

// RecoverReq asks a holder which of the Count packets of Code it has.
type RecoverReq struct {
	Code  string `json:"code"`
	Count int    `json:"count"`
}

// RecoverRep is a holder's answer to a RecoverReq: Has is a bitmap over the
// rain's indexes (bit i of byte i/8: index i is in this node's slice, being
// granted, or durably granted here — by this process or an earlier one);
// Held is ReclaimRep.Held at the same moment.
type RecoverRep struct {
	Has  []byte `json:"has"`
	Held int    `json:"held"`
}

// ShardTotals are a holder's durable grants of a rain.
type ShardTotals struct {
	Count  int   `json:"count"`
	Amount int64 `json:"amount"`
	Max    int64 `json:"max"`
}

const (
	maxLease     = 256                    // packets in one lease
	leaseLimit   = 2 * time.Second        // one lease call (holder → owner)
	reclaimLimit = 500 * time.Millisecond // one reclaim call (owner → holder): well inside a lease's budget
	recoverLimit = 500 * time.Millisecond // one recover call (owner → holder)
	closeWait    = 3 * time.Second        // a holder's grabs in flight at close
	tombstoneTTL = 10 * time.Minute       // a closed shard is remembered this long
	maxHolders   = 4096                   // nodes one rain leases to (where is a uint16)
	// recoverQuiet: a holder is asked what it has (recoverFrom) only this
	// long after the last lease answer built for it, when that answer has
	// arrived or its ask timed out (an answer still on its way when asked
	// is dropped there: safe, but needless); until then a holder short of
	// what was leased to it is lagging.
	recoverQuiet = leaseLimit + 250*time.Millisecond
)

var (
	errOwnerGone = proto.Errorf(proto.CodeInternal, "the red packet's node is unreachable, retry")
	// errUnsure: no packet here or back from the holders, but a holder did
	// not answer: the rain goes on (it ends at ends_at at the latest).
	errUnsure = proto.Errorf(proto.CodeInternal, "red packets may still be held by another node that did not answer in time, retry")
)

// holder is a node the owner leased packets to.
type holder struct {
	node    string
	out     int       // packets leased and not returned (granted ones included)
	granted int       // last reported
	amount  int64     // last reported
	top     int64     // last reported
	sentAt  time.Time // when the last lease to it was answered
	leases  uint64    // lease answers built for it (a recovery compares it before and after)
	// recovers counts the recoveries asked of it (each moves its fence: a
	// lease it asked for before one is dropped there, so ServeLease keeps
	// the packets of such a lease instead of sending them).
	recovers uint64
	// base: packets out with it that an earlier process of that node
	// durably granted — out, but never in its Held again (recoverFrom).
	base      int
	noRecover bool // an older node: it cannot tell which packets it has
}

// missing is how many packets out with h it does not hold by its report
// held (ReclaimRep.Held; −1, unknown: none).
func (h *holder) missing(held int) int {
	if held < 0 {
		return 0
	}
	return h.out - held - h.base
}

// leaseLog is one hand-over (rec/rplease/<code>/<seq>): Idx went to Node, or
// came back from it (Back).
type leaseLog struct {
	Node string  `json:"node"`
	Back bool    `json:"back,omitempty"`
	Idx  []int32 `json:"idx"`
}

var prefixLease = []byte("rec/rplease/")

func leasePrefix(code string) []byte {
	return append(append(append([]byte{}, prefixLease...), code...), '/')
}

// holderOf returns the index of node among r.holders, adding it (r.mu held).
func (r *rain) holderOf(node string) int {
	for i, h := range r.holders {
		if h.node == node {
			return i
		}
	}
	r.holders = append(r.holders, &holder{node: node})
	return len(r.holders) - 1
}

// logLease writes one hand-over durably (fsynced) before it takes effect.
func (s *Service) logLease(r *rain, node string, back bool, pk []Packet) error {
	l := leaseLog{Node: node, Back: back, Idx: make([]int32, len(pk))}
	for i, p := range pk {
		l.Idx[i] = p.Index
	}
	b, err := proto.Marshal(l)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.logSeq++
	key := binary.BigEndian.AppendUint32(leasePrefix(r.rec.Code), r.logSeq)
	r.mu.Unlock()
	return s.store.Put(key, b)
}

// replayLeases restores r's holders and where each index is (restore).
// hasLeases reports whether rain code's lease log has a row: some of its
// packets were handed to another node.
func (s *Service) hasLeases(code string) (bool, error) {
	p := leasePrefix(code)
	found := false
	err := s.store.ScanRange(p, persist.PrefixEnd(p), func(_, _ []byte) (bool, error) {
		found = true
		return false, nil
	})
	return found, err
}

func (s *Service) replayLeases(r *rain) error {
	r.where = make([]uint16, r.rec.Count)
	err := s.store.Scan(leasePrefix(r.rec.Code), func(k, v []byte) error {
		var l leaseLog
		if err := proto.Unmarshal(v, &l); err != nil {
			return err
		}
		r.logSeq = max(r.logSeq, binary.BigEndian.Uint32(k[len(k)-4:]))
		hi := r.holderOf(l.Node)
		for _, i := range l.Idx {
			if i < 0 || int(i) >= len(r.where) {
				return errors.New("redpacket: corrupt lease log")
			}
			if l.Back {
				r.where[i] = 0
				r.holders[hi].out--
			} else {
				r.where[i] = uint16(hi + 1)
				r.holders[hi].out++
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	// An answer of the process before this restart may still be on its
	// way to a holder: recoverFrom waits for it as for any other.
	for _, h := range r.holders {
		h.sentAt = time.Now()
	}
	return nil
}

// leaseSize is how many packets one lease takes from a remainder of left:
// a share small enough that the other nodes (and the owner's own viewers)
// still find packets, at least one.
func leaseSize(left, holders int) int {
	return max(1, min(maxLease, left/(2*(holders+2))))
}

// ServeLease answers a holder's LeaseReq (on the owner), received at
// arrived.
func (s *Service) ServeLease(req LeaseReq, arrived time.Time) (LeaseRep, error) {
	r := s.get(req.Code)
	if r == nil || s.mem == nil || req.Node == "" || req.Node == s.cfg.Node {
		if rec, err := s.loadRecord(req.Code); err == nil && rec.State == StateFinished {
			return LeaseRep{}, errEmpty
		}
		return LeaseRep{}, errGrabNone
	}
	r.mu.Lock()
	rec, ending := r.rec, r.ending
	r.mu.Unlock()
	left := time.Until(time.UnixMilli(rec.EndsAt)).Milliseconds()
	switch {
	case rec.State == StateWait || rec.State == StatePrepared:
		return LeaseRep{}, errGrabNone
	case ending || rec.State != StateRunning:
		return LeaseRep{}, errEmpty
	case req.Meta:
		return LeaseRep{Room: rec.Room, EndsAt: rec.EndsAt, LeftMS: left}, nil
	}
	r.mu.Lock()
	if r.ending || r.rec.State != StateRunning {
		r.mu.Unlock()
		return LeaseRep{}, errEmpty
	}
	hi := r.holderOf(req.Node)
	if hi >= maxHolders {
		r.holders = r.holders[:maxHolders]
		r.mu.Unlock()
		return LeaseRep{}, errUnsure
	}
	r.inflight++ // settlement waits for this lease
	r.lastAsk = arrived
	h := r.holders[hi]
	h.granted, h.amount, h.top = max(h.granted, req.Granted), max(h.amount, req.Amount), max(h.top, req.Max)
	holders, recovers := len(r.holders), h.recovers
	r.mu.Unlock()

	budget := time.Duration(req.BudgetMS) * time.Millisecond
	if budget <= 0 {
		budget = leaseLimit
	}
	pk, unsure, _ := s.takeOrReclaim(r, true, req.Free > 0, arrived.Add(budget*3/4), func(left int) int { return leaseSize(left, holders) })
	if len(pk) > 0 {
		defer s.arrived(r) // the answer is built (or the packets are back in the pool)
	}
	switch {
	case len(pk) == 0 && (unsure || req.Free > 0):
		// Nothing to lease, but the rain is not over: a holder did not
		// answer, or the asker still has packets of its own (a lease ahead).
		s.finishInflight(r, false)
		if req.Free > 0 {
			return LeaseRep{}, errEmpty
		}
		return LeaseRep{}, errUnsure
	case len(pk) == 0:
		s.finishInflight(r, true) // nothing here, nothing anywhere: the rain ends
		return LeaseRep{}, errEmpty
	}
	if time.Since(arrived) > budget*3/4 {
		s.mem.add(req.Code, pk) // the holder is giving up: not handed over
		s.finishInflight(r, false)
		return LeaseRep{}, errUnsure
	}
	r.mu.Lock()
	fenced := h.recovers != recovers
	r.mu.Unlock()
	if fenced {
		// The holder was asked what it has (recoverFrom, most often in
		// the reclaim round of this very lease, which put its missing
		// packets back into the pool) after it asked for this lease: it
		// would drop these packets as fenced, and they would be missing
		// there again until the next recovery (seconds later, repeated
		// at every lease while only its viewers grab). Kept; an answer
		// without packets makes it lease again at once.
		s.mem.add(req.Code, pk)
		s.finishInflight(r, false)
		return LeaseRep{Room: rec.Room, EndsAt: rec.EndsAt, LeftMS: time.Until(time.UnixMilli(rec.EndsAt)).Milliseconds()}, nil
	}
	if err := s.logLease(r, req.Node, false, pk); err != nil {
		s.mem.add(req.Code, pk) // not handed over
		s.finishInflight(r, false)
		s.log.Error("red packet lease not recorded", "code", req.Code, "node", req.Node, "err", err)
		return LeaseRep{}, proto.ErrInternal
	}
	r.mu.Lock()
	for _, p := range pk {
		r.where[p.Index] = uint16(hi + 1)
	}
	h.out += len(pk)
	h.sentAt = time.Now()
	h.leases++
	r.answered++
	r.mu.Unlock()
	s.finishInflight(r, false)
	return LeaseRep{Room: rec.Room, EndsAt: rec.EndsAt, LeftMS: time.Until(time.UnixMilli(rec.EndsAt)).Milliseconds(), Packets: pk}, nil
}

// takeOrReclaim takes up to size(left) packets (left: the remainder) from
// the owner's pool. While the pool is empty it takes back unused packets from
// the holders (reclaim rounds) — except for a lease ahead (ahead: the asking
// holder still has packets of its own), which only takes what the pool has.
// None and not unsure: nothing is left anywhere — the rain is over; unsure: a
// holder did not answer, or deadline passed before it could tell. last: these
// are the last unused packets anywhere.
//
// It answers "over" only after a round that found nothing anywhere
// (round.drained). Packets on their way to a holder are in neither place a
// round looks at — a lease being answered (taken from the pool, answer not
// built: a lease, lease true, counts its own packets so until ServeLease's
// answer is built and the caller calls arrived), or a lease answer
// travelling (the holder's Held behind what was leased to it) — and packets
// another round put back after this caller looked are in the pool: it looks
// again, backing off.
func (s *Service) takeOrReclaim(r *rain, lease, ahead bool, deadline time.Time, size func(left int) int) (pk []Packet, unsure, last bool) {
	code := r.rec.Code // immutable while RUNNING
	var rd round       // the last round this caller saw
	for backoff := time.Millisecond; ; {
		r.mu.Lock()
		if lease {
			r.transit++
		}
		seen := r.rounds // a round started after this may answer for the pool's emptiness below
		r.mu.Unlock()
		left, _ := s.mem.Len(context.Background(), code)
		if pk := s.mem.take(code, size(left)); len(pk) > 0 {
			rest, _ := s.mem.Len(context.Background(), code)
			r.mu.Lock()
			// The last ones: the round found nothing else anywhere, and
			// since it began no lease has taken any of what it got back.
			last = rd.drained && rest == 0 && r.transit == b2i(lease) && r.answered == rd.answered
			r.mu.Unlock()
			if rest == 0 && (!last || lease) {
				// Not known to be the last (or the last, leased: the holder
				// may never ask again).
				s.watchEnd(r)
			}
			return pk, false, last
		}
		if lease {
			s.arrived(r)
		}
		if ahead {
			return nil, false, false
		}
		if time.Now().After(deadline) {
			s.watchEnd(r)
			return nil, true, false
		}
		rd = s.reclaimRound(r, seen, deadline)
		switch {
		case rd.got > 0:
			backoff = time.Millisecond
		case rd.failed:
			s.watchEnd(r)
			return nil, true, false
		case rd.drained:
			return nil, false, false // nothing here, on the way or with a holder
		case !s.waitTransit(r, deadline):
			// A lease answer on its way, or the pool was not empty when the
			// round began (packets put back after this caller looked).
			time.Sleep(min(backoff, max(0, time.Until(deadline))))
			backoff = min(2*backoff, 32*time.Millisecond)
		}
	}
}

// endCheckMax bounds the end watcher's back-off after rounds a holder did
// not answer.
const endCheckMax = 30 * time.Second

// watchEnd makes a sharded rain end soon after its last packet is granted
// when nothing else would. The owner learns that a rain is over only when
// someone asks for more — a holder leasing with none of its own left, or a
// grab here finding the pool empty — and that ask's reclaim round finds
// nothing anywhere. The ask may never come: the last grabbers were served;
// a holder's last lease ahead failed or was answered "unsure"; or a round
// that could not tell (a lease was being answered when it began) took
// packets back that were then granted here as if more might be left. So
// once the owner's pool is empty and the rain is not ending, one watcher per
// rain runs a reclaim round itself once Config.EndCheck has passed with no
// holder asking for more (holders that ask are alive, and ask again when
// they run out: a round then would only pull packets away from their
// viewers), again until a round finds nothing anywhere (the rain ends, as a
// grab finding none would end it), gets packets back (they wait in the pool
// for the next grab), or the rain ends otherwise — backing off to
// endCheckMax while a holder does not answer. Called without r.mu.
func (s *Service) watchEnd(r *rain) {
	if s.mem == nil {
		return
	}
	r.mu.Lock()
	code, skip := r.rec.Code, r.endWatch || r.ending || r.rec.State != StateRunning
	r.mu.Unlock()
	if skip {
		return
	}
	if left, _ := s.mem.Len(context.Background(), code); left > 0 {
		return
	}
	r.mu.Lock()
	if r.endWatch {
		r.mu.Unlock()
		return
	}
	r.endWatch = true
	r.mu.Unlock()
	s.spawn(func() { s.endWatcher(r) })
}

// endWatcher is watchEnd's watcher.
func (s *Service) endWatcher(r *rain) {
	defer func() {
		r.mu.Lock()
		r.endWatch = false
		r.mu.Unlock()
		s.watchEnd(r) // the pool may have run empty again after the last look
	}()
	wait := s.cfg.EndCheck
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-t.C:
		}
		r.mu.Lock()
		if r.ending || r.rec.State != StateRunning {
			r.mu.Unlock()
			return
		}
		if quiet := time.Since(r.lastAsk); quiet < s.cfg.EndCheck {
			r.mu.Unlock()
			t.Reset(s.cfg.EndCheck - quiet)
			continue
		}
		r.inflight++ // settlement waits for this round
		seen, code := r.rounds, r.rec.Code
		r.mu.Unlock()
		if left, _ := s.mem.Len(context.Background(), code); left > 0 {
			s.finishInflight(r, false)
			return
		}
		rd := s.reclaimRound(r, seen, time.Now().Add(leaseLimit))
		s.finishInflight(r, rd.drained && rd.got == 0) // nothing anywhere: the rain ends
		switch {
		case rd.drained || rd.got > 0:
			return
		case rd.failed:
			wait = min(2*wait, endCheckMax)
		default:
			wait = s.cfg.EndCheck // a lease answer on its way: look again soon
		}
		t.Reset(wait)
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// arrived ends one lease's "on the way" (takeOrReclaim).
func (s *Service) arrived(r *rain) {
	r.mu.Lock()
	r.transit--
	r.mu.Unlock()
}

// waitTransit waits (up to leaseLimit, and not past deadline) for the leases
// being answered to be built; false: none were.
func (s *Service) waitTransit(r *rain, deadline time.Time) bool {
	waited := false
	end := time.Now().Add(leaseLimit)
	if deadline.Before(end) {
		end = deadline
	}
	for ; time.Now().Before(end); time.Sleep(2 * time.Millisecond) {
		r.mu.Lock()
		n := r.transit
		r.mu.Unlock()
		if n == 0 {
			return waited
		}
		waited = true
	}
	return true
}

// round is what a reclaim round did: got packets back; failed: a holder did
// not answer (or the caller's deadline passed first); drained: when it began
// the pool was empty and no lease was being answered, and every holder
// answered, has no unused packet left and had every lease answer sent to it
// (Held) — so nothing is left anywhere but what it got. answered: lease
// answers built before it began.
type round struct {
	got             int
	failed, drained bool
	answered        uint64
}

// roundRun is one reclaim round; its outcome once done is closed.
type roundRun struct {
	seq  uint64
	done chan struct{}
	out  round
}

// reclaimRound takes back half of the unused packets of every holder into
// the owner's pool. One round runs at a time, and its outcome is shared: a
// caller that found the pool empty when seen rounds had started takes the
// outcome of the first round started after that (its targets were chosen
// after the caller looked), waiting for the one in progress if it began
// before — at most two rounds, and not past deadline.
func (s *Service) reclaimRound(r *rain, seen uint64, deadline time.Time) (out round) {
	r.mu.Lock()
	for {
		if lr := r.lastRound; lr != nil && lr.seq > seen {
			r.mu.Unlock()
			return lr.out
		}
		run := r.reclaiming
		if run == nil {
			break
		}
		r.mu.Unlock()
		t := time.NewTimer(time.Until(deadline))
		select {
		case <-run.done:
			t.Stop()
		case <-t.C:
			return round{failed: true}
		}
		r.mu.Lock()
	}
	r.rounds++
	run := &roundRun{seq: r.rounds, done: make(chan struct{})}
	r.reclaiming = run
	code := r.rec.Code
	// Nothing enters the pool while this round runs but what it gets back
	// (one round at a time; a lease puts packets back only while counted in
	// transit), and nothing can leave an empty one.
	left, _ := s.mem.Len(context.Background(), code)
	empty, answered := left == 0 && r.transit == 0, r.answered
	var targets []int
	for i, h := range r.holders {
		if h.out > h.granted {
			targets = append(targets, i)
		}
	}
	r.mu.Unlock()
	var got atomic.Int64
	var failed, lagging, stillHeld atomic.Bool
	defer func() {
		out = round{got: int(got.Load()), failed: failed.Load(), answered: answered,
			drained: empty && !failed.Load() && !lagging.Load() && !stillHeld.Load()}
		r.mu.Lock()
		run.out = out
		r.reclaiming, r.lastRound = nil, run
		r.mu.Unlock()
		close(run.done)
	}()
	var wg sync.WaitGroup
	for _, hi := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.mu.Lock()
			h := r.holders[hi]
			r.mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), reclaimLimit)
			rep, err := s.cfg.Peers.Reclaim(ctx, h.node, ReclaimReq{Code: code, Max: maxLease})
			cancel()
			if err != nil {
				failed.Store(true)
				return
			}
			if rep.Left > 0 {
				stillHeld.Store(true)
			}
			pk := rep.Packets
			r.mu.Lock()
			// Only packets that are out with that holder, at their split
			// amount, come back.
			ok := pk[:0]
			for _, p := range pk {
				if p.Index >= 0 && int(p.Index) < len(r.where) && r.where[p.Index] == uint16(hi+1) && r.split[p.Index] == p.Amount {
					ok = append(ok, p)
				}
			}
			r.mu.Unlock()
			if len(ok) > 0 {
				if err := s.logLease(r, h.node, true, ok); err != nil {
					// Given up by the holder, not recorded here: they stay
					// "out" (never granted twice) until a recovery finds
					// them missing there, or are refunded at the end.
					s.log.Error("red packet return not recorded", "code", code, "node", h.node, "err", err)
					return
				}
				s.takeBack(r, h, ok)
				got.Add(int64(len(ok)))
			}
			// Packets out with the holder that it does not have: a lease
			// answer on its way (lagging), or never to arrive there.
			n, settled := s.recoverFrom(r, hi, rep.Held, deadline)
			got.Add(int64(n))
			if !settled {
				lagging.Store(true)
			}
		}()
	}
	wg.Wait()
	return round{} // set by the deferred func
}

// recoverFrom puts back into the owner's pool the packets out with holder
// hi that the holder does not have: lease answers that never reached its
// slice (lost on the way, or taken by a process of that node that has since
// restarted, along with whatever that process had not granted), and returns
// whose answer the owner never got. It runs in a reclaim round (one at a
// time) when the holder's Held (held, from the round's reclaim) is short of
// what the owner has out with it, once no lease answer can still be on its
// way there (recoverQuiet after the last one). The holder's answer names
// every index it received and did not give back, or durably granted, and
// makes it drop any lease answer still on its way (the fence in refill); a
// lease answered while the holder is asked makes the owner give up until
// the next round. Each index comes back once, recorded in the lease log
// before it enters the pool. It returns the packets put back; settled false:
// the holder is short and that could not be resolved in this round, so the
// round must not end the rain as "none left".
func (s *Service) recoverFrom(r *rain, hi int, held int, deadline time.Time) (n int, settled bool) {
	r.mu.Lock()
	h := r.holders[hi]
	missing, quiet, skip := h.missing(held), time.Since(h.sentAt) > recoverQuiet, h.noRecover
	running := !r.ending && r.rec.State == StateRunning
	leases, count, code := h.leases, len(r.where), r.rec.Code
	r.mu.Unlock()
	switch {
	case missing <= 0 || skip || !running:
		return 0, true
	case !quiet:
		return 0, false // a lease answer may still be on its way there
	}
	wait := min(recoverLimit, time.Until(deadline))
	if wait < 10*time.Millisecond {
		return 0, false
	}
	r.mu.Lock()
	h.recovers++ // before the holder's fence moves: a lease served from now on is checked
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	rep, err := s.cfg.Peers.Recover(ctx, h.node, RecoverReq{Code: code, Count: count})
	cancel()
	if pe := proto.AsError(err); pe != nil && pe.Code == proto.CodeBadRequest {
		// A node of an older version: its missing packets stay out and
		// are refunded at the end, as they were.
		r.mu.Lock()
		h.noRecover = true
		r.mu.Unlock()
		return 0, true
	}
	if err != nil || len(rep.Has) < (count+7)/8 {
		s.log.Warn("red packet recovery: no answer from the holder", "code", code, "node", h.node, "err", err)
		return 0, false
	}
	r.mu.Lock()
	if h.leases != leases || r.ending || r.rec.State != StateRunning {
		r.mu.Unlock()
		return 0, false // a lease answered meanwhile: the answer may not name it
	}
	var back []Packet
	for i, w := range r.where {
		if w == uint16(hi+1) && rep.Has[i/8]&(1<<(i%8)) == 0 {
			back = append(back, Packet{Index: int32(i), Amount: r.split[i]})
		}
	}
	h.base = max(0, h.out-len(back)-rep.Held)
	r.mu.Unlock()
	if len(back) == 0 {
		return 0, true
	}
	if err := s.logLease(r, h.node, true, back); err != nil {
		s.log.Error("red packet recovery not recorded", "code", code, "node", h.node, "err", err)
		return 0, false
	}
	s.takeBack(r, h, back)
	s.log.Info("red packets recovered from a holder", "code", code, "node", h.node, "packets", len(back))
	return len(back), true
}

// takeBack puts pk, recorded in the lease log as back from holder h, into
// the owner's pool.
func (s *Service) takeBack(r *rain, h *holder, pk []Packet) {
	r.mu.Lock()
	for _, p := range pk {
		r.where[p.Index] = 0
	}
	h.out -= len(pk)
	code := r.rec.Code
	r.mu.Unlock()
	s.mem.add(code, pk)
}

// finishInflight ends a grab or lease reservation of r; empty: nothing was
// left, so the rain ends. It settles when the rain is ending and nothing is
// in flight.
func (s *Service) finishInflight(r *rain, empty bool) {
	r.mu.Lock()
	r.inflight--
	if empty && r.rec.State == StateRunning {
		r.ending = true
	}
	settle := r.ending && r.inflight == 0 && !r.settling && r.rec.State == StateRunning
	r.settling = r.settling || settle
	r.mu.Unlock()
	if settle {
		s.goSettle(r)
	}
}

// closeHolders closes r on every holder and returns their totals (settle).
func (s *Service) closeHolders(r *rain) ([]NodeSplit, error) {
	r.mu.Lock()
	code := r.rec.Code
	hs := make([]holder, len(r.holders))
	for i, h := range r.holders {
		hs[i] = *h
	}
	r.mu.Unlock()
	out := make([]NodeSplit, len(hs))
	errs := make([]error, len(hs))
	var wg sync.WaitGroup
	for i, h := range hs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), closeWait+leaseLimit)
			t, err := s.cfg.Peers.Close(ctx, h.node, code)
			cancel()
			out[i], errs[i] = NodeSplit{Node: h.node, Count: h.out, Granted: t.Count, Amount: t.Amount, Max: t.Max}, err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil && hs[i].out == 0 && hs[i].base == 0 {
			// It has nothing out: it asked for a lease when none was left
			// (or gave every packet back), so it granted nothing of this
			// rain. Gone (scaled down, renamed), it must not hold the
			// settlement — and the anchor's refund — for ever.
			s.log.Info("red packet holder with nothing out not closed, settled without it", "code", code, "node", hs[i].node, "err", err)
			out[i] = NodeSplit{Node: hs[i].node}
			continue
		}
		if err != nil {
			return nil, errors.New("holder " + hs[i].node + " not closed: " + err.Error())
		}
	}
	return out, nil
}

// shard is a holder's slice of a rain it does not own.
type shard struct {
	code, owner string

	mu       sync.Mutex
	ready    bool // a lease answered: room and end known
	room     int64
	endsAt   int64 // by this node's clock (the owner's LeftMS from its answer)
	free     []Packet
	mine     bitmap        // packets received in lease answers and not given back (ReclaimRep.Held: their count)
	fence    uint64        // recoveries answered (ServeRecover): a lease asked for before one is dropped
	last     int           // size of the last lease
	held     bool          // packets were leased to this node: the owner will close it
	leasing  chan struct{} // a lease request in flight
	lastErr  error         // the last lease's refusal
	dry      bool          // a lease ahead found the owner empty: none ahead until a lease brings packets
	overAt   time.Time     // the owner had none left anywhere then (isOver)
	closed   bool          // the owner settled (or is settling) the rain
	closedOK bool          // a close reported this node's totals
	gone     bool          // removed from the map: nothing more happens through it
	timer    *time.Timer   // sweepShard
	inflight int
	granted  int
	amount   int64
	top      int64
	doubt    []persist.Op
}

var errShardGone = errors.New("redpacket: shard forgotten")

// shardOf returns this node's shard of code, creating it (nil after Close).
func (s *Service) shardOf(code, owner string) *shard {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	sh := s.shards[code]
	if sh == nil {
		sh = &shard{code: code, owner: owner}
		s.shards[code] = sh
	}
	return sh
}

// forgetUnready drops sh if no lease ever answered it (a code that is not
// running: nothing to keep for it, so client input does not grow the map).
// A grab that still holds it finds it gone and takes a fresh one.
func (s *Service) forgetUnready(sh *shard) {
	s.mu.Lock()
	sh.mu.Lock()
	if !sh.ready && !sh.closed && sh.leasing == nil && s.shards[sh.code] == sh {
		delete(s.shards, sh.code)
		sh.gone = true
	}
	sh.mu.Unlock()
	s.mu.Unlock()
}

// armSweep schedules sweepShard of sh after d (sh.mu held).
func (s *Service) armSweep(sh *shard, d time.Duration) {
	if sh.timer != nil {
		sh.timer.Stop()
	}
	sh.timer = time.AfterFunc(d, func() { s.sweepShard(sh) })
}

// sweepShard forgets sh once nothing can still depend on it: no grab in
// flight, no grant in doubt, and either its close has reported its totals,
// or it never held packets and its rain is over, or it holds none now (every
// one given back, none granted here: the owner settles without its close,
// which may then never come) and the rain ended a tombstoneTTL ago.
// Otherwise it looks again a minute later.
func (s *Service) sweepShard(sh *shard) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	idle := sh.inflight == 0 && len(sh.doubt) == 0 && sh.leasing == nil
	now := s.cfg.Now().UnixMilli()
	done := sh.closedOK || !sh.held && now >= sh.endsAt ||
		sh.mine.n == 0 && len(sh.free) == 0 && now >= sh.endsAt+tombstoneTTL.Milliseconds()
	if !idle || !done {
		if !s.closed {
			s.armSweep(sh, time.Minute)
		}
		return
	}
	if s.shards[sh.code] == sh {
		delete(s.shards, sh.code)
	}
	sh.gone = true
}

// overRecheck is how long a holder takes the owner's "none left anywhere"
// as the rain's end: after it, a grab here asks again — a packet whose grant
// the wallet refused as unavailable goes back to the owner's pool and
// reopens the rain (reopen), and grabbers on every node can have it. Until
// the owner closes this slice, at most one lease a second asks in vain.
const overRecheck = time.Second

// isOver reports whether the owner said "none left anywhere" within
// overRecheck (sh.mu held).
func (sh *shard) isOver() bool {
	return !sh.overAt.IsZero() && time.Since(sh.overAt) < overRecheck
}

// refill leases packets for sh from its owner (the first lease of a shard
// only learns the rain's room and end); callers that find a lease in flight
// wait for it (nil: look again).
func (s *Service) refill(sh *shard) error {
	sh.mu.Lock()
	if ch := sh.leasing; ch != nil {
		sh.mu.Unlock()
		<-ch
		return nil
	}
	switch {
	case sh.gone:
		sh.mu.Unlock()
		return errShardGone
	case sh.closed || sh.isOver():
		sh.mu.Unlock()
		return errEmpty
	}
	ch := make(chan struct{})
	sh.leasing = ch
	req := LeaseReq{Code: sh.code, Node: s.cfg.Node, Meta: !sh.ready, Granted: sh.granted, Amount: sh.amount, Max: sh.top,
		Free: len(sh.free), BudgetMS: leaseLimit.Milliseconds()}
	fence := sh.fence
	sh.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), leaseLimit)
	sent := time.Now()
	rep, err := s.cfg.Peers.Lease(ctx, sh.owner, req)
	cancel()
	sh.mu.Lock()
	switch {
	case err == nil && len(rep.Packets) > 0 && sh.fence != fence:
		// The owner asked what this node has (recoverFrom) while this
		// answer travelled: its packets were not named, so they may be back
		// in the owner's pool. Not taken; the caller leases again.
	case err != nil:
		if pe := proto.AsError(err); pe.Code == proto.CodeRedPacketEmpty {
			if req.Free > 0 {
				// None to lease ahead; ask again when ours run out. Not an
				// error for the caller: this node still has packets (a grab
				// that found the slice empty and waited for this lease pops
				// one; it must not tell its viewer "none left").
				sh.dry, err = true, nil
			} else {
				sh.overAt = time.Now()
			}
		}
	case sh.closed || sh.gone:
		// Closed while the lease travelled: these packets are not granted
		// here, so the settlement refunds them.
		err = errEmpty
	default:
		first := !sh.ready
		sh.ready, sh.room, sh.endsAt = true, rep.Room, sent.UnixMilli()+rep.LeftMS
		sh.free = append(sh.free, rep.Packets...)
		for _, p := range rep.Packets {
			sh.mine.set(p.Index)
		}
		if len(rep.Packets) > 0 {
			// The owner had packets again (back from other holders): lease
			// ahead again, not only when the last one is popped.
			sh.last, sh.held, sh.dry = len(rep.Packets), true, false
		}
		if first {
			s.armSweep(sh, time.Duration(max(0, rep.LeftMS))*time.Millisecond+tombstoneTTL)
		}
	}
	sh.lastErr = err
	sh.leasing = nil
	close(ch)
	sh.mu.Unlock()
	return err
}

// ShardOwner returns the owner of code's slice on this node (ok false: no
// slice of it here): its grabs go through GrabVia with that owner without
// asking who runs the rain — while the owner is down, or its worker lease
// lapsed, the slice still grants.
func (s *Service) ShardOwner(code string) (owner string, ok bool) {
	s.mu.RLock()
	sh := s.shards[code]
	s.mu.RUnlock()
	if sh == nil {
		return "", false
	}
	return sh.owner, true
}

// GrabVia grabs a packet of code, a rain that owner runs, on this node: from
// this node's slice, leased from owner as needed. It blocks (a lease, the
// one-per-user check): call it on a goroutine of its own.
func (s *Service) GrabVia(owner string, user int64, code string) (GrabReply, *proto.Error) {
	for rated := false; ; rated = true {
		rep, perr, gone := s.grabVia(owner, user, code, rated)
		if !gone {
			return rep, perr
		}
	}
}

// grabVia is one attempt of GrabVia; gone: the shard it took was forgotten
// meanwhile (another grab found the rain not running), so take a fresh one
// — rated: the grab's rate was counted by the attempt before.
func (s *Service) grabVia(owner string, user int64, code string, rated bool) (GrabReply, *proto.Error, bool) {
	if s.cfg.Peers == nil || !wellFormed(code) {
		return GrabReply{}, errGrabNone, false
	}
	sh := s.shardOf(code, owner)
	if sh == nil {
		return GrabReply{}, proto.ErrInternal, false
	}
	sh.mu.Lock()
	ready := sh.ready
	sh.mu.Unlock()
	if !ready {
		rerr := s.refill(sh)
		if errors.Is(rerr, errShardGone) {
			return GrabReply{}, nil, true
		}
		sh.mu.Lock()
		ready, err, gone := sh.ready, sh.lastErr, sh.gone
		sh.mu.Unlock()
		if gone {
			return GrabReply{}, nil, true
		}
		if !ready {
			s.forgetUnready(sh)
			if err == nil {
				// refill's own answer: none left, for a slice the owner
				// closed before this node ever had it ready (a holder
				// restarted, then closed by the rain's settlement).
				err = rerr
			}
			if err == nil {
				err = errOwnerGone
			}
			return GrabReply{}, refusal(err), false
		}
	}
	sh.mu.Lock()
	room, endsAt, closed := sh.room, sh.endsAt, sh.closed
	sh.mu.Unlock()
	if closed || s.cfg.Now().UnixMilli() >= endsAt {
		return GrabReply{}, errEmpty, false
	}
	if perr := s.roomRefusal(room, user); perr != nil {
		return GrabReply{}, perr, false
	}
	var spent limit.Spent
	if !rated {
		var perr *proto.Error
		if spent, perr = s.grabRate(user, code); perr != nil {
			return GrabReply{}, perr, false
		}
	}
	if perr := s.frozen(user); perr != nil {
		return GrabReply{}, perr, false
	}
	pl, perr := s.claim(code, user, endsAt)
	if perr != nil {
		if perr.Code == proto.CodeInternal {
			spent.GiveBack() // Redis did not answer: the node's count back (one_per_user: no shared count)
		}
		return GrabReply{}, perr, false
	}
	p, err := s.popShard(sh)
	if err != nil {
		if pl != nil {
			s.unclaim(pl)
		}
		if errors.Is(err, errShardGone) {
			return GrabReply{}, nil, true // tried again at once on a fresh shard, counted once
		}
		out := refusal(err)
		if out.Code == proto.CodeInternal {
			// The owner did not answer: the node's count given back (a
			// cluster-wide one, SharedGrabs, keeps it: a retry within the
			// interval may be 10429 there).
			spent.GiveBack()
		}
		return GrabReply{}, out, false
	}
	var (
		rep GrabReply
		out *proto.Error
	)
	done := make(chan struct{})
	s.applyGrant(user, code, p, pl.pinned(), func(res persist.Result, err error, op persist.Op) {
		sh.mu.Lock()
		sh.inflight--
		if err == nil {
			sh.granted++
			sh.amount += p.Amount
			sh.top = max(sh.top, p.Amount)
		} else if !inDoubt(err) {
			sh.free = append(sh.free, p) // nothing moved: the packet is still this node's to grant
		} else {
			sh.doubt = append(sh.doubt, op) // may still land: applied again at close
		}
		sh.mu.Unlock()
		if err != nil {
			out = proto.ErrInternal
			if pl != nil && !inDoubt(err) {
				s.unclaim(pl) // nothing moved
			}
		} else {
			rep = grabReply(p.Amount)
		}
		close(done)
	})
	<-done
	return rep, out, false
}

// OwnerUnreachable reports whether perr, a GrabVia answer, is a lease
// that got no answer from the rain's owner (its slice here is out).
func OwnerUnreachable(perr *proto.Error) bool { return perr == errOwnerGone }

// refusal is a lease error as a grab's answer.
func refusal(err error) *proto.Error {
	if pe := proto.AsError(err); pe.Code != proto.CodeInternal || errors.Is(err, errOwnerGone) {
		return pe
	}
	return errOwnerGone
}

// popShard takes one packet from sh, leasing more when it is empty (until
// the owner has none left anywhere or the rain's time is up), and leases
// ahead when it runs low.
func (s *Service) popShard(sh *shard) (Packet, error) {
	for {
		sh.mu.Lock()
		switch {
		case sh.gone:
			sh.mu.Unlock()
			return Packet{}, errShardGone
		case sh.closed || s.cfg.Now().UnixMilli() >= sh.endsAt:
			sh.mu.Unlock()
			return Packet{}, errEmpty
		}
		if n := len(sh.free); n > 0 {
			p := sh.free[n-1]
			sh.free = sh.free[:n-1]
			sh.inflight++
			// Ahead when low; and always on the last one (asking with none
			// left either brings more or tells the owner the rain is over).
			ahead := (n-1 <= sh.last/4 && !sh.dry || n == 1) && !sh.isOver() && sh.leasing == nil
			sh.mu.Unlock()
			if ahead {
				go func() { _ = s.refill(sh) }()
			}
			return p, nil
		}
		sh.mu.Unlock()
		if err := s.refill(sh); err != nil {
			return Packet{}, err
		}
	}
}

// ServeReclaim gives the owner back up to half of this node's unused packets
// of a rain (at most req.Max): they are removed from the slice before the
// answer, so they are never granted here afterwards.
func (s *Service) ServeReclaim(req ReclaimReq) ReclaimRep {
	s.mu.RLock()
	sh := s.shards[req.Code]
	s.mu.RUnlock()
	if sh == nil {
		return ReclaimRep{}
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.closed {
		return ReclaimRep{Held: sh.mine.n}
	}
	k := min(req.Max, (len(sh.free)+1)/2)
	if k <= 0 {
		return ReclaimRep{Held: sh.mine.n}
	}
	pk := append([]Packet(nil), sh.free[len(sh.free)-k:]...)
	sh.free = sh.free[:len(sh.free)-k]
	for _, p := range pk {
		sh.mine.clear(p.Index)
	}
	return ReclaimRep{Packets: pk, Left: len(sh.free), Held: sh.mine.n}
}

// ServeRecover tells the owner which packets of a rain this node has
// (recoverFrom): those in its slice or being granted — received in lease
// answers and not given back — and those durably granted here, by this
// process or an earlier one of this node.
func (s *Service) ServeRecover(req RecoverReq) (RecoverRep, error) {
	if !wellFormed(req.Code) || req.Count <= 0 || req.Count > MaxCount {
		return RecoverRep{}, errGrabNone
	}
	has := bitmap{w: make([]uint64, (req.Count+63)/64)}
	err := s.store.Scan(grantPrefix(req.Code), func(k, _ []byte) error {
		if len(k) >= 4 {
			has.set(int32(binary.BigEndian.Uint32(k[len(k)-4:])))
		}
		return nil
	})
	if err != nil {
		return RecoverRep{}, err
	}
	var held int
	s.mu.RLock()
	sh := s.shards[req.Code]
	s.mu.RUnlock()
	if sh != nil {
		sh.mu.Lock()
		has.or(sh.mine)
		held = sh.mine.n
		// A lease answer on its way here now is not named: it must not be
		// taken (refill), the owner may pool its packets again.
		sh.fence++
		sh.mu.Unlock()
	}
	// No shard: a lease asked for after this is answered after the owner
	// sent this request, which the owner then sees (holder.leases).
	return RecoverRep{Has: has.bytes(req.Count), Held: held}, nil
}

// bitmap is a set of packet indexes and its size.
type bitmap struct {
	w []uint64
	n int
}

func (b *bitmap) set(i int32) {
	if i < 0 {
		return
	}
	k := int(i) / 64
	if k >= len(b.w) {
		b.w = append(b.w, make([]uint64, k+1-len(b.w))...)
	}
	if bit := uint64(1) << (uint(i) % 64); b.w[k]&bit == 0 {
		b.w[k] |= bit
		b.n++
	}
}

func (b *bitmap) clear(i int32) {
	if k := int(i) / 64; i >= 0 && k < len(b.w) {
		if bit := uint64(1) << (uint(i) % 64); b.w[k]&bit != 0 {
			b.w[k] &^= bit
			b.n--
		}
	}
}

// or adds o's indexes that fit in b (n is not kept: for bytes only).
func (b *bitmap) or(o bitmap) {
	for i := range min(len(b.w), len(o.w)) {
		b.w[i] |= o.w[i]
	}
}

// bytes is b over count indexes, bit i in byte i/8 (RecoverRep.Has).
func (b *bitmap) bytes(count int) []byte {
	out := make([]byte, (count+7)/8)
	for i := range out {
		if k := i / 8; k < len(b.w) {
			out[i] = byte(b.w[k] >> (8 * (i % 8)))
		}
	}
	return out
}

// ServeClose ends a rain on this node (a holder) for the owner's settlement:
// no grab starts after it, grabs in flight complete, grants whose outcome was
// unknown are applied again (they land once), and the totals are read from
// this node's durable grants. Safe to repeat.
func (s *Service) ServeClose(code string) (ShardTotals, error) {
	if !wellFormed(code) {
		return ShardTotals{}, errGrabNone
	}
	sh := s.shardOf(code, "")
	if sh == nil {
		return ShardTotals{}, proto.ErrInternal
	}
	sh.mu.Lock()
	sh.closed, sh.free = true, nil
	sh.mu.Unlock()
	for deadline := time.Now().Add(closeWait); ; time.Sleep(5 * time.Millisecond) {
		sh.mu.Lock()
		n := sh.inflight
		sh.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			return ShardTotals{}, errors.New("redpacket: " + strconv.Itoa(n) + " grabs still in flight")
		}
	}
	sh.mu.Lock()
	doubt := sh.doubt
	sh.mu.Unlock()
	for len(doubt) > 0 {
		if err := s.applyDoubtful(doubt[0]); err != nil {
			return ShardTotals{}, err
		}
		doubt = doubt[1:]
		sh.mu.Lock()
		sh.doubt = doubt
		sh.mu.Unlock()
	}
	var t ShardTotals
	err := s.store.Scan(grantPrefix(code), func(_, v []byte) error {
		var g grant
		if err := proto.Unmarshal(v, &g); err != nil {
			return err
		}
		t.Count++
		t.Amount += g.Amount
		t.Max = max(t.Max, g.Amount)
		return nil
	})
	if err == nil {
		// Remembered (closed) a while, so a late lease answer is refused,
		// then forgotten by sweepShard.
		sh.mu.Lock()
		sh.closedOK = true
		s.armSweep(sh, tombstoneTTL)
		sh.mu.Unlock()
	}
	return t, err
}

// place is a grab attempt's one-per-user place in a rain (Config.Claim):
// the token that names the attempt, until when the place is needed (the
// rain's end), and the wallet generation it was taken in (its grant is
// pinned to it: persist.Op.Gen).
type place struct {
	code  string
	user  int64
	token string
	until int64
	gen   string
}

// placeKey is a user's place in a rain (Service.lost).
type placeKey struct {
	code string
	user int64
}

// lostPlace is a user's place in a rain as this node knows it (Service.lost):
// the attempts that may hold it and granted nothing for sure, and until
// when it matters (the rain's end).
type lostPlace struct {
	tokens []string
	until  int64
	loop   bool // releaseLoop runs for it
}

// maxLostTokens bounds the attempts kept per user and rain (lostPlace): a
// user's grabs are spaced by the grab limit, but Redis can stay away for
// the whole rain. Beyond it the user's grabs here are answered "retry"
// without a claim until releases are answered.
const maxLostTokens = 16

var errPlacesBusy = proto.Errorf(proto.CodeInternal, "red packets are briefly unavailable, retry")

// claim takes user's one place in rain code (OnePerUser) for a new grab
// attempt: in the places every node shares (Config.Claim), else in memory on
// the caller's side (nil: not claimed here — the owner's path keeps its own
// set). A place held by an attempt of this node that granted nothing for
// sure (lost) is taken back. A claim whose reply is lost may have taken the
// place: its attempt grants nothing, so it is given back (unclaim) — before,
// it stayed, and every later grab of the user was 30002 with nothing
// granted.
func (s *Service) claim(code string, user int64, endsAt int64) (*place, *proto.Error) {
	if !s.cfg.OnePerUser || s.cfg.Claim == nil {
		return nil, nil
	}
	p := &place{code: code, user: user, until: endsAt,
		token: s.tokenBase + ":" + strconv.FormatUint(s.tokens.Add(1), 36)}
	k := placeKey{code, user}
	var prev []string
	s.placesMu.Lock()
	if lp := s.lost[k]; lp != nil {
		if len(lp.tokens) >= maxLostTokens {
			s.placesMu.Unlock()
			return nil, errPlacesBusy
		}
		prev = slices.Clone(lp.tokens)
	}
	s.placesMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
	defer cancel()
	ok, gen, err := s.cfg.Claim(ctx, code, user, endsAt, p.token, prev)
	if errors.Is(err, ErrClaimsUnavailable) {
		return nil, errClaimsUnavailable // refused before anything was taken
	}
	if err != nil {
		s.log.Error("red packet one-per-user claim", "code", code, "err", err)
		s.unclaim(p)
		return nil, proto.ErrInternal
	}
	if !ok {
		return nil, errTaken
	}
	p.gen = gen
	if len(prev) > 0 {
		// None of prev holds the place now: this attempt took it (from
		// one of them, or free). Their entry goes with its loop.
		s.placesMu.Lock()
		if lp := s.lost[k]; lp != nil {
			lp.tokens = slices.DeleteFunc(lp.tokens, func(t string) bool { return slices.Contains(prev, t) })
		}
		s.placesMu.Unlock()
	}
	return p, nil
}

// ErrClaimsUnavailable is Config.Claim's answer while the shared places
// cannot be trusted (being rebuilt after Redis lost them).
var ErrClaimsUnavailable = errors.New("redpacket: one-per-user places unavailable")

var errClaimsUnavailable = proto.Errorf(proto.CodeInternal, "red packets are briefly unavailable (being restored), retry")

// unclaim gives p back: its grab granted nothing, for sure (never on a grant
// that may still land: that place stays). It does not block (callers
// include ledger goroutines): p joins the user's lost place, whose one loop
// (releaseLoop) releases every attempt in it, retrying what Redis does not
// answer (releaseRetry apart, backing off to releaseRetryMax) until it is
// answered or the rain is over. Meanwhile the user's next grab on this node
// takes the place back at once; on another node it is 30002 until the
// release lands. Before, a failed release was only logged: the user was
// 30002 for the whole rain with nothing granted.
func (s *Service) unclaim(p *place) {
	k := placeKey{p.code, p.user}
	s.placesMu.Lock()
	lp := s.lost[k]
	if lp == nil {
		lp = &lostPlace{}
		s.lost[k] = lp
	}
	lp.tokens = append(lp.tokens, p.token)
	lp.until = max(lp.until, p.until)
	start := !lp.loop
	lp.loop = true
	s.placesMu.Unlock()
	if start {
		s.spawn(func() { s.releaseLoop(k, lp) })
	}
}

// releaseLoop releases the attempts of lost place lp (key k) until none is
// left or the rain is over; at Close it tries once more, briefly (a node
// restarting does not know its old attempts: their places would stay
// taken for the rest of the rain).
func (s *Service) releaseLoop(k placeKey, lp *lostPlace) {
	t := time.NewTimer(0)
	defer t.Stop()
	wait := releaseRetry
	for {
		closing := false
		select {
		case <-s.quit:
			closing = true
		case <-t.C:
		}
		s.placesMu.Lock()
		toks := slices.Clone(lp.tokens)
		s.placesMu.Unlock()
		// One deadline for the pass: a Redis away fails the rest at once.
		ctx, cancel := context.WithTimeout(context.Background(), poolTimeout)
		var err error
		for _, tok := range toks {
			if e := s.cfg.Unclaim(ctx, k.code, k.user, tok); e != nil {
				err = e
				continue
			}
			s.placesMu.Lock()
			lp.tokens = slices.DeleteFunc(lp.tokens, func(t string) bool { return t == tok })
			s.placesMu.Unlock()
		}
		cancel()
		s.placesMu.Lock()
		over := s.cfg.Now().UnixMilli() >= lp.until
		if len(lp.tokens) == 0 || over || closing {
			left := len(lp.tokens)
			delete(s.lost, k)
			s.placesMu.Unlock()
			if left > 0 {
				s.log.Warn("red packet one-per-user places not released", "code", k.code, "user", k.user,
					"attempts", left, "rain_over", over, "err", err)
			}
			return
		}
		s.placesMu.Unlock()
		if err == nil {
			wait = releaseRetry
			t.Reset(0) // attempts added meanwhile
			continue
		}
		if wait == releaseRetry {
			s.log.Warn("red packet one-per-user release, retrying", "code", k.code, "user", k.user, "err", err)
		}
		t.Reset(wait)
		wait = min(2*wait, releaseRetryMax)
	}
}

// releaseRetry and releaseRetryMax space the retries of a release Redis did
// not answer: a one-per-user place (releaseLoop), a room (roomDone).
const (
	releaseRetry    = 100 * time.Millisecond
	releaseRetryMax = 5 * time.Second
)

// pinned is the wallet generation p's grant is pinned to ("" for none:
// no shared place).
func (p *place) pinned() string {
	if p == nil {
		return ""
	}
	return p.gen
}
