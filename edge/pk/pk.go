// Package pk runs PK contests: two rooms paired for a duration; PK gifts add
// to their room's score; every change pushes biz 5558 to both rooms with a
// per-contest sequence (clients drop stale ones); the contest ends exactly
// once, with a final push carrying "over":true and the winner.
//
// Contests survive a restart. A contest's record (rooms, end time, and once
// over its final scores) is written durably before anyone hears of the
// contest, and before its final push. Its running scores are not written by
// this package: each PK gift's ledger op carries a tally (TallyName) that
// commits atomically and exactly once with the debit, so a restarted node
// reads every acknowledged PK gift back from the wallet. The sequence of a
// contest restored after a restart continues from epoch<<32, above every
// sequence number sent before it.
//
// Consent: a contest between two anchors' rooms starts only once the other
// room's anchor accepts. Invite records an invitation (in memory, InviteTTL,
// at most MaxInvitesPerInviter pending per inviter and MaxInvites in all);
// Accept turns it into a contest under the same id, Decline or the TTL drops
// it and no contest exists. Start (no invitation) is for admins. Who may
// accept or decline is the caller's check (the gateway knows the rooms'
// anchors).
//
// In a cluster (NewShared, shared.go) invitations, contests, scores and the
// pushes' seq live in Redis instead, and any node's timer ends a contest,
// once. If Redis loses its data, the nodes write back the contests they hold
// once the shared wallet has rebuilt the tallies (RestoreLost).
//
// On a single node, state is in memory behind one mutex; pushes are queued under it (Publish
// never blocks), so both rooms see a contest's pushes in sequence order and
// the final push is the last one. Storage I/O happens outside the mutex.
package pk

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

// Limits of a contest.
const (
	MinDuration = time.Second
	MaxDuration = time.Hour
)

// Invitation bounds.
const (
	InviteTTL            = 30 * time.Second
	MaxInvitesPerInviter = 3
	MaxInvites           = 10000
	// InvitesPerMinute bounds the invitations an inviter makes (a burst of
	// InviteBurst): withdrawing one frees a pending slot at once, and each
	// invitation is a reliable push to the other anchor — without a rate,
	// an invite/withdraw loop was an unbounded stream of them (10429).
	InvitesPerMinute = 10
	InviteBurst      = 5
)

// Invitation is a pending PK request from Rooms[0]'s side to Rooms[1]'s
// anchor.
type Invitation struct {
	ID        string
	Rooms     [2]int64
	Inviter   int64 // user who invited
	Duration  time.Duration
	ExpiresAt time.Time

	timer *time.Timer
}

// keepOver is how long an ended contest stays readable (GET /api/v1/pk/{id}).
const keepOver = 24 * time.Hour

// Contest is one PK.
type Contest struct {
	ID     string
	Rooms  [2]int64
	Scores [2]int64
	Seq    int64
	EndsAt time.Time
	Over   bool

	live    bool // recorded and announced (a reserved contest is not yet)
	closing bool // its time is up: no new PK gift; those in flight still score (endGrace)
	ending  bool // its final record is being written: scores are frozen
	timer   *time.Timer
	// inflight are the PK gifts that entered (Enter) and whose debit is not
	// answered yet: the end waits for them, until waitUntil.
	inflight  int
	waitUntil time.Time
}

// Progress is the d of biz 5558.
type Progress struct {
	PKID   string           `json:"pk_id"`
	Scores map[string]int64 `json:"scores"`
	Seq    int64            `json:"seq"`
	EndsAt int64            `json:"ends_at"`
	Over   bool             `json:"over,omitempty"`
	Winner int64            `json:"winner,omitempty"` // room id; 0 = draw (with over)
}

// Store keeps contest records durably (persist.Store).
type Store interface {
	Put(key, val []byte) error
	Delete(key []byte) error
	Scan(prefix []byte, fn func(k, v []byte) error) error
}

// Tallies reads a durable tally (persist.Wallet.Tally).
type Tallies func(name string, user int64) (int64, error)

// TallyName is the wallet tally that holds contest id's score per room: a PK
// gift's ledger op adds its value to TallyName(id)/<room>.
func TallyName(id string) string { return "pk:" + id }

// keyPrefix is where contest records live: rec/pk/<id>.
var keyPrefix = []byte("rec/pk/")

func recordKey(id string) []byte { return append(append([]byte{}, keyPrefix...), id...) }

// record is a contest as stored.
type record struct {
	ID     string   `json:"id"`
	Rooms  [2]int64 `json:"rooms"`
	EndsAt int64    `json:"ends_at"` // unix ms
	Epoch  int64    `json:"epoch"`   // restarts the contest has run across
	Over   bool     `json:"over,omitempty"`
	Scores [2]int64 `json:"scores"` // final, once over
	Seq    int64    `json:"seq,omitempty"`
}

// bothOpen is nil when rooms a and b are open: else 10004, or isOpen's
// error when it could not be told (a cluster's Redis not answering: 50000
// "retry") — not "no such room", which a client takes as final.
func (s *Service) bothOpen(a, b int64) error {
	for _, room := range [2]int64{a, b} {
		open, err := s.isOpen(room)
		if err != nil {
			s.log.Warn("pk: room not read", "room", room, "err", err)
			return err // the rooms' own "retry" (a cluster's Redis not answering)
		}
		if !open {
			return proto.Errorf(proto.CodeNotFound, "room not found or closed")
		}
	}
	return nil
}

// Service runs contests.
type Service struct {
	router  router.Router
	isOpen  func(room int64) (bool, error)
	store   Store // nil: contests live in memory only
	tallies Tallies
	log     *slog.Logger
	keep    time.Duration // how long an ended contest stays (keepOver; tests shorten it)
	grace   time.Duration // from a contest's end time to its final score (endGrace; tests change it)
	endWait time.Duration // how long past grace an end waits for PK gifts in flight (maxEndWait; tests change it)
	ttl     time.Duration // invitation TTL (0 = InviteTTL; tests shorten it)
	sh      *shared       // cluster mode (NewShared): the state is in Redis
	// dropTallies, if set, drops a contest's two tallies once this node is
	// done with the ended contest (SetTallyDrop).
	dropTallies func(name string, rooms [2]int64)

	mu       sync.Mutex
	closed   bool
	writes   sync.WaitGroup // storage writes in flight: Close waits for them
	byRoom   map[int64]*Contest
	contests map[string]*Contest
	invites  map[string]*Invitation
	invitesN map[int64]int // inviter → pending invitations
	// inviteRate is InvitesPerMinute per inviter (this node's count).
	inviteRate *limit.Keyed
}

// New returns a PK service; isOpen tells whether a room is open; st and
// tallies make contests durable (see the package doc): call Restore once
// before serving.
func New(r router.Router, isOpen func(int64) (bool, error), st Store, tallies Tallies, log *slog.Logger) *Service {
	if log == nil {
		log = slog.Default()
	}
	return &Service{router: r, isOpen: isOpen, store: st, tallies: tallies, log: log, keep: keepOver, grace: endGrace, endWait: maxEndWait,
		byRoom: map[int64]*Contest{}, contests: map[string]*Contest{},
		invites: map[string]*Invitation{}, invitesN: map[int64]int{},
		inviteRate: limit.New(InvitesPerMinute, time.Minute, InviteBurst, nil)}
}

func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (c *Contest) record() record {
	return record{ID: c.ID, Rooms: c.Rooms, EndsAt: c.EndsAt.UnixMilli(), Epoch: c.Seq >> 32,
		Over: c.Over || c.ending, Scores: c.Scores, Seq: c.Seq}
}

func (s *Service) save(r record) error {
	if s.store == nil {
		return nil
	}
	b, err := proto.Marshal(r)
	if err != nil {
		return err
	}
	return s.store.Put(recordKey(r.ID), b)
}

// SetTallyDrop sets fn, called (on its own goroutine, waited for by Close)
// once this node is done with an ended contest — its final scores are in
// its record, and no end reads its tallies again — to drop the wallet's
// tallies of it (TallyName(id) for each room): two per contest, kept for
// good before. Set it before Restore.
func (s *Service) SetTallyDrop(fn func(name string, rooms [2]int64)) { s.dropTallies = fn }

// dropTalliesOf runs dropTallies for contest id in the background (callers
// may hold s.mu); Close waits for it.
func (s *Service) dropTalliesOf(id string, rooms [2]int64) {
	if s.dropTallies == nil {
		return
	}
	s.writes.Add(1)
	go func() {
		defer s.writes.Done()
		s.dropTallies(TallyName(id), rooms)
	}()
}

// Restore loads the contests of earlier runs: a running one resumes with its
// scores read from the wallet's tallies (every acknowledged PK gift) and
// ends at its time — at once if that has passed while the node was down; an
// ended one stays readable until keepOver after its end.
func (s *Service) Restore(now time.Time) error {
	if s.sh != nil {
		return s.restoreShared()
	}
	if s.store == nil {
		return nil
	}
	var recs, stale []record
	err := s.store.Scan(keyPrefix, func(k, v []byte) error {
		var r record
		if err := proto.Unmarshal(v, &r); err != nil || r.ID == "" {
			return fmt.Errorf("pk: bad record %q: %v", k, err)
		}
		if r.Over && now.Sub(time.UnixMilli(r.EndsAt)) > s.keep {
			stale = append(stale, r)
			return nil
		}
		recs = append(recs, r)
		return nil
	})
	if err != nil {
		return err
	}
	for _, r := range stale {
		if err := s.store.Delete(recordKey(r.ID)); err != nil {
			return err
		}
		s.dropTalliesOf(r.ID, r.Rooms) // (again, if its drop was done before the restart: harmless)
	}
	for _, r := range recs {
		c := &Contest{ID: r.ID, Rooms: r.Rooms, EndsAt: time.UnixMilli(r.EndsAt), Over: r.Over,
			Scores: r.Scores, Seq: r.Seq}
		if r.Over {
			s.mu.Lock()
			s.contests[c.ID] = c
			s.mu.Unlock()
			s.forgetLater(c, c.EndsAt.Add(s.keep).Sub(now))
			continue
		}
		for i, room := range c.Rooms {
			v, err := s.tallies(TallyName(c.ID), room)
			if err != nil {
				return fmt.Errorf("pk: scores of %s: %w", c.ID, err)
			}
			c.Scores[i] = v
		}
		// A new epoch, durable before any push of it.
		c.Seq = (r.Epoch + 1) << 32
		if err := s.save(c.record()); err != nil {
			return err
		}
		// Under the lock: the timer of a contest restored a moment ago may
		// already be ending it (and deleting from these maps).
		s.mu.Lock()
		c.live = true
		s.byRoom[c.Rooms[0]], s.byRoom[c.Rooms[1]], s.contests[c.ID] = c, c, c
		c.timer = time.AfterFunc(max(0, c.EndsAt.Sub(now)), func() { s.end(c) })
		s.mu.Unlock()
		s.log.Info("pk contest restored", "pk_id", c.ID, "rooms", c.Rooms, "scores", c.Scores, "ends_at", c.EndsAt)
	}
	return nil
}

// Close stops the contests' timers and waits for storage writes in flight;
// nothing is written after it (the store may close).
func (s *Service) Close() {
	if s.sh != nil {
		s.closeShared()
	}
	s.mu.Lock()
	s.closed = true
	for _, c := range s.contests {
		if c.timer != nil {
			c.timer.Stop()
		}
	}
	for _, inv := range s.invites {
		inv.timer.Stop()
	}
	s.mu.Unlock()
	s.writes.Wait()
}

func checkPair(a, b int64, d time.Duration) error {
	if a <= 0 || b <= 0 || a == b {
		return proto.BadRequest("room_a and room_b must be two different rooms")
	}
	if d < MinDuration || d > MaxDuration {
		return proto.BadRequest("duration_s must be %d..%d", int(MinDuration.Seconds()), int(MaxDuration.Seconds()))
	}
	return nil
}

// Invite records inviter's request to pair rooms a and b for d; no contest
// exists until b's anchor accepts (Accept) within InviteTTL. 10429 when the
// inviter has MaxInvitesPerInviter pending (or MaxInvites are pending in all),
// 10409 when a room is already in a PK.
func (s *Service) Invite(inviter, a, b int64, d time.Duration) (Invitation, error) {
	if err := checkPair(a, b, d); err != nil {
		return Invitation{}, err
	}
	if err := s.bothOpen(a, b); err != nil {
		return Invitation{}, err
	}
	var shared *limit.Shared // in a cluster, the rate across the nodes too
	if s.sh != nil {
		if s.isClosed() {
			return Invitation{}, proto.Errorf(proto.CodeInternal, "shutting down")
		}
		shared = s.sh.invites
	}
	if perr := limit.Both(s.inviteRate, shared, uint64(inviter), errInviteRate, s.log); perr != nil {
		return Invitation{}, perr
	}
	if s.sh != nil {
		return s.inviteShared(inviter, a, b, d)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return Invitation{}, proto.Errorf(proto.CodeInternal, "shutting down")
	case s.byRoom[a] != nil || s.byRoom[b] != nil:
		return Invitation{}, proto.Errorf(proto.CodeConflict, "a room is already in a PK")
	case s.invitesN[inviter] >= MaxInvitesPerInviter:
		return Invitation{}, proto.Errorf(proto.CodeRateLimited, "at most %d pending PK invitations", MaxInvitesPerInviter)
	case len(s.invites) >= MaxInvites:
		return Invitation{}, proto.Errorf(proto.CodeRateLimited, "too many pending PK invitations, retry later")
	}
	inv := &Invitation{ID: newID(), Rooms: [2]int64{a, b}, Inviter: inviter, Duration: d, ExpiresAt: time.Now().Add(s.inviteTTL())}
	s.invites[inv.ID] = inv
	s.invitesN[inviter]++
	inv.timer = time.AfterFunc(s.inviteTTL(), func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.invites[inv.ID] == inv {
			s.dropInviteLocked(inv)
		}
	})
	return *inv, nil
}

var errInviteRate = proto.Errorf(proto.CodeRateLimited, "at most %d PK invitations per minute", InvitesPerMinute)

func (s *Service) inviteTTL() time.Duration {
	if s.ttl > 0 {
		return s.ttl
	}
	return InviteTTL
}

func (s *Service) dropInviteLocked(inv *Invitation) {
	inv.timer.Stop()
	delete(s.invites, inv.ID)
	if s.invitesN[inv.Inviter]--; s.invitesN[inv.Inviter] <= 0 {
		delete(s.invitesN, inv.Inviter)
	}
}

// Invitation returns pending invitation id (not expired).
func (s *Service) Invitation(id string) (Invitation, bool) {
	inv, ok, _ := s.FindInvitation(id)
	return inv, ok
}

// FindInvitation is Invitation telling "not found" (false, nil) from "could
// not be read" (an error: the shared state unreachable — retry).
func (s *Service) FindInvitation(id string) (Invitation, bool, error) {
	if s.sh != nil {
		return s.invitationShared(id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	inv, ok := s.invites[id]
	if !ok || !time.Now().Before(inv.ExpiresAt) {
		return Invitation{}, false, nil
	}
	return *inv, true, nil
}

// take removes pending invitation id: 10004 when there is none (expired,
// declined, accepted).
func (s *Service) take(id string) (Invitation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	inv, ok := s.invites[id]
	if !ok || !time.Now().Before(inv.ExpiresAt) {
		return Invitation{}, proto.Errorf(proto.CodeNotFound, "PK invitation not found or expired")
	}
	s.dropInviteLocked(inv)
	return *inv, nil
}

// Accept starts the contest of invitation id (same id), recorded durably
// before it is announced.
func (s *Service) Accept(id string) (Contest, error) {
	if s.sh != nil {
		return s.acceptShared(id)
	}
	inv, err := s.take(id)
	if err != nil {
		return Contest{}, err
	}
	c, err := s.start(inv.ID, inv.Rooms[0], inv.Rooms[1], inv.Duration)
	if err != nil && proto.AsError(err).Code != proto.CodeNotFound {
		// A room busy in another PK, or the record not written: nothing
		// started, and the invitation stands (until it expires) — the
		// anchor's retry is not "not found". A closed room ends it.
		s.restoreInvite(inv)
	}
	return c, err
}

// restoreInvite puts back invitation inv that take removed, unless it
// expired or the service closed meanwhile.
func (s *Service) restoreInvite(inv Invitation) {
	s.mu.Lock()
	defer s.mu.Unlock()
	left := time.Until(inv.ExpiresAt)
	if s.closed || left <= 0 || s.invites[inv.ID] != nil {
		return
	}
	p := &inv
	s.invites[p.ID] = p
	s.invitesN[p.Inviter]++
	p.timer = time.AfterFunc(left, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.invites[p.ID] == p {
			s.dropInviteLocked(p)
		}
	})
}

// Decline drops invitation id; no contest starts.
func (s *Service) Decline(id string) error {
	if s.sh != nil {
		return s.declineShared(id)
	}
	_, err := s.take(id)
	return err
}

// Start pairs rooms a and b for d at once (an admin's pairing; anchors go
// through Invite and Accept). The contest is recorded durably before it is
// announced.
func (s *Service) Start(a, b int64, d time.Duration) (Contest, error) {
	if s.sh != nil {
		return s.startShared("start", newID(), a, b, d)
	}
	return s.start(newID(), a, b, d)
}

func (s *Service) start(id string, a, b int64, d time.Duration) (Contest, error) {
	if err := checkPair(a, b, d); err != nil {
		return Contest{}, err
	}
	if err := s.bothOpen(a, b); err != nil {
		return Contest{}, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return Contest{}, proto.Errorf(proto.CodeInternal, "shutting down")
	}
	if s.byRoom[a] != nil || s.byRoom[b] != nil {
		s.mu.Unlock()
		return Contest{}, proto.Errorf(proto.CodeConflict, "a room is already in a PK")
	}
	c := &Contest{ID: id, Rooms: [2]int64{a, b}, EndsAt: time.Now().Add(d)}
	s.byRoom[a], s.byRoom[b] = c, c // reserved: not live until recorded
	rec := c.record()
	s.writes.Add(1)
	s.mu.Unlock()
	err := s.save(rec)
	s.writes.Done()
	if err != nil {
		s.log.Error("pk: record contest", "err", err)
		s.mu.Lock()
		delete(s.byRoom, a)
		delete(s.byRoom, b)
		s.mu.Unlock()
		return Contest{}, proto.Errorf(proto.CodeInternal, "internal error")
	}
	s.mu.Lock()
	c.live = true
	s.contests[c.ID] = c
	c.timer = time.AfterFunc(d, func() { s.end(c) })
	s.publish(c)
	out := *c
	s.mu.Unlock()
	s.endIfRoomClosed(a, b)
	return out, nil
}

// Running returns the live contest room is in and the wallet tally that
// keeps its score: Enter, without a gift in flight.
func (s *Service) Running(room int64) (id, tally string, ok bool) {
	id, tally, leave, ok := s.Enter(room)
	if ok {
		leave()
	}
	return id, tally, ok
}

// maxEndWait bounds how long past endGrace a contest's end waits for the PK
// gifts in flight (Enter): longer than a shared wallet's call (5 s).
const maxEndWait = 6 * time.Second

// Enter is Running for a PK gift about to be debited (gift.Scorer): the
// gift is counted in flight until leave is called — once its debit is
// answered, whatever the outcome — and the contest's end waits for the gifts
// in flight (at most maxEndWait past endGrace), so a debit that lands late
// still scores: its tally would otherwise grow after the end read it.
func (s *Service) Enter(room int64) (id, tally string, leave func(), ok bool) {
	if s.sh != nil {
		return s.enterShared(room)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.byRoom[room]
	if c == nil || !c.live || c.Over || c.ending || c.closing {
		return "", "", nil, false
	}
	c.inflight++
	var once sync.Once
	return c.ID, TallyName(c.ID), func() {
		once.Do(func() {
			s.mu.Lock()
			c.inflight--
			s.mu.Unlock()
		})
	}, true
}

// AddScore adds amount to room's side of contest id, if that contest is
// still running (gift.Scorer). The gift's debit, with its tally, is durable.
func (s *Service) AddScore(room int64, id string, amount int64) {
	if s.sh != nil {
		s.addScoreShared(room, id, amount)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.byRoom[room]
	if c == nil || c.ID != id || !c.live || c.Over || c.ending || amount <= 0 {
		return
	}
	side := 0
	if c.Rooms[1] == room {
		side = 1
	}
	c.Scores[side] += amount
	s.publish(c)
}

// EndRoom ends now the contest room is in (its room closed): the result
// goes out as at its end time (endGrace later, the gifts in flight scored),
// and the other room can be paired again. Before, the contest ran on for
// its duration against a room that was gone.
func (s *Service) EndRoom(room int64) {
	if s.sh != nil {
		r := s.lookup(room)
		if r == nil {
			return
		}
		s.mu.Lock()
		if r.closing || r.ended {
			s.mu.Unlock()
			return // ending already
		}
		if r.timer != nil {
			r.timer.Stop() // its end-time timer: closeAtEnd arms the end's
		}
		s.mu.Unlock()
		s.closeAtEnd(r)
		return
	}
	s.mu.Lock()
	c := s.byRoom[room]
	if c == nil || !c.live || c.closing {
		s.mu.Unlock()
		return // none, not started yet (its start ends it once live: endIfRoomClosed), or ending
	}
	if c.timer != nil {
		c.timer.Stop()
	}
	s.mu.Unlock()
	s.end(c)
}

// Opponent returns the room room is contesting against (0 = none).
func (s *Service) Opponent(room int64) int64 {
	if s.sh != nil {
		return s.opponentShared(room)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.byRoom[room]
	if c == nil {
		return 0
	}
	if c.Rooms[0] == room {
		return c.Rooms[1]
	}
	return c.Rooms[0]
}

// Get returns contest id.
func (s *Service) Get(id string) (Contest, bool) {
	c, ok, _ := s.Find(id)
	return c, ok
}

// Find is Get telling "not found" (false, nil) from "could not be read" (an
// error: the shared state unreachable — retry).
func (s *Service) Find(id string) (Contest, bool, error) {
	if s.sh != nil {
		return s.getShared(id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.contests[id]
	if !ok {
		return Contest{}, false, nil
	}
	return *c, true, nil
}

// endGrace is how long after a contest's end time its final score is taken:
// from the end time no gift joins the contest (Enter says no), and the
// gifts already on their way — debited in a group commit or a Redis call
// when the time came — still score meanwhile. The final score is also never
// below the contest's durable tallies (a PK gift debited whose score was
// never added — slower than the grace, or its node died — still counts).
// Before, a PK gift sent in the contest's last milliseconds was debited and
// tallied but left out of the result.
const endGrace = time.Second

// endPoll is how often an end waiting for PK gifts in flight looks again.
const endPoll = 20 * time.Millisecond

// end closes c at its end time (no new PK gift) and finishes it endGrace
// later.
func (s *Service) end(c *Contest) {
	s.mu.Lock()
	if c.Over || s.closed || c.ending || c.closing {
		s.mu.Unlock()
		return
	}
	c.closing = true
	c.waitUntil = time.Now().Add(s.grace + s.endWait)
	if s.grace > 0 {
		c.timer = time.AfterFunc(s.grace, func() { s.finish(c, false) })
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.finish(c, false)
}

// finish finishes c exactly once: its scores freeze (raised to its durable
// tallies), its final record is made durable, then the final push goes
// out. If the record cannot be written the end is retried (scores stay
// frozen, no push) until it can, or the service closes (a restart then
// ends the contest).
func (s *Service) finish(c *Contest, retry bool) {
	s.mu.Lock()
	if !retry && c.inflight > 0 && time.Now().Before(c.waitUntil) && !c.Over && !c.ending && !s.closed {
		// PK gifts still being debited: their tallies are not final yet.
		c.timer = time.AfterFunc(endPoll, func() { s.finish(c, false) })
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	var t [2]int64
	tallied := s.tallies != nil && !retry
	for i := 0; tallied && i < len(t); i++ {
		var err error
		if t[i], err = s.tallies(TallyName(c.ID), c.Rooms[i]); err != nil {
			s.log.Warn("pk: final score without the tallies", "pk_id", c.ID, "err", err)
			tallied = false
		}
	}
	s.mu.Lock()
	if c.Over || s.closed || (c.ending && !retry) {
		s.mu.Unlock()
		return
	}
	c.ending = true
	if tallied {
		c.Scores[0], c.Scores[1] = max(c.Scores[0], t[0]), max(c.Scores[1], t[1])
	}
	rec := c.record()
	rec.Seq++ // the final push's
	s.writes.Add(1)
	s.mu.Unlock()
	err := s.save(rec)
	s.writes.Done()
	if err != nil {
		s.log.Error("pk: record contest end, retrying", "pk_id", c.ID, "err", err)
		s.mu.Lock()
		if !s.closed {
			c.timer = time.AfterFunc(time.Second, func() { s.finish(c, true) })
		}
		s.mu.Unlock()
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c.Over, c.ending = true, false
	s.publish(c)
	delete(s.byRoom, c.Rooms[0])
	delete(s.byRoom, c.Rooms[1])
	// The contest stays readable for keepOver, as it does from storage after
	// a restart.
	s.forgetLater(c, s.keep)
}

// forgetLater drops ended contest c, from memory and storage, after after
// (a restart drops the records whose time has passed).
func (s *Service) forgetLater(c *Contest, after time.Duration) {
	time.AfterFunc(after, func() {
		s.mu.Lock()
		mine := s.contests[c.ID] == c && !s.closed
		if mine {
			delete(s.contests, c.ID)
			s.writes.Add(1)
		}
		s.mu.Unlock()
		if !mine {
			return
		}
		defer s.writes.Done()
		if s.store != nil {
			if err := s.store.Delete(recordKey(c.ID)); err != nil {
				s.log.Warn("pk: forget contest record", "pk_id", c.ID, "err", err)
				return // its tallies go with it, at a later start
			}
		}
		s.dropTalliesOf(c.ID, c.Rooms)
	})
}

// ScoreMap is the contest's scores keyed by room id (decimal), the one
// shape of scores everywhere: biz 5558's d and GET /api/v1/pk/{id}.
func (c *Contest) ScoreMap() map[string]int64 {
	return map[string]int64{
		strconv.FormatInt(c.Rooms[0], 10): c.Scores[0],
		strconv.FormatInt(c.Rooms[1], 10): c.Scores[1],
	}
}

// publish pushes c's state to both rooms. Called with s.mu held.
func (s *Service) publish(c *Contest) {
	c.Seq++
	p := Progress{PKID: c.ID, Seq: c.Seq, EndsAt: c.EndsAt.UnixMilli(), Over: c.Over, Scores: c.ScoreMap()}
	if c.Over {
		p.Winner = c.winner()
	}
	d, _ := proto.Marshal(p)
	for _, r := range c.Rooms {
		_, _ = s.router.PublishRoom(r, proto.Push{Biz: proto.BizPKProgress, Data: d, Ack: c.Over})
	}
}

// winner is the room with the higher score, 0 for a draw.
func (c *Contest) winner() int64 {
	switch {
	case c.Scores[0] > c.Scores[1]:
		return c.Rooms[0]
	case c.Scores[1] > c.Scores[0]:
		return c.Rooms[1]
	}
	return 0
}
