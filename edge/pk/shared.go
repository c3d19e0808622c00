package pk

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

// Redis keys of the cluster's PK state, all under one hash tag {pk}: an
// invitation, its accept and a start must check "is either room already in a
// contest" and the inviter's pending count across every contest and
// invitation atomically, which needs the room index, the invitations and the
// contest in one slot. Contests start at most a few times a minute per
// anchor; the one per-gift call (score.lua) is a couple of HINCRBYs,
// coalesced per contest per node (see flush).
const (
	keyInvites  = "le:{pk}:inv"  // id → "<inviter>|<a>,<b>|<invitation json>"
	keyExpiries = "le:{pk}:invx" // zset id → expiry (unix ms)
	keyInviters = "le:{pk}:invn" // inviter → pending invitations
	keyRooms    = "le:{pk}:room" // room → id of the contest it is in
	keyRunning  = "le:{pk}:run"  // id → record of each running contest
)

func contestKey(id string) string { return "le:{pk}:c:" + id }

var (
	//go:embed lua/pair.lua
	pairLua string
	//go:embed lua/score.lua
	scoreLua string
	//go:embed lua/end.lua
	endLua string
	//go:embed lua/restore.lua
	restoreLua    string
	pairScript    = rueidis.NewLuaScript(pairLua)
	scoreScript   = rueidis.NewLuaScript(scoreLua)
	endScript     = rueidis.NewLuaScript(endLua)
	restoreScript = rueidis.NewLuaScript(restoreLua)
	// waitScript marks a replica's PK gifts in flight at the end time in the
	// contest's hash (w:<token> = Redis's now + ARGV[2] ms), if it runs.
	waitScript = rueidis.NewLuaScript(`
if redis.call('HGET', KEYS[1], 'state') ~= 'run' then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'w:' .. ARGV[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]))
return 1`)
)

// SyncEvery is how often a cluster node reads the running contests from Redis
// (contests started through other nodes: their timers are armed here too).
const SyncEvery = time.Second

// NewShared returns the PK service of a cluster node: invitations and
// contests live in Redis (rdb), so invite, accept, decline and GET through any
// node see the same state and the limits hold cluster-wide. Every node keeps
// a replica of the running contests (its own starts, a direct read when a
// gift names a room it does not know, and a Sync every SyncEvery) and arms
// each one's end timer; whichever node's timer fires first ends the contest
// (a compare-and-set in Redis), the others find it over. Scores and the
// pushes' seq are counted in Redis, in the script that adds a PK gift, so seq
// is monotonic per contest across nodes. tallies reads the wallet's tallies
// (every acknowledged PK gift): the end takes each side's score as at least
// its tally. Call Restore once before serving (it arms the timers of the
// running contests, e.g. after a restart).
func NewShared(r router.Router, isOpen func(int64) (bool, error), rdb rueidis.Client, tallies Tallies, log *slog.Logger) *Service {
	s := New(r, isOpen, nil, tallies, log)
	s.sh = &shared{rdb: rdb, byID: map[string]*running{}, byRoom: map[int64]*running{}, every: SyncEvery,
		over: map[string]*tomb{}, quit: make(chan struct{}), restoreDelay: restoreDelay, lostWait: lostWait,
		tombKeep: tombKeep, maxTombs: maxTombs, readOK: time.Now(),
		invites: limit.NewShared(rdb, "pkinv", InvitesPerMinute, time.Minute, InviteBurst)}
	return s
}

// Redis losing its data (edge/pk/shared.go, docs/wallet.md "PK in a
// cluster"): restoreDelay is how long after the wallet is ready again a node
// writes back its running contests (the ended ones it knows go at once, so
// that a contest another node ended is over before a node that missed its
// end writes it back running); lostWait is how long a contest must have
// been gone from Redis, with the wallet ready all along, before a node
// writes it back without the wallet's signal (its loss was the {pk} keys
// alone).
const (
	restoreDelay = time.Second
	lostWait     = 10 * time.Second
)

// tombKeep is how long a node keeps a contest it knows ended (a tomb), and
// maxTombs how many at most (the oldest go first). A tomb is what stops a
// node that missed the end from writing the contest back running after a
// Redis data loss, and what frees a contest a rolled-back Redis lists as
// running again (syncShared). A node misses an end only until its next sync
// that reads Redis (SyncEvery) or its own end timer; the tomb matters when
// Redis loses its data before then — it was lost, or unreachable, right at
// the end — and until the write-back that follows (the wallet's rebuild,
// then RestoreLost). Tombs are dropped only by a sync that read Redis with
// the wallet ready, once both the tomb and that run of good syncs are
// tombKeep old: an outage or a rebuild, however long, does not age them
// out, and 10 min of a Redis answering covers the write-back with a wide
// margin (minutes, not the 24 h an ended contest stays readable). 50000
// tombs (a few hundred bytes each) are ~80 ends a second for 10 min, far
// above the expected rate: the cap only bounds memory if that is exceeded.
const (
	tombKeep = 10 * time.Minute
	maxTombs = 50000
	// tombChunk is how many tombs go in one pipeline (writeTombs): Close
	// waits for one chunk at most.
	tombChunk = 500
)

// SetWalletReady sets ready, which tells whether the wallet's tallies can be
// read (persist.SharedWallet.Ready: false while a rebuild after a Redis data
// loss is under way — the tallies are rebuilt then). A contest's end, and
// its write-back after a loss, wait for it. Set it before Restore; call
// RestoreLost each time the wallet is ready again (SharedWallet.OnReady).
func (s *Service) SetWalletReady(ready func() bool) {
	if s.sh != nil {
		s.sh.ready = ready
	}
}

func (s *Service) walletReady() bool { return s.sh.ready == nil || s.sh.ready() }

// shared is the cluster state of a Service (nil on a single node).
type shared struct {
	rdb     rueidis.Client
	timeout time.Duration // per Redis call (0 = 2 s)
	every   time.Duration // Sync period
	// invites counts InvitesPerMinute on every node (an inviter's
	// invitations may go through any node).
	invites *limit.Shared
	stop    chan struct{}
	done    chan struct{}
	// closeOnce stops the Sync loop once (Close may be called twice).
	closeOnce sync.Once
	// quit is closed by Close (a write-back's wait ends).
	quit chan struct{}
	// ready: SetWalletReady (nil: always).
	ready func() bool
	// restoreDelay, lostWait, tombKeep, maxTombs: the constants (tests
	// change them; restoreDelay and lostWait under Service.mu).
	restoreDelay, lostWait time.Duration
	tombKeep               time.Duration
	maxTombs               int
	// passes counts the sync's completed passes (tests wait on it).
	passes atomic.Int64

	// Under Service.mu.
	byID   map[string]*running
	byRoom map[int64]*running
	// over are the contests this node knows ended (it ended them, or read
	// them over), kept tombKeep (at most maxTombs): written back after a
	// Redis data loss, so that no node's write-back revives one, and never
	// adopted again. overQ holds them oldest first (pruned from the front:
	// no walk of the whole map).
	over  map[string]*tomb
	overQ []*tomb
	// readyAt: when RestoreLost last ran (the wallet ready again).
	readyAt time.Time
	// readOK: since when the sync has read Redis without a failure
	// (syncFailed: its last read failed).
	readOK     time.Time
	syncFailed bool
	// tombsAt: when the last writeTombs that wrote every tomb began;
	// tombsFailed: the last one did not (the sync tries again).
	tombsAt     time.Time
	tombsFailed bool
}

// tomb is an ended contest this node knows: its final state.
type tomb struct {
	c  Contest // ID, Rooms, EndsAt, Scores, Seq
	at time.Time
}

// running is this node's replica of a running contest.
type running struct {
	c        Contest // ID, Rooms, EndsAt
	timer    *time.Timer
	pending  [2]int64 // PK gifts not yet added in Redis
	flushing bool
	ended    bool // over (here or elsewhere): this node adds and pushes nothing more
	closing  bool // its time is up here: no new PK gift (endGrace before end.lua)
	// ending: an end attempt of this replica is in flight; another one
	// waits for its outcome instead.
	ending bool
	// endUnknown: an end attempt of this replica got no answer — it may
	// have ended the contest, and only its retry learns so (end.lua answers
	// the replica that ended it the result again) and pushes the result:
	// the sync leaves the replica to that retry.
	endUnknown bool
	// mayHaveEnded: an end attempt of this replica went unanswered and its
	// retry found the contest gone (Redis lost it): that attempt may have
	// ended it, and then nobody pushed the result (other replicas that
	// read it over are silent). Whoever of this replica then finds it over
	// — its write-back, or the sync — pushes the final (the same result and
	// seq a client may have had).
	mayHaveEnded bool
	// token names this replica's end attempts: end.lua answers a retry of
	// them (its first reply lost) with the result again, so the retry still
	// pushes it; any other replica — another node's, or this node's adopted
	// again from a stale read — finds the contest over and pushes nothing.
	token string
	// pub is held across a script that numbers a push and the push's publish:
	// this node's pushes of the contest leave in seq order.
	pub sync.Mutex
	// inflight: this node's PK gifts being debited (Enter); its end waits
	// for them until waitUntil (other nodes' ends do not: each waits for
	// its own, and the first end.lua call ends the contest).
	inflight  int
	waitUntil time.Time
	// waitMu orders markWait and clearWait; marked: this replica's w: field
	// is (or may be) in Redis.
	waitMu sync.Mutex
	marked bool
	// clearAfterFlush: the last PK gift in flight at the end was answered
	// while its score was still queued (flushing): the mark goes once flush
	// has added it. unscored: a score.lua call failed — the mark stays
	// until it lapses (an end that read the tallies before that gift's
	// debit landed waits, then reads them again).
	clearAfterFlush, unscored bool
	// adopted: when this replica was made (a sync's read from before it
	// may not list the contest yet).
	adopted time.Time
	// lost: the contest is gone from Redis, not over (Redis lost its data):
	// kept — its end waits — until written back (RestoreLost, or the sync
	// after lostWait); lostAt: since when.
	lost   bool
	lostAt time.Time
	// rewrite: a write-back of this replica (restoreRunning) got no answer,
	// or could not run (the wallet not ready, its tallies unread): the
	// sync tries again (restore.lua answers a retry as the first call).
	rewrite bool
	// seen: the highest sums of gifts added (score.lua's s0/s1, never the
	// tallies' floor) this node read; seq: the highest seq it pushed (also
	// the epoch base of a written-back record). A write-back's sums are
	// these — gifts not in them (their score.lua call lost) count through
	// the floor from the tallies — and its seq goes above every seq pushed
	// before.
	seen [2]int64
	seq  int64
}

func (sh *shared) ctx() (context.Context, context.CancelFunc) {
	d := sh.timeout
	if d <= 0 {
		d = 2 * time.Second
	}
	return context.WithTimeout(context.Background(), d)
}

func pairKeys(id string) []string {
	return []string{keyInvites, keyExpiries, keyInviters, keyRooms, keyRunning, contestKey(id)}
}

func i64(v int64) string { return strconv.FormatInt(v, 10) }

var errUnavailable = proto.Errorf(proto.CodeInternal, "PK state temporarily unavailable, retry")

// pair runs pair.lua (mode, then the mode's arguments after id and now); its
// reply codes are the single node's errors.
func (s *Service) pair(mode, id string, args ...string) error {
	ctx, cancel := s.sh.ctx()
	defer cancel()
	arr, err := pairScript.Exec(ctx, s.sh.rdb, pairKeys(id),
		append([]string{mode, id, i64(time.Now().UnixMilli())}, args...)).ToArray()
	var code int64 = -1
	if err == nil && len(arr) > 0 {
		code, err = arr[0].AsInt64()
	}
	if err != nil {
		s.log.Error("pk: redis", "op", mode, "err", err)
		return errUnavailable
	}
	switch code {
	case 0:
		return nil
	case 1:
		return proto.Errorf(proto.CodeConflict, "a room is already in a PK")
	case 2:
		return proto.Errorf(proto.CodeRateLimited, "at most %d pending PK invitations", MaxInvitesPerInviter)
	case 3:
		return proto.Errorf(proto.CodeRateLimited, "too many pending PK invitations, retry later")
	case 4:
		return proto.Errorf(proto.CodeNotFound, "PK invitation not found or expired")
	}
	return errors.New("pk: bad script reply")
}

// invitation is an Invitation as stored.
type invitation struct {
	ID        string   `json:"id"`
	Rooms     [2]int64 `json:"rooms"`
	Inviter   int64    `json:"inviter"`
	Duration  int64    `json:"duration_ms"`
	ExpiresAt int64    `json:"expires_at"`
}

func (s *Service) inviteShared(inviter, a, b int64, d time.Duration) (Invitation, error) {
	inv := Invitation{ID: newID(), Rooms: [2]int64{a, b}, Inviter: inviter, Duration: d,
		ExpiresAt: time.Now().Add(s.inviteTTL())}
	v, err := proto.Marshal(invitation{ID: inv.ID, Rooms: inv.Rooms, Inviter: inviter,
		Duration: d.Milliseconds(), ExpiresAt: inv.ExpiresAt.UnixMilli()})
	if err != nil {
		return Invitation{}, err
	}
	if err := s.pair("invite", inv.ID, i64(inviter), i64(a), i64(b), i64(s.inviteTTL().Milliseconds()),
		string(v), strconv.Itoa(MaxInvitesPerInviter), strconv.Itoa(MaxInvites)); err != nil {
		return Invitation{}, err
	}
	return inv, nil
}

func (s *Service) invitationShared(id string) (Invitation, bool, error) {
	ctx, cancel := s.sh.ctx()
	defer cancel()
	v, err := s.sh.rdb.Do(ctx, s.sh.rdb.B().Hget().Key(keyInvites).Field(id).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return Invitation{}, false, nil
	}
	if err != nil {
		s.log.Warn("pk: read invitation", "pk_id", id, "err", err)
		return Invitation{}, false, errUnavailable
	}
	parts := strings.SplitN(v, "|", 3)
	var r invitation
	if len(parts) != 3 || proto.Unmarshal([]byte(parts[2]), &r) != nil {
		return Invitation{}, false, nil
	}
	inv := Invitation{ID: r.ID, Rooms: r.Rooms, Inviter: r.Inviter, Duration: time.Duration(r.Duration) * time.Millisecond,
		ExpiresAt: time.UnixMilli(r.ExpiresAt)}
	if !time.Now().Before(inv.ExpiresAt) {
		return Invitation{}, false, nil
	}
	return inv, true, nil
}

func (s *Service) acceptShared(id string) (Contest, error) {
	inv, ok, err := s.invitationShared(id)
	if err != nil {
		return Contest{}, err
	}
	if !ok {
		return Contest{}, proto.Errorf(proto.CodeNotFound, "PK invitation not found or expired")
	}
	return s.startShared("accept", id, inv.Rooms[0], inv.Rooms[1], inv.Duration)
}

func (s *Service) declineShared(id string) error { return s.pair("decline", id) }

// startShared records a contest in Redis (mode accept: in the same step as
// taking its invitation), adopts it here and pushes its start (seq 1).
func (s *Service) startShared(mode, id string, a, b int64, d time.Duration) (Contest, error) {
	if err := checkPair(a, b, d); err != nil {
		return Contest{}, err
	}
	if err := s.bothOpen(a, b); err != nil {
		return Contest{}, err
	}
	if s.isClosed() {
		return Contest{}, proto.Errorf(proto.CodeInternal, "shutting down")
	}
	c := Contest{ID: id, Rooms: [2]int64{a, b}, EndsAt: time.Now().Add(d)}
	rec, err := proto.Marshal(record{ID: id, Rooms: c.Rooms, EndsAt: c.EndsAt.UnixMilli()})
	if err != nil {
		return Contest{}, err
	}
	if err := s.pair(mode, id, i64(a), i64(b), string(rec)); err != nil && (err != errUnavailable || !s.startedUnseen(id, string(rec))) {
		return Contest{}, err
	}
	r := s.adopt(c)
	if r != nil {
		r.pub.Lock()
		s.publishShared(c, [2]int64{}, 1, false)
		s.mu.Lock()
		s.sawLocked(r, [2]int64{}, 1)
		s.mu.Unlock()
		r.pub.Unlock()
	}
	c.Seq = 1
	s.endIfRoomClosed(a, b)
	return c, nil
}

// endIfRoomClosed ends now the contest of rooms a and b, just started, if
// either closed meanwhile: the close's EndRoom ran before the contest was
// live (or known here) and found nothing to end — the contest would run
// its whole duration against a room that is gone.
func (s *Service) endIfRoomClosed(a, b int64) {
	for _, room := range [2]int64{a, b} {
		if open, err := s.isOpen(room); err == nil && !open { // (unread: the close's EndRoom, or the sync, ends it)
			s.EndRoom(room)
			return
		}
	}
}

// startedUnseen reports whether contest id runs with record rec — the one
// this call wrote: pair.lua's reply was lost (a timeout, a cut connection),
// and the script may have started it; answering "retry" would leave it
// unannounced here (no start push) and its retry "not found". (Another
// accept of the same invitation — a double click, a retry through another
// node — that started it wrote a record of its own, with its own end time:
// not this call's.) Asked a few times within startCheckFor: the connection
// that lost the reply may take a moment to come back.
func (s *Service) startedUnseen(id, rec string) bool {
	deadline := time.Now().Add(startCheckFor)
	for {
		ctx, cancel := s.sh.ctx()
		got, err := s.sh.rdb.Do(ctx, s.sh.rdb.B().Hget().Key(keyRunning).Field(id).Build()).ToString()
		cancel()
		if err == nil || rueidis.IsRedisNil(err) {
			ok := err == nil && got == rec
			if ok {
				s.log.Warn("pk: contest started though its pairing's reply was lost", "pk_id", id)
			}
			return ok
		}
		if time.Now().Add(startCheckEvery).After(deadline) {
			return false
		}
		time.Sleep(startCheckEvery)
	}
}

// startCheckFor bounds startedUnseen; startCheckEvery spaces its reads.
const (
	startCheckFor   = 2 * time.Second
	startCheckEvery = 200 * time.Millisecond
)

func (s *Service) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// adopt adds a running contest to this node's replica and arms its end timer
// (nil if the node is closed). A contest already known is returned as is.
func (s *Service) adopt(c Contest) *running {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.sh.over[c.ID] != nil {
		return nil // (known over here: a stale read, or a write-back that missed its end)
	}
	if r := s.sh.byID[c.ID]; r != nil {
		r.seq = max(r.seq, c.Seq)
		return r
	}
	var tok [8]byte
	_, _ = rand.Read(tok[:])
	r := &running{c: c, token: hex.EncodeToString(tok[:]), adopted: time.Now(), seq: c.Seq}
	s.sh.byID[c.ID] = r
	s.sh.byRoom[c.Rooms[0]], s.sh.byRoom[c.Rooms[1]] = r, r
	r.timer = time.AfterFunc(max(0, time.Until(c.EndsAt)), func() { s.closeAtEnd(r) })
	return r
}

// closeAtEnd closes r at its end time on this node (no new PK gift) and
// ends it cluster-wide endGrace later: the gifts debited meanwhile — their
// tallies are in Redis with their debits — count in end.lua's scores.
func (s *Service) closeAtEnd(r *running) {
	s.mu.Lock()
	if s.closed || r.ended || r.closing {
		s.mu.Unlock()
		return
	}
	r.closing = true
	r.waitUntil = time.Now().Add(s.grace + s.endWait)
	r.timer = time.AfterFunc(s.grace, func() { s.endShared(r) })
	busy := r.inflight > 0
	s.mu.Unlock()
	if busy {
		// Every node's end (end.lua) waits for this one's PK gifts still
		// being debited, not only this node's.
		s.markWait(r)
	}
}

// markWait writes r's wait mark (its PK gifts in flight at the end time)
// unless they were answered meanwhile.
func (s *Service) markWait(r *running) {
	r.waitMu.Lock()
	defer r.waitMu.Unlock()
	s.mu.Lock()
	busy := r.inflight > 0
	s.mu.Unlock()
	if !busy {
		return
	}
	ctx, cancel := s.sh.ctx()
	defer cancel()
	r.marked = true // also if the call fails: its HSET may have run
	if err := waitScript.Exec(ctx, s.sh.rdb, []string{contestKey(r.c.ID)}, []string{r.token, i64((s.grace + s.endWait).Milliseconds())}).Error(); err != nil {
		s.log.Warn("pk: gifts in flight not marked (the end may not wait for them)", "pk_id", r.c.ID, "err", err)
	}
}

// clearWait deletes r's wait mark once its PK gifts are answered and
// their scores added (a score that failed keeps it until it lapses).
func (s *Service) clearWait(r *running) {
	r.waitMu.Lock()
	defer r.waitMu.Unlock()
	s.mu.Lock()
	unscored := r.unscored
	s.mu.Unlock()
	if !r.marked || unscored {
		return
	}
	ctx, cancel := s.sh.ctx()
	defer cancel()
	if err := s.sh.rdb.Do(ctx, s.sh.rdb.B().Hdel().Key(contestKey(r.c.ID)).Field("w:"+r.token).Build()).Error(); err != nil {
		s.log.Warn("pk: wait mark not deleted (the end waits until it lapses)", "pk_id", r.c.ID, "err", err)
		return
	}
	r.marked = false
}

// forget drops r from the replica (it is over).
func (s *Service) forgetLocked(r *running) {
	r.ended = true
	r.timer.Stop()
	if s.sh.byID[r.c.ID] == r {
		delete(s.sh.byID, r.c.ID)
	}
	for _, room := range r.c.Rooms {
		if s.sh.byRoom[room] == r {
			delete(s.sh.byRoom, room)
		}
	}
}

// lookup returns the running contest room is in: from the replica, else from
// Redis (the room index read through client-side caching, so a room in no
// contest costs no round trip until the index changes).
func (s *Service) lookup(room int64) *running {
	s.mu.Lock()
	r := s.sh.byRoom[room]
	s.mu.Unlock()
	if r != nil {
		return r
	}
	ctx, cancel := s.sh.ctx()
	defer cancel()
	id, err := s.sh.rdb.DoCache(ctx, s.sh.rdb.B().Hget().Key(keyRooms).Field(i64(room)).Cache(), time.Minute).ToString()
	if err != nil {
		if !rueidis.IsRedisNil(err) {
			s.log.Warn("pk: read room index", "room", room, "err", err)
		}
		return nil
	}
	v, err := s.sh.rdb.Do(ctx, s.sh.rdb.B().Hget().Key(keyRunning).Field(id).Build()).ToString()
	if err != nil {
		return nil // over meanwhile, or unreachable
	}
	c, ok := decodeRunning(v)
	if !ok {
		return nil
	}
	return s.adopt(c)
}

func decodeRunning(v string) (Contest, bool) {
	var rec record
	if proto.Unmarshal([]byte(v), &rec) != nil || rec.ID == "" {
		return Contest{}, false
	}
	// Seq: the epoch's base (a record written back after a data loss).
	return Contest{ID: rec.ID, Rooms: rec.Rooms, EndsAt: time.UnixMilli(rec.EndsAt), Seq: rec.Epoch << 32}, true
}

// syncShared adopts every running contest in Redis this node does not know
// (started through another node, or before this node restarted). Contests
// ended elsewhere leave the replica when their timer here finds them over.
// A listed contest this node knows ended (a tomb) — Redis rolled back to an
// older snapshot, or failed over to a lagging replica — is written back over
// (restore.lua's "over"), which frees its rooms: no node adopts it again
// (each knows it ended), so nothing else would end it.
func (s *Service) syncShared() error {
	ctx, cancel := s.sh.ctx()
	defer cancel()
	readAt := time.Now() // replicas adopted after this may be missing from m (started meanwhile)
	m, err := s.sh.rdb.Do(ctx, s.sh.rdb.B().Hgetall().Key(keyRunning).Build()).AsStrMap()
	if err != nil {
		s.mu.Lock()
		s.sh.syncFailed = true
		s.mu.Unlock()
		return err
	}
	for _, v := range m {
		if c, ok := decodeRunning(v); ok {
			s.adopt(c)
		}
	}
	// A replica whose contest is no longer running ended elsewhere (before
	// its end time: its room closed, EndRoom) — or Redis lost it: its hash
	// tells which. So does it for a replica found lost (listed or not: the
	// running list and the hash can be lost apart, e.g. evicted), which
	// stays lost until its hash says it runs; a replica whose write-back is
	// to be tried again goes to restore.lua straight.
	var check []*running
	var revived []tomb
	ready := s.walletReady()
	now := time.Now()
	s.mu.Lock()
	if s.sh.syncFailed {
		s.sh.syncFailed, s.sh.readOK = false, now
	}
	for id, r := range s.sh.byID {
		if r.ended {
			continue
		}
		if _, listed := m[id]; r.lost || r.rewrite || !listed && !r.ending && !r.endUnknown && r.adopted.Before(readAt) {
			check = append(check, r)
		}
	}
	for id := range m {
		if t := s.sh.over[id]; t != nil && s.sh.byID[id] == nil {
			revived = append(revived, *t)
		}
	}
	if ready {
		s.pruneTombsLocked(now)
	}
	s.mu.Unlock()
	if len(revived) > 0 {
		// (Or a read from just before this node ended it: over already,
		// restore.lua leaves it.)
		s.log.Warn("pk: contests known ended listed as running (Redis rolled back?): their end written back", "count", len(revived))
		s.writeTombList(revived)
	}
	var restore []*running
	for _, r := range check {
		if s.quitting() {
			return nil
		}
		if s.checkGone(ctx, r) {
			restore = append(restore, r)
		}
	}
	if ready && s.tombsDue(restore) {
		s.writeTombs() // (the contests known ended go first)
	}
	if ready {
		s.restoreAll(restore)
	}
	s.sh.passes.Add(1)
	return nil
}

// tombsDue tells whether the sync writes the tombs back: the last pass of
// writeTombs failed, or a contest to write back (restore) was lost since the
// last one that wrote them all (its loss was the {pk} keys alone: no
// RestoreLost wrote them). Not every pass: a write-back that waits for its
// retry would send every tomb each second.
func (s *Service) tombsDue(restore []*running) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sh.tombsFailed {
		return true
	}
	for _, r := range restore {
		since := s.sh.readyAt
		if r.lost {
			since = r.lostAt
		}
		if !s.sh.tombsAt.After(since) {
			return true
		}
	}
	return false
}

func (s *Service) quitting() bool {
	select {
	case <-s.sh.quit:
		return true
	default:
		return false
	}
}

// checkGone reads the hash of r's contest, missing from the running ones
// (or r found lost): over, r is dropped (no more PK gifts join it);
// running, r is not lost (written back, by any node — also between the
// sync's two reads); gone, Redis lost it — r is kept, its end waits, until
// it is written back: by RestoreLost once the wallet is ready again, or,
// reported here (restore), once it has been lost lostWait and the wallet
// has been ready lostWait (no rebuild: Redis lost the {pk} keys alone; or
// one that came after the last rebuild, or whose write-back missed it).
// Every lost replica is written back within lostWait of the wallet being
// ready: its end never waits for ever. A replica whose write-back is to be
// tried again (rewrite) is reported at once, unread. Before, a contest
// missing from the running ones was forgotten: after a Redis data loss
// every node forgot its running contests, and none ended.
func (s *Service) checkGone(ctx context.Context, r *running) (restore bool) {
	s.mu.Lock()
	rewrite := r.rewrite
	s.mu.Unlock()
	if rewrite {
		return true // (restore.lua answers an earlier call whose reply was lost as that call)
	}
	vals, err := s.sh.rdb.Do(ctx, s.sh.rdb.B().Hmget().Key(contestKey(r.c.ID)).Field("state", "s0", "s1", "seq", "ender").Build()).ToArray()
	if err != nil || len(vals) != 5 {
		return false // (the next sync)
	}
	state, _ := vals[0].ToString()
	switch state {
	case "over":
		var sc [2]int64
		sc[0], _ = vals[1].AsInt64()
		sc[1], _ = vals[2].AsInt64()
		seq, _ := vals[3].AsInt64()
		_, eerr := vals[4].ToString()
		noEnder := rueidis.IsRedisNil(eerr) // written back over: its ender unknown
		s.mu.Lock()
		push := false
		if !r.ended && !r.ending && !r.endUnknown {
			push = noEnder && s.claimFinalLocked(r)
			s.buryLocked(r, sc, seq) // ended by end.lua: its scores are final
		}
		s.mu.Unlock()
		if push {
			r.pub.Lock()
			s.publishShared(r.c, sc, seq, true)
			r.pub.Unlock()
		}
		return false
	case "run":
		s.mu.Lock()
		r.lost = false
		// Running again: no end of this replica's stands (a later one, by
		// end.lua, names its ender, who pushes).
		r.mayHaveEnded, r.endUnknown = false, false
		s.mu.Unlock()
		return false
	}
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.ended {
		return false
	}
	s.markLostLocked(r, now, "pk: running contest gone from Redis (its data lost?): kept, written back once the wallet is ready")
	return now.Sub(r.lostAt) > s.sh.lostWait && now.Sub(s.sh.readyAt) > s.sh.lostWait
}

// restoreAll writes replicas rs back (restoreRunning), one after another,
// until the service closes.
func (s *Service) restoreAll(rs []*running) {
	for _, r := range rs {
		if s.quitting() {
			return
		}
		s.restoreRunning(r)
	}
}

// markLostLocked notes, once, that r's contest is gone from Redis (at now).
func (s *Service) markLostLocked(r *running, now time.Time, why string) {
	if !r.lost {
		r.lost, r.lostAt = true, now
		s.log.Warn(why, "pk_id", r.c.ID, "rooms", r.c.Rooms)
	}
}

// buryLocked forgets replica r of a contest that ended elsewhere, with its
// final scores and seq: its tomb recorded, its tallies dropped.
func (s *Service) buryLocked(r *running, scores [2]int64, seq int64) {
	s.forgetLocked(r)
	s.tombLocked(r.c, scores, seq)
	s.dropTalliesOf(r.c.ID, r.c.Rooms)
}

// tombLocked records contest c over, with its final scores and seq (once:
// the end is final), dropping the oldest tombs beyond maxTombs.
func (s *Service) tombLocked(c Contest, scores [2]int64, seq int64) {
	if s.sh.over[c.ID] != nil {
		return
	}
	c.Scores, c.Seq, c.Over = scores, seq, true
	t := &tomb{c: c, at: time.Now()}
	s.sh.over[c.ID] = t
	s.sh.overQ = append(s.sh.overQ, t)
	for len(s.sh.overQ) > s.sh.maxTombs {
		s.popTombLocked()
	}
}

// popTombLocked drops the oldest tomb.
func (s *Service) popTombLocked() {
	t := s.sh.overQ[0]
	s.sh.overQ[0] = nil
	s.sh.overQ = s.sh.overQ[1:]
	if s.sh.over[t.c.ID] == t {
		delete(s.sh.over, t.c.ID)
	}
}

// pruneTombsLocked drops the tombs tombKeep old, from the oldest, once Redis
// has answered the sync for tombKeep (see tombKeep).
func (s *Service) pruneTombsLocked(now time.Time) {
	if now.Sub(s.sh.readOK) <= s.sh.tombKeep {
		return
	}
	for len(s.sh.overQ) > 0 && now.Sub(s.sh.overQ[0].at) > s.sh.tombKeep {
		s.popTombLocked()
	}
}

// RestoreLost writes back to Redis what this node knows of the PK state
// after Redis lost its data: call it each time the shared wallet is ready
// again after a rebuild (persist.SharedWallet.OnReady) — the tallies, and
// so the scores, are back then. The contests it knows ended go first (their
// final state, so that they stay over), its running contests restoreDelay
// later: restore.lua puts each back once — its sums of gifts as this node
// read them, the tallies as a floor, seq in a new epoch above every push
// before — or ends it at once if one of its rooms was paired again
// meanwhile. Each then ends at its end time, with its result pushed. A
// write-back that fails is tried again by the sync. Contests no node holds
// (pending invitations, or a contest every node lost) are not restored.
func (s *Service) RestoreLost() {
	if s.sh == nil {
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.sh.readyAt = time.Now()
	delay := s.sh.restoreDelay
	s.writes.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.writes.Done()
		s.writeTombs()
		select {
		case <-s.sh.quit:
			return
		case <-time.After(delay):
		}
		s.mu.Lock()
		rs := make([]*running, 0, len(s.sh.byID))
		for _, r := range s.sh.byID {
			if !r.ended {
				rs = append(rs, r)
			}
		}
		s.mu.Unlock()
		s.restoreAll(rs)
	}()
}

// writeTombs writes back the contests this node knows ended (restore.lua's
// "over": over is final, also over a running write-back), oldest first, in
// pipelines of tombChunk; it stops at Close, or at a chunk that fails (the
// sync tries again: tombsFailed). Called by RestoreLost, and by the sync
// when tombsDue — not on every pass.
func (s *Service) writeTombs() {
	if s.quitting() {
		return
	}
	began := time.Now()
	s.mu.Lock()
	ts := make([]tomb, 0, len(s.sh.overQ))
	for _, t := range s.sh.overQ {
		ts = append(ts, *t)
	}
	s.mu.Unlock()
	ok := s.writeTombList(ts)
	s.mu.Lock()
	if s.sh.tombsFailed = !ok; ok {
		s.sh.tombsAt = began
	}
	s.mu.Unlock()
}

// writeTombList writes ts back, tombChunk to a pipeline, checking Close
// between chunks; ok: every one was written (or found over).
func (s *Service) writeTombList(ts []tomb) (ok bool) {
	for len(ts) > 0 {
		if s.quitting() {
			return false
		}
		n := min(len(ts), tombChunk)
		if !s.writeTombChunk(ts[:n]) {
			return false
		}
		ts = ts[n:]
	}
	return true
}

// writeTombChunk writes ts back in one pipeline. One written over a running
// write-back — a node that had missed its end wrote it back first, and it
// may have pushed scores since — gets its final pushed again (the same
// result), with a seq above that write-back's pushes; one written over a
// running state a rolled-back Redis brought back (older than the end: its
// seq below the final's) gets the very same final pushed again (a client
// that had it drops it by seq).
func (s *Service) writeTombChunk(ts []tomb) (ok bool) {
	execs := make([]rueidis.LuaExec, 0, len(ts))
	kept := make([]tomb, 0, len(ts))
	for _, t := range ts {
		left := t.at.Add(s.keep).Sub(time.Now())
		if left <= 0 {
			continue
		}
		rec, err := proto.Marshal(record{ID: t.c.ID, Rooms: t.c.Rooms, EndsAt: t.c.EndsAt.UnixMilli(), Over: true, Scores: t.c.Scores, Seq: t.c.Seq})
		if err != nil {
			continue
		}
		kept = append(kept, t)
		execs = append(execs, rueidis.LuaExec{Keys: []string{contestKey(t.c.ID), keyRooms, keyRunning},
			Args: []string{"over", t.c.ID, i64(t.c.Rooms[0]), i64(t.c.Rooms[1]), string(rec), i64(t.c.Scores[0]), i64(t.c.Scores[1]),
				i64(t.c.Seq), i64(max(1, left.Milliseconds())), ""}})
	}
	if len(execs) == 0 {
		return true
	}
	ctx, cancel := s.sh.ctx()
	res := restoreScript.ExecMulti(ctx, s.sh.rdb, execs...)
	cancel()
	failed := 0
	var lastErr error
	for i, rr := range res {
		arr, err := rr.AsIntSlice()
		if err != nil {
			failed, lastErr = failed+1, err
			continue
		}
		if len(arr) == 4 && arr[0] == 2 {
			t := kept[i]
			s.log.Warn("pk: ended contest written back over a running state: its final pushed again", "pk_id", t.c.ID, "seq", arr[3])
			s.publishShared(t.c, [2]int64{arr[1], arr[2]}, arr[3], true)
			s.mu.Lock()
			if x := s.sh.over[t.c.ID]; x != nil {
				x.c.Seq = max(x.c.Seq, arr[3])
			}
			s.mu.Unlock()
		}
	}
	if failed > 0 {
		s.log.Warn("pk: ended contests not written back", "count", failed, "err", lastErr)
	}
	return failed == 0
}

// restoreRunning writes r's contest back (restore.lua's "run"), if the
// wallet is ready: its sums of gifts are the highest this node read
// (score.lua's, never the tallies: gifts keep being added onto the sums,
// and one counted in a tally whose score is added after the write-back —
// its score.lua call queued, or its debit answered in doubt and settled
// later — would count twice), its floor the tallies (every acknowledged PK
// gift, rebuilt with the wallet: those whose score.lua call was lost). A
// call without an answer, or that could not run, is tried again by the
// sync (rewrite).
func (s *Service) restoreRunning(r *running) {
	s.mu.Lock()
	if s.closed || r.ended {
		s.mu.Unlock()
		return
	}
	seen, seq := r.seen, r.seq
	s.mu.Unlock()
	retry := func() {
		s.mu.Lock()
		r.rewrite = !r.ended
		s.mu.Unlock()
	}
	if !s.walletReady() {
		retry()
		return
	}
	var t [2]int64
	for i, room := range r.c.Rooms {
		var err error
		if t[i], err = s.tallies(TallyName(r.c.ID), room); err != nil {
			s.log.Warn("pk: contest not written back: tallies unread", "pk_id", r.c.ID, "err", err)
			retry()
			return
		}
	}
	epoch := seq>>32 + 1
	rec, err := proto.Marshal(record{ID: r.c.ID, Rooms: r.c.Rooms, EndsAt: r.c.EndsAt.UnixMilli(), Epoch: epoch})
	if err != nil {
		return
	}
	r.pub.Lock()
	defer r.pub.Unlock()
	s.mu.Lock()
	done := r.ended || s.sh.over[r.c.ID] != nil // (its end's retry pushed the result meanwhile: endScript)
	s.mu.Unlock()
	if done {
		return
	}
	ctx, cancel := s.sh.ctx()
	arr, err := restoreScript.Exec(ctx, s.sh.rdb, []string{contestKey(r.c.ID), keyRooms, keyRunning},
		[]string{"run", r.c.ID, i64(r.c.Rooms[0]), i64(r.c.Rooms[1]), string(rec), i64(seen[0]), i64(seen[1]),
			i64(epoch << 32), i64(s.keep.Milliseconds()), r.token, i64(t[0]), i64(t[1])}).AsIntSlice()
	cancel()
	if err != nil || len(arr) == 0 || (arr[0] != 1 && len(arr) != 4) {
		s.log.Warn("pk: contest not written back, retrying", "pk_id", r.c.ID, "err", err)
		retry()
		return
	}
	push := arr[0] == 2 || arr[0] == 3
	if arr[0] == 4 {
		// Over, its ender unknown (written back over after the loss): this
		// replica pushes the final if an end of its went unanswered — once,
		// whichever of its write-back, its sync and its end finds it.
		s.mu.Lock()
		push = !r.ended && s.claimFinalLocked(r)
		s.mu.Unlock()
	}
	if push {
		s.publishShared(r.c, [2]int64{arr[1], arr[2]}, arr[3], arr[0] != 2)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r.rewrite = false
	switch arr[0] {
	case 1:
		r.lost = false
		r.mayHaveEnded, r.endUnknown = false, false // running: no end of this replica's stands
	case 2:
		s.log.Warn("pk: running contest written back after a Redis data loss", "pk_id", r.c.ID, "sums", seen, "tallies", t, "seq", arr[3])
		r.lost = false
		r.mayHaveEnded, r.endUnknown = false, false
		s.sawLocked(r, seen, arr[3])
	case 0, 3, 4:
		if arr[0] == 3 {
			s.log.Warn("pk: contest lost with Redis's data ended at once: a room of it is in another contest", "pk_id", r.c.ID)
		}
		if !r.ended {
			s.buryLocked(r, [2]int64{arr[1], arr[2]}, arr[3])
		}
	}
}

// claimFinalLocked takes r's duty to push the final of a contest found over
// with its ender unknown (s.mu held): true once, if an end of r's went
// unanswered (mayHaveEnded, or endUnknown still), false after.
func (s *Service) claimFinalLocked(r *running) bool {
	may := r.mayHaveEnded || r.endUnknown
	r.mayHaveEnded = false
	return may
}

// sawLocked notes the sums of gifts read and the seq pushed for r.
func (s *Service) sawLocked(r *running, scores [2]int64, seq int64) {
	r.seen[0], r.seen[1], r.seq = max(r.seen[0], scores[0]), max(r.seen[1], scores[1]), max(r.seq, seq)
}

func (s *Service) restoreShared() error {
	if err := s.syncShared(); err != nil {
		return err
	}
	s.sh.stop, s.sh.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(s.sh.done)
		t := time.NewTicker(s.sh.every)
		defer t.Stop()
		for {
			select {
			case <-s.sh.stop:
				return
			case <-t.C:
				if err := s.syncShared(); err != nil {
					s.log.Warn("pk: sync running contests", "err", err)
				}
			}
		}
	}()
	return nil
}

func (s *Service) closeShared() {
	s.mu.Lock()
	s.closed = true // no contest is adopted, ended or scored from here on
	s.mu.Unlock()
	s.sh.closeOnce.Do(func() {
		close(s.sh.quit)
		if s.sh.stop != nil {
			close(s.sh.stop)
			<-s.sh.done
		}
	})
	s.mu.Lock()
	for _, r := range s.sh.byID {
		r.timer.Stop()
	}
	s.mu.Unlock()
}

// enterShared is Enter in a cluster: the gift counts in flight on this
// node's replica of the contest.
func (s *Service) enterShared(room int64) (string, string, func(), bool) {
	r := s.lookup(room)
	if r == nil {
		return "", "", nil, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.ended || r.closing || !time.Now().Before(r.c.EndsAt) {
		return "", "", nil, false
	}
	r.inflight++
	var once sync.Once
	return r.c.ID, TallyName(r.c.ID), func() {
		once.Do(func() {
			s.mu.Lock()
			r.inflight--
			last := r.inflight == 0 && r.closing
			if last && r.flushing {
				// Its score is queued (AddScore comes before leave) and
				// not in Redis yet: an end that read the tallies before
				// this debit landed must find it in the sums, so the mark
				// stays until flush has added it.
				r.clearAfterFlush, last = true, false
			}
			s.mu.Unlock()
			if last {
				go s.clearWait(r) // (called on a wallet goroutine: never block it)
			}
		})
	}, true
}

// addScoreShared queues a PK gift for the contest's next score.lua call from
// this node: one call (and one push) carries every gift queued meanwhile.
func (s *Service) addScoreShared(room int64, id string, amount int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.sh.byID[id]
	if r == nil || r.ended || s.closed || amount <= 0 {
		return
	}
	side := 0
	if r.c.Rooms[1] == room {
		side = 1
	} else if r.c.Rooms[0] != room {
		return
	}
	r.pending[side] += amount
	if !r.flushing {
		r.flushing = true
		s.writes.Add(1)
		go s.flush(r)
	}
}

func (s *Service) flush(r *running) {
	defer s.writes.Done()
	for {
		s.mu.Lock()
		p := r.pending
		r.pending = [2]int64{}
		if p == ([2]int64{}) || r.ended || s.closed {
			r.flushing = false
			clear := r.clearAfterFlush && r.inflight == 0 && !r.ended && !s.closed
			r.clearAfterFlush = false
			s.mu.Unlock()
			if clear {
				s.clearWait(r)
			}
			return
		}
		s.mu.Unlock()
		r.pub.Lock()
		ctx, cancel := s.sh.ctx()
		arr, err := scoreScript.Exec(ctx, s.sh.rdb, []string{contestKey(r.c.ID)}, []string{i64(p[0]), i64(p[1])}).AsIntSlice()
		cancel()
		if err == nil && len(arr) == 6 && arr[0] == 1 {
			s.publishShared(r.c, [2]int64{arr[1], arr[2]}, arr[3], false)
			s.mu.Lock()
			s.sawLocked(r, [2]int64{arr[4], arr[5]}, arr[3])
			s.mu.Unlock()
		}
		r.pub.Unlock()
		if err != nil {
			// The gifts are in the wallet's tallies: the end still counts
			// them — once it reads the tallies after their debits, so this
			// replica's wait mark, if any, stays until it lapses.
			s.log.Warn("pk: add score", "pk_id", r.c.ID, "err", err)
			s.mu.Lock()
			r.unscored = true
			s.mu.Unlock()
		}
	}
}

// endShared ends r cluster-wide if no node has yet (end.lua's compare-and-set
// of the state); only the node that ends it pushes the result. A Redis error
// retries a second later.
func (s *Service) endShared(r *running) {
	s.mu.Lock()
	if s.closed || r.ended || r.ending {
		s.mu.Unlock()
		return
	}
	if r.lost {
		// Redis lost the contest: it ends once written back (RestoreLost,
		// or the sync), with its result pushed — not forgotten unended.
		r.timer = time.AfterFunc(time.Second, func() { s.endShared(r) })
		s.mu.Unlock()
		return
	}
	if r.inflight > 0 && time.Now().Before(r.waitUntil) {
		// This node's PK gifts still being debited: their tallies are not
		// in Redis yet.
		r.timer = time.AfterFunc(endPoll, func() { s.endShared(r) })
		s.mu.Unlock()
		return
	}
	r.ending = true
	s.writes.Add(1)
	s.mu.Unlock()
	defer s.writes.Done()
	res, wait, err := s.endScript(r)
	s.mu.Lock()
	defer s.mu.Unlock()
	r.ending = false
	if errors.Is(err, errContestLost) {
		// Not ended by an earlier attempt of this replica whose reply was
		// lost (end.lua would answer it {1}): nothing to learn from a
		// retry, and the sync must see the replica (its write-back).
		r.mayHaveEnded = r.mayHaveEnded || r.endUnknown
		r.endUnknown = false
		s.markLostLocked(r, time.Now(), "pk: contest to end gone from Redis (its data lost?): it ends once written back")
		if !s.closed && !r.ended {
			r.timer = time.AfterFunc(time.Second, func() { s.endShared(r) })
		}
		return
	}
	if err == nil && wait {
		// Another node's PK gifts are still being debited (its mark).
		if !s.closed && !r.ended {
			r.timer = time.AfterFunc(5*endPoll, func() { s.endShared(r) })
		}
		return
	}
	if err != nil {
		s.log.Error("pk: end contest, retrying", "pk_id", r.c.ID, "err", err)
		// Unknown only if end.lua was sent (its reply lost): a tallies read
		// that failed ended nothing.
		r.endUnknown = r.endUnknown || !errors.Is(err, errEndNotSent)
		if !s.closed && !r.ended {
			r.timer = time.AfterFunc(time.Second, func() { s.endShared(r) })
		}
		return
	}
	if res {
		s.log.Info("pk contest ended", "pk_id", r.c.ID, "rooms", r.c.Rooms)
	}
	s.forgetLocked(r)
	s.dropTalliesOf(r.c.ID, r.c.Rooms) // its final scores are in its hash now
}

// errContestLost: end.lua found no such contest (Redis lost its data).
var errContestLost = errors.New("pk: contest gone from Redis")

// errEndNotSent: an end attempt failed before end.lua was sent (its
// tallies unread): it ended nothing.
var errEndNotSent = errors.New("pk: end not sent")

// endScript runs end.lua with the wallet's tallies; ended: this call ended
// the contest (and pushed its result); wait: a node's PK gifts are still
// being debited (its mark), or the wallet is not ready (rebuilding after a
// Redis data loss: its tallies are not all back), try again shortly;
// errContestLost: Redis lost the contest.
func (s *Service) endScript(r *running) (ended, wait bool, err error) {
	if !s.walletReady() {
		return false, true, nil
	}
	var t [2]int64
	for i, room := range r.c.Rooms {
		if t[i], err = s.tallies(TallyName(r.c.ID), room); err != nil {
			return false, false, fmt.Errorf("%w: %w", errEndNotSent, err)
		}
	}
	r.pub.Lock()
	defer r.pub.Unlock()
	s.mu.Lock()
	known := s.sh.over[r.c.ID] != nil // (its write-back's retry ended it and pushed the result: restoreRunning)
	unsure := r.endUnknown || r.mayHaveEnded
	s.mu.Unlock()
	if known {
		return false, false, nil
	}
	ctx, cancel := s.sh.ctx()
	defer cancel()
	arr, err := endScript.Exec(ctx, s.sh.rdb, []string{contestKey(r.c.ID), keyRooms, keyRunning},
		[]string{r.c.ID, i64(r.c.Rooms[0]), i64(r.c.Rooms[1]), i64(t[0]), i64(t[1]), i64(s.keep.Milliseconds()), r.token}).AsIntSlice()
	if err != nil {
		return false, false, err
	}
	if len(arr) == 1 && arr[0] == 2 {
		return false, true, nil
	}
	if len(arr) == 1 && arr[0] == 3 {
		return false, false, errContestLost
	}
	if len(arr) != 4 || arr[0] < 0 || arr[0] > 4 || arr[0] == 2 || arr[0] == 3 {
		return false, false, nil
	}
	if arr[0] == 4 && unsure {
		s.mu.Lock()
		unsure = s.claimFinalLocked(r)
		s.mu.Unlock()
	}
	if arr[0] == 1 || arr[0] == 4 && unsure {
		// Ended here; or over with its ender unknown (written back after a
		// data loss) while an earlier attempt of this replica went
		// unanswered: it may have ended it, and nobody pushed the result.
		s.publishShared(r.c, [2]int64{arr[1], arr[2]}, arr[3], true)
	}
	s.mu.Lock()
	s.tombLocked(r.c, [2]int64{arr[1], arr[2]}, arr[3])
	s.mu.Unlock()
	return arr[0] == 1, false, nil
}

// publishShared pushes a contest's state (numbered in Redis) to both rooms.
func (s *Service) publishShared(c Contest, scores [2]int64, seq int64, over bool) {
	c.Scores, c.Seq, c.Over = scores, seq, over
	p := Progress{PKID: c.ID, Seq: seq, EndsAt: c.EndsAt.UnixMilli(), Over: over, Scores: c.ScoreMap()}
	if over {
		p.Winner = c.winner()
	}
	d, _ := proto.Marshal(p)
	for _, room := range c.Rooms {
		if _, err := s.router.PublishRoom(room, proto.Push{Biz: proto.BizPKProgress, Data: d, Ack: over}); err != nil {
			s.log.Warn("pk: push", "pk_id", c.ID, "room", room, "seq", seq, "err", err)
		}
	}
}

func (s *Service) getShared(id string) (Contest, bool, error) {
	ctx, cancel := s.sh.ctx()
	defer cancel()
	m, err := s.sh.rdb.Do(ctx, s.sh.rdb.B().Hgetall().Key(contestKey(id)).Build()).AsStrMap()
	if err != nil {
		s.log.Warn("pk: read contest", "pk_id", id, "err", err)
		return Contest{}, false, errUnavailable
	}
	if m["rec"] == "" {
		return Contest{}, false, nil
	}
	c, ok := decodeRunning(m["rec"])
	if !ok {
		return Contest{}, false, nil
	}
	for i, k := range [2]string{"0", "1"} {
		sum, _ := strconv.ParseInt(m["s"+k], 10, 64)
		floor, _ := strconv.ParseInt(m["f"+k], 10, 64) // (a written-back contest's: score.lua)
		c.Scores[i] = max(sum, floor)
	}
	c.Seq, _ = strconv.ParseInt(m["seq"], 10, 64)
	c.Over = m["state"] == "over"
	return c, true, nil
}

func (s *Service) opponentShared(room int64) int64 {
	r := s.lookup(room)
	if r == nil {
		return 0
	}
	if r.c.Rooms[0] == room {
		return r.c.Rooms[1]
	}
	return r.c.Rooms[0]
}
