package router

import (
	"cmp"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// LocalConfig configures Local. Zero values take the defaults below.
type LocalConfig struct {
	MaxPending     int // pushes queued per room before PublishRoom fails (default 8192); Deliver drops the oldest beyond it
	MaxFrameMsgs   int // pushes merged into one frame (default 64)
	MaxFrameBytes  int // bytes merged into one frame (default 32 KiB)
	MaxRoomsPerSes int // rooms one session may join (default 16)
	// HistorySize is how many recent pushes each room keeps for `join` with
	// `since` (default 256; negative = none kept).
	HistorySize int
	// HistoryTTL is how old a kept push may be and still be replayed
	// (default 2 minutes).
	HistoryTTL time.Duration
	// Sequenced: room pushes are numbered outside (a cluster's sequencer)
	// and enter through Deliver; PublishRoom is not used. Otherwise Local
	// numbers each room's pushes itself, with an epoch per room opening.
	Sequenced bool
	// History, if set, is asked for the pushes from..to of a room in epoch
	// ep when the node's own ring no longer holds them (the cluster's shared
	// history). An error errNotKept: not kept anywhere (the join answers
	// recovered:false); any other (Redis did not answer): the join fails
	// with ErrUnavailable — the pushes may well be there, and the client
	// retries its join rather than re-syncing.
	History func(room int64, ep string, from, to int64) (msgs []Msg, err error)
	// OfflineMax reliable pushes are kept per user who has no session, for
	// OfflineTTL, and delivered when they connect (defaults 64, 10 minutes;
	// negative OfflineMax = none kept). At most OfflineUsers users (100k).
	OfflineMax   int
	OfflineTTL   time.Duration
	OfflineUsers int
	// FanoutWorkers goroutines share one frame's fan-out to a big room (at
	// least fanoutChunk members each): a write to a socket is mostly the
	// kernel's work, which runs on every core (default GOMAXPROCS; 1 = the
	// room's pump alone).
	FanoutWorkers int
}

const (
	defaultMaxPending    = 8192
	defaultMaxFrameMsgs  = 64
	defaultMaxFrameBytes = 32 << 10
	defaultMaxRooms      = 16
	defaultHistorySize   = 256
	defaultHistoryTTL    = 2 * time.Minute
	roomShards           = 64
	// fanoutChunk is the fewest members a fan-out worker is given.
	fanoutChunk = 256
)

var _ Router = (*Local)(nil)

// Local is the in-process Router of a single node.
//
// Each open room has a pump: PublishRoom encodes the push once and appends it
// to the room's pending list; one goroutine per busy room (started on demand,
// gone when the room is idle) takes everything pending, merges it into frames
// (at most MaxFrameMsgs / MaxFrameBytes each) and hands each frame to every
// member's Send, which only queues. Pushes that arrive while a fan-out is under
// way are merged into the next frame, so under load a viewer gets fewer, larger
// frames and no push waits for a timer.
//
// Room pushes are numbered (Msg.Off, with the room's epoch): by Local itself
// under room.mu, or, in a cluster, by the sequencer whose numbered pushes
// enter through Deliver in order. Each room keeps its recent pushes (histRing)
// so that JoinAt can replay what a reconnecting client missed.
//
// Lock order: room.fanMu → shard.mu → room.mu. Session.Send is called with
// fanMu held (by the pump, and by JoinAt for a replay: that is what keeps a
// replay ahead of newer pushes) but never under room.mu or a shard lock;
// Send only queues and takes no router lock.
type Local struct {
	cfg  LocalConfig
	mids *MidSource

	shards [roomShards]roomShard
	users  [roomShards]userShard

	roomPushes, userPushes, fanned, dropped, gone, overrun atomic.Int64
	direct                                                 atomic.Int64
	members                                                atomic.Int64

	memberOf sync.Map // session id → *sesRooms

	offline        *offlineBox // reliable pushes for users away (single node)
	offlineDropped atomic.Int64
}

type roomShard struct {
	mu    sync.RWMutex
	rooms map[int64]*room
}

type userShard struct {
	mu sync.RWMutex
	// A user's sessions: a few at most (ws.max_conns_per_user), usually
	// one, so a slice (16 bytes each) rather than a map per user.
	users map[int64][]Session
	// regs counts the Registers of this shard's users: a reading taken
	// before a send and compared after tells whether a session may have
	// registered meanwhile (Cluster.keepAway), without a lock.
	regs atomic.Uint64
}

// sesRooms are the rooms a session joined: at most MaxRoomsPerSes, usually
// one, so a slice rather than a map per session.
type sesRooms struct {
	mu    sync.Mutex
	rooms []int64
}

func (sr *sesRooms) has(id int64) bool { return slices.Contains(sr.rooms, id) }

func (sr *sesRooms) remove(id int64) {
	if i := slices.Index(sr.rooms, id); i >= 0 {
		sr.rooms = slices.Delete(sr.rooms, i, i+1)
	}
}

// room is one open room. Invariant: at most one pump goroutine runs per room
// (pumping), so frames leave in publish order.
type room struct {
	id int64

	// fanMu is held while frames are handed to members: by the pump for a
	// fan-out, by JoinAt for a replay.
	fanMu sync.Mutex

	mu      sync.Mutex
	closed  bool
	members map[uint64]Session
	snap    []Session // members as a slice, rebuilt when dirty
	dirty   bool
	pending []Msg
	epFrom  int // index in pending of the current epoch's first push (older ones before it)
	pumping bool
	ep      string   // the room's epoch ("" until known, when Sequenced)
	last    int64    // newest offset numbered or delivered
	taken   int64    // newest offset the pump has taken (fanned out or fanning)
	hist    histRing // recent pushes
}

// NewLocal returns an in-process router; node names the mids it makes.
func NewLocal(node string, cfg LocalConfig) *Local {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = defaultMaxPending
	}
	if cfg.FanoutWorkers <= 0 {
		cfg.FanoutWorkers = runtime.GOMAXPROCS(0)
	}
	if cfg.MaxFrameMsgs <= 0 {
		cfg.MaxFrameMsgs = defaultMaxFrameMsgs
	}
	if cfg.MaxFrameBytes <= 0 {
		cfg.MaxFrameBytes = defaultMaxFrameBytes
	}
	if cfg.MaxRoomsPerSes <= 0 {
		cfg.MaxRoomsPerSes = defaultMaxRooms
	}
	if cfg.HistorySize == 0 {
		cfg.HistorySize = defaultHistorySize
	}
	if cfg.HistoryTTL <= 0 {
		cfg.HistoryTTL = defaultHistoryTTL
	}
	if cfg.OfflineMax == 0 {
		cfg.OfflineMax = 64
	}
	if cfg.OfflineTTL <= 0 {
		cfg.OfflineTTL = 10 * time.Minute
	}
	if cfg.OfflineUsers <= 0 {
		cfg.OfflineUsers = 100_000
	}
	l := &Local{cfg: cfg, mids: NewMidSource(node), offline: newOfflineBox(cfg.OfflineMax, cfg.OfflineUsers, cfg.OfflineTTL)}
	for i := range l.shards {
		l.shards[i].rooms = map[int64]*room{}
		l.users[i].users = map[int64][]Session{}
	}
	return l
}

func (l *Local) shard(id int64) *roomShard { return &l.shards[uint64(id)%roomShards] }

func (l *Local) room(id int64) *room {
	sh := l.shard(id)
	sh.mu.RLock()
	r := sh.rooms[id]
	sh.mu.RUnlock()
	return r
}

// OpenRoom implements Router.
func (l *Local) OpenRoom(id int64) {
	sh := l.shard(id)
	sh.mu.Lock()
	if _, ok := sh.rooms[id]; !ok {
		r := &room{id: id, members: map[uint64]Session{}}
		if !l.cfg.Sequenced {
			r.ep = NewEpoch() // the history of an earlier opening is gone
		}
		sh.rooms[id] = r
	}
	sh.mu.Unlock()
}

// CloseRoom implements Router. The final push goes through the room's pump, so
// it reaches the former members after every push published before it.
func (l *Local) CloseRoom(id int64, final *proto.Push) {
	sh := l.shard(id)
	sh.mu.Lock()
	r := sh.rooms[id]
	delete(sh.rooms, id)
	sh.mu.Unlock()
	if r == nil {
		return
	}
	r.mu.Lock()
	r.closed = true
	if final != nil {
		if final.Mid == "" {
			final.Mid = l.mids.Next()
		}
		final.Room = id
		if !l.cfg.Sequenced {
			r.last++
			final.Off, final.Ep = r.last, r.ep
		}
		r.pending = append(r.pending, encodeMsg(final))
	}
	former := make([]Session, 0, len(r.members))
	for _, s := range r.members {
		former = append(former, s)
	}
	r.members = map[uint64]Session{}
	r.snap, r.dirty = former, false // a fresh slice: a running pump may still read the old one
	start := !r.pumping && len(r.pending) > 0
	r.pumping = r.pumping || start
	r.mu.Unlock()
	l.members.Add(-int64(len(former)))
	for _, s := range former {
		l.forget(s, id)
	}
	if start {
		go l.pump(r)
	}
}

// Join implements Router.
func (l *Local) Join(id int64, s Session) (int, error) {
	j, err := l.JoinAt(id, s, nil)
	return j.Online, err
}

// JoinAt implements Router. With since in the room's epoch, the pushes after
// since.Off that the pump has already taken are replayed to s (from the ring,
// else from cfg.History) before s can receive any later push: fanMu keeps the
// pump out while the replay is queued, and every push not yet taken reaches s
// through the pump because s is a member before fanMu is released. A read of
// cfg.History (Redis in a cluster) is made with no lock held — the room's
// fan-out never waits on it — and what the pump took meanwhile comes from the
// ring (or one more read) once the locks are taken again.
func (l *Local) JoinAt(id int64, s Session, since *proto.Position) (Joined, error) {
	r := l.room(id)
	if r == nil {
		return Joined{}, ErrNoRoom
	}
	v, _ := l.memberOf.LoadOrStore(s.ID(), &sesRooms{})
	sr := v.(*sesRooms)
	sr.mu.Lock()
	added := !sr.has(id) // false: a join again of a room the session is in
	if added {
		if len(sr.rooms) >= l.cfg.MaxRoomsPerSes {
			sr.mu.Unlock()
			return Joined{}, ErrTooManyRooms
		}
		sr.rooms = append(sr.rooms, id)
	}
	sr.mu.Unlock()

	var read []Msg // from cfg.History: since.Off+1 .. readTo of epoch readEp
	var readEp string
	var readTo int64
	reads, readFailed := 0, false
	for {
		r.fanMu.Lock()
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			r.fanMu.Unlock()
			l.forget(s, id)
			return Joined{}, ErrNoRoom
		}
		j := Joined{Off: r.taken, Ep: r.ep}
		var replay []Msg
		needFrom, needTo := int64(0), int64(0)
		if since != nil {
			switch {
			case since.Ep != r.ep || r.ep == "":
			case since.Off > r.taken && !l.cfg.Sequenced:
				// A position this node never handed out (its counter is the
				// room's, on a single node): recovered, the client would
				// drop the room's next pushes as seen. Not recovered: it
				// takes the reply's position. (In a cluster this node may
				// trail the room's counter; Cluster.JoinAt asks Redis.)
			case since.Off >= r.taken: // nothing missed that the pump will not bring
				j.Recovered = true
			case r.taken-since.Off > int64(max(l.cfg.HistorySize, 0)):
				// More than any history keeps.
			default:
				if readEp != r.ep {
					read, readTo = nil, 0 // (epochs never come back: cannot happen)
				}
				from := since.Off + 1
				if readTo > 0 {
					from = readTo + 1 // read before: only what the pump took meanwhile
				}
				if msgs, ok := r.hist.rangeOf(from, r.taken, time.Now().Add(-l.cfg.HistoryTTL).UnixNano()); ok {
					replay, j.Recovered = append(read, msgs...), true
				} else {
					needFrom, needTo = from, r.taken
				}
			}
		}
		if needTo > 0 && l.cfg.History != nil && reads < 2 && !readFailed {
			ep := r.ep
			r.mu.Unlock()
			r.fanMu.Unlock()
			reads++
			msgs, err := l.cfg.History(id, ep, needFrom, needTo)
			switch {
			case err == nil:
				read, readEp, readTo = append(read, msgs...), ep, needTo
			case errors.Is(err, errNotKept):
				readFailed = true // not recovered; not tried again
			default:
				if added { // a member already stays one (its Unregister leaves the room)
					l.forget(s, id)
				}
				return Joined{}, fmt.Errorf("%w: reading the room's history: %w", ErrUnavailable, err)
			}
			continue
		}
		if _, in := r.members[s.ID()]; !in {
			r.members[s.ID()] = s
			r.dirty = true
			l.members.Add(1)
		}
		j.Online = len(r.members)
		r.mu.Unlock()
		if qr, ok := s.(QueueRoom); ok && len(replay) > 0 && bytesOf(replay) > qr.QueueRoom() {
			// It would overflow the session's queue (closed as a slow
			// consumer — and the same join again after it reconnects):
			// not replayed, the client re-syncs.
			replay, j.Recovered = nil, false
		}
		if len(replay) > 0 {
			l.sendChunks(replay, s, false)
		}
		r.fanMu.Unlock()
		return j, nil
	}
}

// Leave implements Router.
func (l *Local) Leave(id int64, s Session) { l.leave(id, s) }

// leave is Leave; it reports whether s was a member of room id.
func (l *Local) leave(id int64, s Session) bool {
	l.forget(s, id)
	r := l.room(id)
	if r == nil {
		return false
	}
	r.mu.Lock()
	_, in := r.members[s.ID()]
	if in {
		delete(r.members, s.ID())
		r.dirty = true
		l.members.Add(-1)
	}
	r.mu.Unlock()
	return in
}

func (l *Local) forget(s Session, id int64) {
	if v, ok := l.memberOf.Load(s.ID()); ok {
		sr := v.(*sesRooms)
		sr.mu.Lock()
		sr.remove(id)
		sr.mu.Unlock()
	}
}

// IsMember implements Router.
func (l *Local) IsMember(id int64, s Session) bool {
	r := l.room(id)
	if r == nil {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.members[s.ID()]
	return ok
}

// UserInRoom implements Router (never an error: the node's own memory).
func (l *Local) UserInRoom(id, user int64) (bool, error) { return l.userInRoom(id, user), nil }

// userInRoom is UserInRoom: the user's sessions are copied out of the user
// index first, so no room lock is taken under a user shard's lock.
func (l *Local) userInRoom(id, user int64) bool {
	var buf [8]Session
	us := l.userShard(user)
	us.mu.RLock()
	sessions := buf[:0]
	for _, s := range us.users[user] {
		sessions = append(sessions, s)
	}
	us.mu.RUnlock()
	for _, s := range sessions {
		if l.IsMember(id, s) {
			return true
		}
	}
	return false
}

// Online implements Router.
func (l *Local) Online(id int64) int {
	r := l.room(id)
	if r == nil {
		return 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.members)
}

func encodeMsg(p *proto.Push) Msg {
	return Msg{Mid: p.Mid, Ack: p.Ack, Off: p.Off, Bytes: proto.AppendPush(make([]byte, 0, 80+len(p.Data)), p)}
}

// PublishRoom implements Router: the push gets the room's next offset and is
// encoded under room.mu, so pending order is offset order.
func (l *Local) PublishRoom(id int64, p proto.Push) (string, error) {
	r := l.room(id)
	if r == nil {
		return "", ErrNoRoom
	}
	if p.Mid == "" {
		p.Mid = l.mids.Next()
	}
	p.Room = id
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return "", ErrNoRoom
	}
	if len(r.pending) >= l.cfg.MaxPending {
		r.mu.Unlock()
		l.dropped.Add(1)
		return "", ErrRoomBusy
	}
	r.last++
	p.Off, p.Ep = r.last, r.ep
	m := encodeMsg(&p)
	r.hist.add(m, time.Now().UnixNano(), l.cfg.HistorySize)
	r.pending = append(r.pending, m)
	start := !r.pumping
	r.pumping = true
	r.mu.Unlock()
	l.roomPushes.Add(1)
	if start {
		go l.pump(r)
	}
	return p.Mid, nil
}

// Deliver queues pushes numbered by the cluster's sequencer for the room's
// local members. Calls for one room must come in offset order (one caller at
// a time); msgs are consecutive and carry their Off. An epoch other than the
// room's, or a first offset that does not follow the last delivered one,
// restarts the room's history at msgs (the caller has given up on the gap).
// It returns false if the room is not open here.
func (l *Local) Deliver(id int64, ep string, msgs []Msg) bool {
	r := l.room(id)
	if r == nil || len(msgs) == 0 {
		return r != nil
	}
	now := time.Now().UnixNano()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return false
	}
	if ep != r.ep {
		// A new epoch: the pump takes these next (after anything of the old
		// one still pending), so a joiner now is at their start.
		r.ep = ep
		r.taken = msgs[0].Off - 1
		r.epFrom = len(r.pending)
		r.hist.reset()
	}
	for _, m := range msgs {
		r.hist.add(m, now, l.cfg.HistorySize)
	}
	r.last = msgs[len(msgs)-1].Off
	r.pending = append(r.pending, msgs...)
	if over := len(r.pending) - l.cfg.MaxPending; over > 0 {
		// The room's fan-out here is MaxPending behind what the cluster
		// publishes (this node's CPU, not a slow client: those are cut off
		// on their own): the oldest queued pushes go, so a node that cannot
		// keep up holds a bounded queue. Its members see a gap in the
		// offsets and re-sync; a joiner still finds them in the history —
		// they count as taken, so a join replays them (a join from before
		// them was answered recovered with nothing replayed, and the pump
		// never brought them).
		if over-1 >= r.epFrom { // the last dropped is of this epoch (not an older one's offset)
			r.taken = max(r.taken, r.pending[over-1].Off)
		}
		r.epFrom = max(0, r.epFrom-over)
		r.pending = r.pending[over:]
		l.overrun.Add(int64(over))
	}
	start := !r.pumping
	r.pumping = true
	r.mu.Unlock()
	l.roomPushes.Add(int64(len(msgs)))
	if start {
		go l.pump(r)
	}
	return true
}

// Position is the room's epoch and newest offset on this node.
func (l *Local) Position(id int64) (ep string, last int64, ok bool) {
	r := l.room(id)
	if r == nil {
		return "", 0, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ep, r.last, true
}

// ForgetHistory drops room id's recent pushes kept in memory (its position
// stays): the cluster router calls it when it stops receiving the room's
// pushes (no member here for its linger), after which they could not serve
// a join anyway — a pushed-to room joined once on every node kept up to
// rooms.history_size pushes on each of them for as long as it stayed open.
func (l *Local) ForgetHistory(id int64) {
	if r := l.room(id); r != nil {
		r.mu.Lock()
		r.hist.reset()
		r.mu.Unlock()
	}
}

// SetPosition starts a Sequenced room at (ep, last) before any Deliver: the
// cluster router calls it once it has subscribed and read the room's newest
// offset, so that a later join knows where the room stands.
func (l *Local) SetPosition(id int64, ep string, last int64) {
	r := l.room(id)
	if r == nil {
		return
	}
	r.mu.Lock()
	switch {
	case r.ep != ep:
		// Another epoch: positions of the old one mean nothing here (a
		// taken left from it would make a joiner skip the new one's start).
		r.ep, r.last, r.taken = ep, last, last
		r.epFrom = len(r.pending)
		r.hist.reset()
	case r.last < last:
		r.last = last
		if !r.pumping && len(r.pending) == 0 {
			r.taken = last
		}
		r.hist.reset()
	}
	r.mu.Unlock()
}

// pump drains r.pending until it is empty. Only one runs per room.
func (l *Local) pump(r *room) {
	var spare []Msg
	for {
		r.fanMu.Lock()
		r.mu.Lock()
		if len(r.pending) == 0 {
			r.pumping = false
			r.mu.Unlock()
			r.fanMu.Unlock()
			return
		}
		msgs := r.pending
		r.pending, r.epFrom = spare[:0], 0
		if off := msgs[len(msgs)-1].Off; off > 0 {
			r.taken = off
		}
		rebuilt := r.dirty
		if rebuilt {
			r.snap = r.snap[:0]
			for _, s := range r.members {
				r.snap = append(r.snap, s)
			}
			r.dirty = false
		}
		// Only the pump rebuilds snap in place, and only between fan-outs;
		// CloseRoom replaces it with a fresh slice.
		members := r.snap
		r.mu.Unlock()
		if rebuilt {
			// In connection order (oldest first), not the map's: sockets
			// and connection state made together sit together in memory,
			// and a fan-out that walks them in that order spends less of
			// each write on cache misses (measured: router/bench).
			slices.SortFunc(members, func(a, b Session) int { return cmp.Compare(a.ID(), b.ID()) })
		}
		l.fanout(msgs, members)
		r.fanMu.Unlock()
		clear(msgs)
		spare = msgs
	}
}

// fanout merges msgs into frames and sends each frame to every member.
func (l *Local) fanout(msgs []Msg, members []Session) {
	for len(msgs) > 0 {
		n, size := 0, 0
		for n < len(msgs) && n < l.cfg.MaxFrameMsgs && (n == 0 || size+len(msgs[n].Bytes) <= l.cfg.MaxFrameBytes) {
			size += len(msgs[n].Bytes)
			n++
		}
		f := NewFrame(append([]Msg(nil), msgs[:n]...)...)
		msgs = msgs[n:]
		l.sendFrame(f, members)
		l.fanned.Add(int64(len(members)))
	}
}

// sendFrame hands f to every member: SendNow (the member writes it at once
// when it has nothing queued) or Send. A big room is split among up to
// FanoutWorkers goroutines, each member in one part, so each member still
// gets its frames in order; sendFrame returns when every part is done.
func (l *Local) sendFrame(f *Frame, members []Session) {
	parts := min(l.cfg.FanoutWorkers, len(members)/fanoutChunk)
	if parts <= 1 {
		l.sendPart(f, members)
		return
	}
	size := (len(members) + parts - 1) / parts
	var wg sync.WaitGroup
	for p := members[size:]; len(p) > 0; {
		part := p[:min(size, len(p))]
		p = p[len(part):]
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.sendPart(f, part)
		}()
	}
	l.sendPart(f, members[:size])
	wg.Wait()
}

// sendPart is one worker's share of sendFrame; its counts go to the shared
// counters once, not per member.
func (l *Local) sendPart(f *Frame, members []Session) {
	gone, written := 0, 0
	for _, s := range members {
		var ok, direct bool
		if d, can := s.(DirectSession); can {
			ok, direct = d.SendNow(f)
		} else {
			ok = s.Send(f)
		}
		if !ok {
			gone++
		}
		if direct {
			written++
		}
	}
	if gone > 0 {
		l.gone.Add(int64(gone))
	}
	if written > 0 {
		l.direct.Add(int64(written))
	}
}

// QueueRoom is implemented by sessions whose send queue is bounded: the
// payload bytes it can take now. A join's replay that does not fit is not
// sent (Joined.Recovered false: the client re-syncs).
type QueueRoom interface{ QueueRoom() int }

func bytesOf(msgs []Msg) int {
	n := 0
	for _, m := range msgs {
		n += len(m.Bytes)
	}
	return n
}

// sendChunks hands msgs to one session in frames of the usual size (owed:
// as pushes owed from before, see Backlogged); it returns those the session
// refused (it is closing), from the first.
func (l *Local) sendChunks(msgs []Msg, s Session, owed bool) []Msg {
	for len(msgs) > 0 {
		n, size := 0, 0
		for n < len(msgs) && n < l.cfg.MaxFrameMsgs && (n == 0 || size+len(msgs[n].Bytes) <= l.cfg.MaxFrameBytes) {
			size += len(msgs[n].Bytes)
			n++
		}
		f := NewFrame(append([]Msg(nil), msgs[:n]...)...)
		if !send(s, f, owed) {
			l.gone.Add(1)
			return msgs
		}
		msgs = msgs[n:]
	}
	return nil
}

func (l *Local) userShard(u int64) *userShard { return &l.users[uint64(u)%roomShards] }

// regsOf is the count of Registers of user's shard (see userShard.regs).
func (l *Local) regsOf(user int64) uint64 { return l.userShard(user).regs.Load() }

// Register implements Router.
func (l *Local) Register(s Session) {
	// Live pushes sent to s from the moment it is reachable wait behind
	// the box's (Draining).
	defer drainStart(s)()
	l.register(s)
}

// register makes s reachable and gives it the user's offline box (Register
// without the drain's bracket: a Cluster's spans its shared list too).
func (l *Local) register(s Session) {
	us := l.userShard(s.UserID())
	us.mu.Lock()
	m := us.users[s.UserID()]
	if !slices.ContainsFunc(m, func(o Session) bool { return o.ID() == s.ID() }) {
		m = append(m, s)
		us.users[s.UserID()] = m
	}
	us.regs.Add(1)
	us.mu.Unlock()
	if a, ok := s.(Attached); ok {
		a.Attached()
	}
	// The box is drained by every session, not only a user's first: a push
	// kept while the user's only other session was closing (it refused
	// it, still registered) is taken by the next one even if that one
	// registered before the closing one left. Empty, it costs one lookup.
	// (Under a cluster the box holds what Redis could not take.)
	if msgs := l.offline.take(s.UserID(), time.Now()); len(msgs) > 0 {
		if rest := l.sendChunks(msgs, s, true); len(rest) > 0 {
			// The session was closing already: the pushes it refused go
			// back to the box (or to a session that came meanwhile).
			l.keepHere(s.UserID(), rest)
		}
	}
}

// Unregister implements Router: it also leaves every room the session joined.
func (l *Local) Unregister(s Session) {
	us := l.userShard(s.UserID())
	us.mu.Lock()
	if m := us.users[s.UserID()]; m != nil {
		if i := slices.IndexFunc(m, func(o Session) bool { return o.ID() == s.ID() }); i >= 0 {
			m = slices.Delete(m, i, i+1)
		}
		if len(m) == 0 {
			delete(us.users, s.UserID())
		} else {
			us.users[s.UserID()] = m
		}
	}
	us.mu.Unlock()
	if v, ok := l.memberOf.LoadAndDelete(s.ID()); ok {
		sr := v.(*sesRooms)
		sr.mu.Lock()
		rooms := slices.Clone(sr.rooms)
		sr.mu.Unlock()
		for _, id := range rooms {
			l.Leave(id, s)
		}
	}
}

// SendUser implements Router.
func (l *Local) SendUser(user int64, p proto.Push) (string, int) {
	if p.Mid == "" {
		p.Mid = l.mids.Next()
	}
	us := l.userShard(user)
	us.mu.RLock()
	targets := make([]Session, 0, len(us.users[user]))
	for _, s := range us.users[user] {
		targets = append(targets, s)
	}
	if len(targets) == 0 {
		// Kept under the shard lock: a Register that adds the user's
		// first session takes the box only after this put.
		if p.Ack && !l.cfg.Sequenced {
			l.keepOfflineLocked(user, encodeMsg(&p))
		}
		us.mu.RUnlock()
		return p.Mid, 0
	}
	us.mu.RUnlock()
	m := encodeMsg(&p)
	f := NewFrame(m)
	n := 0
	for _, s := range targets {
		if s.Send(f) {
			n++
		} else {
			l.gone.Add(1)
		}
	}
	if n == 0 && p.Ack && !l.cfg.Sequenced {
		// Every session of the user was closing: kept like a push to a
		// user connected nowhere — unless a session registered since the
		// targets were read (it drained the box already): keepHere sends
		// it there.
		l.keepHere(user, []Msg{m})
	}
	l.userPushes.Add(1)
	return p.Mid, n
}

// Keep implements Keeper (single node; in a cluster Cluster.Keep does).
func (l *Local) Keep(user int64, msgs []Msg) {
	if l.cfg.Sequenced {
		return
	}
	l.keepHere(user, msgs)
}

// keepHere is Keep in this node's offline box, also under a cluster (whose
// Keep uses the shared offline list; this box is its fallback when Redis
// cannot be reached).
func (l *Local) keepHere(user int64, msgs []Msg) {
	msgs = l.newest(msgs)
	us := l.userShard(user)
	for _, m := range msgs {
		for try := 0; l.sendMsg(user, m, true) == 0; try++ {
			// No session took it: kept, under the shard lock (a first
			// Register drains the box before or after this, never
			// during) — unless a session registered meanwhile: once more.
			us.mu.RLock()
			if len(us.users[user]) == 0 || try > 0 {
				l.keepOfflineLocked(user, m)
				us.mu.RUnlock()
				break
			}
			us.mu.RUnlock()
		}
	}
}

// keepOfflineLocked puts m in user's offline box (the caller holds the
// user's shard lock: a first Register drains the box before or after, never
// during), counting it dropped when the box refuses it.
func (l *Local) keepOfflineLocked(user int64, m Msg) {
	if !l.offline.put(user, m, time.Now()) {
		l.offlineDropped.Add(1)
	}
}

// newest is the last OfflineMax of msgs (the offline box keeps no more; a
// closing connection may hand on its unacked pushes and those still waiting
// in its backlog, 4,096 and more) — with the boxes off, the last MaxHandOn,
// what a session takes at once (more would close the one it goes to as a
// slow consumer).
func (l *Local) newest(msgs []Msg) []Msg {
	m := l.cfg.OfflineMax
	if m <= 0 {
		m = MaxHandOn
	}
	if len(msgs) > m {
		l.offlineDropped.Add(int64(len(msgs) - m))
		return msgs[len(msgs)-m:]
	}
	return msgs
}

// MaxHandOn bounds the pushes handed on from a closing session when no
// offline box bounds them: a gateway connection holds at most this many
// waiting (its backlog's bound when ws.offline_max is below it).
const MaxHandOn = 4096

// Stats implements Router.
func (l *Local) Stats() Stats {
	var rooms int64
	for i := range l.shards {
		l.shards[i].mu.RLock()
		rooms += int64(len(l.shards[i].rooms))
		l.shards[i].mu.RUnlock()
	}
	return Stats{
		Rooms:          rooms,
		RoomPushes:     l.roomPushes.Load(),
		UserPushes:     l.userPushes.Load(),
		FramesFanned:   l.fanned.Load(),
		FramesDirect:   l.direct.Load(),
		RoomDropped:    l.dropped.Load(),
		OfflineDropped: l.offlineDropped.Load(),
		RoomOverrun:    l.overrun.Load(),
		SessionsGone:   l.gone.Load(),
		MembersOnline:  l.members.Load(),
	}
}

// sendMsg hands an encoded push to every session of user on this node (owed:
// a push owed from before, see Backlogged).
func (l *Local) sendMsg(user int64, m Msg, owed bool) int {
	us := l.userShard(user)
	us.mu.RLock()
	targets := make([]Session, 0, len(us.users[user]))
	for _, s := range us.users[user] {
		targets = append(targets, s)
	}
	us.mu.RUnlock()
	if len(targets) == 0 {
		return 0
	}
	f := NewFrame(m)
	n := 0
	for _, s := range targets {
		if send(s, f, owed) {
			n++
		} else {
			l.gone.Add(1)
		}
	}
	l.userPushes.Add(1)
	return n
}

// roomsOf lists the rooms s has joined.
func (l *Local) roomsOf(s Session) []int64 {
	v, ok := l.memberOf.Load(s.ID())
	if !ok {
		return nil
	}
	sr := v.(*sesRooms)
	sr.mu.Lock()
	defer sr.mu.Unlock()
	return slices.Clone(sr.rooms)
}

// roomIDs lists the open rooms.
func (l *Local) roomIDs() []int64 {
	var out []int64
	for i := range l.shards {
		l.shards[i].mu.RLock()
		for id := range l.shards[i].rooms {
			out = append(out, id)
		}
		l.shards[i].mu.RUnlock()
	}
	return out
}

// userIDs lists the users with a session here.
func (l *Local) userIDs() []int64 {
	var out []int64
	for i := range l.users {
		l.users[i].mu.RLock()
		for u := range l.users[i].users {
			out = append(out, u)
		}
		l.users[i].mu.RUnlock()
	}
	return out
}

// userSessions is how many sessions user has here.
func (l *Local) userSessions(user int64) int {
	us := l.userShard(user)
	us.mu.RLock()
	defer us.mu.RUnlock()
	return len(us.users[user])
}

// userRooms lists the rooms joined by any session of user here, sorted.
func (l *Local) userRooms(user int64) []int64 {
	us := l.userShard(user)
	us.mu.RLock()
	sessions := make([]Session, 0, len(us.users[user]))
	for _, s := range us.users[user] {
		sessions = append(sessions, s)
	}
	us.mu.RUnlock()
	seen := map[int64]struct{}{}
	for _, s := range sessions {
		for _, id := range l.roomsOf(s) {
			seen[id] = struct{}{}
		}
	}
	out := make([]int64, 0, len(seen))
	for id := range seen {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}
