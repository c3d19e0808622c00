package router

import (
	"sync"
	"sync/atomic"

	"github.com/liveedge/liveedge/gateway/proto"
)

// LocalConfig configures Local. Zero values take the defaults below.
type LocalConfig struct {
	MaxPending     int // pushes queued per room before PublishRoom fails (default 8192)
	MaxFrameMsgs   int // pushes merged into one frame (default 64)
	MaxFrameBytes  int // bytes merged into one frame (default 32 KiB)
	MaxRoomsPerSes int // rooms one session may join (default 16)
}

const (
	defaultMaxPending    = 8192
	defaultMaxFrameMsgs  = 64
	defaultMaxFrameBytes = 32 << 10
	defaultMaxRooms      = 16
	roomShards           = 64
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
// Lock order: shard.mu → room.mu; sessions' own locks are never held while a
// router lock is held (Send is called outside room.mu).
type Local struct {
	cfg  LocalConfig
	mids *MidSource

	shards [roomShards]roomShard
	users  [roomShards]userShard

	roomPushes, userPushes, fanned, dropped, gone atomic.Int64
	members                                       atomic.Int64

	memberOf sync.Map // session id → *sesRooms
}

type roomShard struct {
	mu    sync.RWMutex
	rooms map[int64]*room
}

type userShard struct {
	mu    sync.RWMutex
	users map[int64]map[uint64]Session
}

type sesRooms struct {
	mu    sync.Mutex
	rooms map[int64]struct{}
}

// room is one open room. Invariant: at most one pump goroutine runs per room
// (pumping), so frames leave in publish order.
type room struct {
	id int64

	mu      sync.Mutex
	closed  bool
	members map[uint64]Session
	snap    []Session // members as a slice, rebuilt when dirty
	dirty   bool
	pending []Msg
	pumping bool
}

// NewLocal returns an in-process router; node names the mids it makes.
func NewLocal(node string, cfg LocalConfig) *Local {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = defaultMaxPending
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
	l := &Local{cfg: cfg, mids: NewMidSource(node)}
	for i := range l.shards {
		l.shards[i].rooms = map[int64]*room{}
		l.users[i].users = map[int64]map[uint64]Session{}
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
		sh.rooms[id] = &room{id: id, members: map[uint64]Session{}}
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
	r := l.room(id)
	if r == nil {
		return 0, ErrNoRoom
	}
	v, _ := l.memberOf.LoadOrStore(s.ID(), &sesRooms{rooms: map[int64]struct{}{}})
	sr := v.(*sesRooms)
	sr.mu.Lock()
	if _, in := sr.rooms[id]; !in && len(sr.rooms) >= l.cfg.MaxRoomsPerSes {
		sr.mu.Unlock()
		return 0, ErrTooManyRooms
	}
	sr.rooms[id] = struct{}{}
	sr.mu.Unlock()

	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		l.forget(s, id)
		return 0, ErrNoRoom
	}
	if _, in := r.members[s.ID()]; !in {
		r.members[s.ID()] = s
		r.dirty = true
		l.members.Add(1)
	}
	n := len(r.members)
	r.mu.Unlock()
	return n, nil
}

// Leave implements Router.
func (l *Local) Leave(id int64, s Session) {
	l.forget(s, id)
	r := l.room(id)
	if r == nil {
		return
	}
	r.mu.Lock()
	if _, in := r.members[s.ID()]; in {
		delete(r.members, s.ID())
		r.dirty = true
		l.members.Add(-1)
	}
	r.mu.Unlock()
}

func (l *Local) forget(s Session, id int64) {
	if v, ok := l.memberOf.Load(s.ID()); ok {
		sr := v.(*sesRooms)
		sr.mu.Lock()
		delete(sr.rooms, id)
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

// UserInRoom implements Router: the user's sessions are copied out of the
// user index first, so no room lock is taken under a user shard's lock.
func (l *Local) UserInRoom(id, user int64) bool {
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
	return Msg{Mid: p.Mid, Ack: p.Ack, Bytes: proto.AppendPush(make([]byte, 0, 64+len(p.Data)), p)}
}

// PublishRoom implements Router.
func (l *Local) PublishRoom(id int64, p proto.Push) (string, error) {
	r := l.room(id)
	if r == nil {
		return "", ErrNoRoom
	}
	if p.Mid == "" {
		p.Mid = l.mids.Next()
	}
	p.Room = id
	m := encodeMsg(&p)
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

// pump drains r.pending until it is empty. Only one runs per room.
func (l *Local) pump(r *room) {
	var spare []Msg
	for {
		r.mu.Lock()
		if len(r.pending) == 0 {
			r.pumping = false
			r.mu.Unlock()
			return
		}
		msgs := r.pending
		r.pending = spare[:0]
		if r.dirty {
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
		l.fanout(msgs, members)
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
		for _, s := range members {
			if !s.Send(f) {
				l.gone.Add(1)
			}
		}
		l.fanned.Add(int64(len(members)))
	}
}

func (l *Local) userShard(u int64) *userShard { return &l.users[uint64(u)%roomShards] }

// Register implements Router.
func (l *Local) Register(s Session) {
	us := l.userShard(s.UserID())
	us.mu.Lock()
	m := us.users[s.UserID()]
	if m == nil {
		m = map[uint64]Session{}
		us.users[s.UserID()] = m
	}
	m[s.ID()] = s
	us.mu.Unlock()
}

// Unregister implements Router: it also leaves every room the session joined.
func (l *Local) Unregister(s Session) {
	us := l.userShard(s.UserID())
	us.mu.Lock()
	if m := us.users[s.UserID()]; m != nil {
		delete(m, s.ID())
		if len(m) == 0 {
			delete(us.users, s.UserID())
		}
	}
	us.mu.Unlock()
	if v, ok := l.memberOf.LoadAndDelete(s.ID()); ok {
		sr := v.(*sesRooms)
		sr.mu.Lock()
		rooms := make([]int64, 0, len(sr.rooms))
		for id := range sr.rooms {
			rooms = append(rooms, id)
		}
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
	us.mu.RUnlock()
	if len(targets) == 0 {
		return p.Mid, 0
	}
	f := NewFrame(encodeMsg(&p))
	n := 0
	for _, s := range targets {
		if s.Send(f) {
			n++
		} else {
			l.gone.Add(1)
		}
	}
	l.userPushes.Add(1)
	return p.Mid, n
}

// Stats implements Router.
func (l *Local) Stats() Stats {
	var rooms int64
	for i := range l.shards {
		l.shards[i].mu.RLock()
		rooms += int64(len(l.shards[i].rooms))
		l.shards[i].mu.RUnlock()
	}
	return Stats{
		Rooms:         rooms,
		RoomPushes:    l.roomPushes.Load(),
		UserPushes:    l.userPushes.Load(),
		FramesFanned:  l.fanned.Load(),
		RoomDropped:   l.dropped.Load(),
		SessionsGone:  l.gone.Load(),
		MembersOnline: l.members.Load(),
	}
}
