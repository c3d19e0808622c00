package room

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// Status of a room.
const (
	StatusOpen   = "open"
	StatusClosed = "closed"
)

// MaxPageSize bounds GET /rooms paging.
const MaxPageSize = 100

// MaxPage is the highest page List accepts: (page-1) × page_size stays far
// from overflowing (a huge page wrapped to a negative offset and panicked).
const MaxPage = 1_000_000

// Room is the durable record of a living room.
type Room struct {
	ID       int64  `json:"room_id"`
	Type     int    `json:"type"`
	AnchorID int64  `json:"anchor_id"`
	Status   string `json:"status"`
	OpenedAt int64  `json:"opened_at"` // unix ms
	ClosedAt int64  `json:"closed_at,omitempty"`
}

// Info is a room as shown to a viewer.
type Info struct {
	Room
	Online        int    `json:"online"`
	IsAnchor      bool   `json:"is_anchor"`
	RedPacketCode string `json:"redpacket_code"`
	PKOpponent    int64  `json:"pk_opponent"`
}

// Config configures Service.
type Config struct {
	// OpenCloseInterval rate-limits open/close per anchor (0 = no limit).
	OpenCloseInterval time.Duration
	// Now is the clock (nil = time.Now).
	Now func() time.Time
	// Events, if set, is told of every open ("opened") and close ("closed")
	// after it is durable. It must not block.
	Events func(kind string, r Room)
	// Shared, if set, keeps the rooms in Redis for a whole cluster (ids,
	// one open room per anchor, the rate limit); the Service then holds a
	// replica of the open rooms, kept by Apply (other nodes' events), Sync
	// and EnsureOpen.
	Shared *Shared
}

// SetOpponent connects the PK service (room info shows the PK opponent).
func (s *Service) SetOpponent(f func(room int64) int64) { s.opponent.Store(&f) }

// SetRedPacket connects the red-packet service (room info shows the room's
// active red-packet code; f is told whether the caller is the room's
// anchor).
func (s *Service) SetRedPacket(f func(room int64, anchor bool) string) { s.redPacket.Store(&f) }

// SetOnClosed sets f, called (on the caller's goroutine, no lock held) when
// the replica learns that an open room was closed through another node
// (Apply, Sync): the PK service ends the room's contest here too.
func (s *Service) SetOnClosed(f func(room int64)) { s.onClosed.Store(&f) }

// Service manages rooms.
type Service struct {
	store    *persist.Store
	router   router.Router
	now      func() time.Time
	limit    *limit.Keyed
	interval time.Duration
	shared   *Shared
	events   func(kind string, r Room)
	opponent atomic.Pointer[func(int64) int64]
	// redPacket is the room's active red-packet code (SetRedPacket).
	redPacket atomic.Pointer[func(int64, bool) string]
	// onClosed is told of rooms closed through other nodes (SetOnClosed).
	onClosed atomic.Pointer[func(int64)]

	mu       sync.RWMutex
	open     map[int64]*Room
	byAnchor map[int64]int64 // anchor → open room id (0 = an open is in flight)
	seq      int64
	// closedAt are the rooms closed in the last recentClose: room ids are
	// never reused, so (shared mode) an "opened" for one of them is stale —
	// a Sync that read the open rooms just before the close, or a Redis
	// back from a snapshot taken before it — and is ignored; and a chat to
	// one from a former member is told 10004 (KnownClosed).
	closedAt map[int64]time.Time
}

// recentClose is how long a closed room is remembered (closedAt): a dozen
// Syncs.
const recentClose = time.Minute

// errRoomsUnread: Redis could not say whether a room is open (shared mode):
// EnsureOpen's and AnchorOf's error wraps it (with Redis's error), so each
// caller answers it as it is (50000 retry).
var errRoomsUnread = proto.Errorf(proto.CodeInternal, "rooms are briefly unavailable, retry")

// errReserved: the anchor's room was closed between the open's look-up and
// its read (a close in flight): retry.
var errReserved = proto.Errorf(proto.CodeConflict, "the anchor's room is being closed, retry")

// New loads rooms from store and re-opens the open ones in r.
func New(store *persist.Store, r router.Router, cfg Config) (*Service, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Events == nil {
		cfg.Events = func(string, Room) {}
	}
	s := &Service{
		store: store, router: r, now: cfg.Now, events: cfg.Events, shared: cfg.Shared,
		interval: cfg.OpenCloseInterval, open: map[int64]*Room{}, byAnchor: map[int64]int64{},
	}
	if s.shared != nil {
		return s, s.Sync()
	}
	if cfg.OpenCloseInterval > 0 {
		s.limit = limit.New(1, cfg.OpenCloseInterval, 1, cfg.Now)
	}
	if b, err := store.Get(persist.SeqKey("room")); err == nil {
		s.seq = int64(persist.DecodeUint64(b))
	} else if !errors.Is(err, persist.ErrNotFound) {
		return nil, err
	}
	err := store.Scan(persist.PrefixRoom, func(k, v []byte) error {
		var rm Room
		if err := proto.Unmarshal(v, &rm); err != nil {
			return err
		}
		s.seq = max(s.seq, rm.ID)
		if rm.Status == StatusOpen {
			s.open[rm.ID] = &rm
			s.byAnchor[rm.AnchorID] = rm.ID
			r.OpenRoom(rm.ID)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// PruneClosed deletes, on a single node, the records of rooms closed
// before before (a cluster's Redis expires them itself: ClosedRecordTTL);
// GET of such a room then answers 10004, as in a cluster. Before, every
// room ever opened kept its record for good, and every start read them all.
// A pass deletes at most maxPrunedRooms (the next one goes on); a deletion
// lost in a crash is made again by the next pass. It returns how many it
// deleted.
func (s *Service) PruneClosed(before time.Time) (int, error) {
	if s.shared != nil {
		return 0, nil
	}
	cut := before.UnixMilli()
	var keys [][]byte
	err := s.store.ScanRange(persist.PrefixRoom, persist.PrefixEnd(persist.PrefixRoom), func(k, v []byte) (bool, error) {
		var rm Room
		if err := proto.Unmarshal(v, &rm); err != nil {
			return false, err
		}
		if rm.Status == StatusClosed && rm.ClosedAt < cut {
			keys = append(keys, bytes.Clone(k))
		}
		return len(keys) < maxPrunedRooms, nil
	})
	if err != nil {
		return 0, err
	}
	for _, k := range keys {
		if err := s.store.DeleteNoSync(k); err != nil {
			return 0, err
		}
	}
	return len(keys), nil
}

// maxPrunedRooms bounds the closed rooms' records one PruneClosed pass
// deletes (and holds the keys of).
const maxPrunedRooms = 100_000

func (s *Service) save(rm *Room) error {
	v, err := proto.Marshal(rm)
	if err != nil {
		return err
	}
	return s.store.Put(persist.Key(persist.PrefixRoom, uint64(rm.ID)), v)
}

// Open opens a room of typ for anchor. If the anchor already has an open room,
// that room is returned (opening is idempotent).
func (s *Service) Open(anchor int64, typ int) (Room, error) {
	if typ < 0 {
		return Room{}, proto.BadRequest("type must be >= 0")
	}
	if s.shared != nil {
		s.mu.RLock()
		seen := s.seq
		s.mu.RUnlock()
		rm, created, err := s.shared.open(anchor, typ, s.now(), s.interval, seen)
		if err != nil {
			return Room{}, err
		}
		s.Apply("opened", rm)
		if created {
			s.events("opened", rm)
		}
		return rm, nil
	}
	s.mu.Lock()
	if id, ok := s.byAnchor[anchor]; ok {
		s.mu.Unlock()
		if id == 0 {
			return Room{}, proto.Errorf(proto.CodeConflict, "an open is already in flight")
		}
		return s.mustGetOpen(id)
	}
	if !s.limit.Allow(uint64(anchor)) {
		s.mu.Unlock()
		return Room{}, proto.ErrRateLimited
	}
	s.seq++
	rm := &Room{ID: s.seq, Type: typ, AnchorID: anchor, Status: StatusOpen, OpenedAt: s.now().UnixMilli()}
	s.byAnchor[anchor] = 0 // reserve
	seq := s.seq
	s.mu.Unlock()

	err := s.store.Apply(func(b *persist.Batch) error {
		v, err := proto.Marshal(rm)
		if err != nil {
			return err
		}
		if err := b.Set(persist.Key(persist.PrefixRoom, uint64(rm.ID)), v, nil); err != nil {
			return err
		}
		return b.Set(persist.SeqKey("room"), persist.EncodeUint64(uint64(seq)), nil)
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		delete(s.byAnchor, anchor)
		return Room{}, err
	}
	s.router.OpenRoom(rm.ID)
	s.open[rm.ID] = rm
	s.byAnchor[anchor] = rm.ID
	s.events("opened", *rm)
	return *rm, nil
}

func (s *Service) mustGetOpen(id int64) (Room, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if rm, ok := s.open[id]; ok {
		return *rm, nil
	}
	return Room{}, errReserved
}

// Close closes room id on behalf of anchor: its viewers get biz 5559 and are
// removed; later joins fail with 10004.
func (s *Service) Close(anchor, id int64) error {
	return s.closeAs(anchor, id, "closed by anchor", true)
}

// CloseByAdmin closes room id whoever its anchor (a moderator ending a
// stream): as its anchor would, the reason "closed by an admin", outside
// the anchor's open/close rate (a stream ended right after it began); 10004
// when the room is not open (asked of Redis in a cluster, as a join is: this
// node's list may not have it yet).
func (s *Service) CloseByAdmin(id int64) error {
	anchor, ok, err := s.AnchorOf(id)
	if err != nil {
		return err
	}
	if !ok {
		return proto.ErrNotFound
	}
	return s.closeAs(anchor, id, "closed by an admin", false)
}

// closeAs closes room id of anchor, pushing reason; limited: counted in the
// anchor's open/close rate.
func (s *Service) closeAs(anchor, id int64, reason string, limited bool) error {
	interval := s.interval
	if !limited {
		interval = 0
	}
	if s.shared != nil {
		closed, err := s.shared.close(anchor, id, s.now(), interval)
		if err != nil {
			return err
		}
		s.mu.Lock()
		delete(s.open, id)
		if s.byAnchor[anchor] == id {
			delete(s.byAnchor, anchor)
		}
		s.noteClosedLocked(id)
		s.mu.Unlock()
		// Open here first (a no-op when it is): a node that had not learnt
		// of the room yet (its list ~5 s behind) sent no final push — the
		// router refuses a push for a room it does not know — and the
		// members on the other nodes were removed without biz 5559.
		s.router.OpenRoom(id)
		d, _ := proto.Marshal(proto.RoomClosedPush{RoomID: id, Reason: reason})
		s.router.CloseRoom(id, &proto.Push{Biz: proto.BizRoomClosed, Data: d, Ack: false})
		s.events("closed", closed)
		return nil
	}
	s.mu.Lock()
	rm, ok := s.open[id]
	if !ok {
		s.mu.Unlock()
		if _, err := s.load(id); err == nil {
			return proto.Errorf(proto.CodeConflict, "room already closed")
		}
		return proto.ErrNotFound
	}
	if rm.AnchorID != anchor {
		s.mu.Unlock()
		return proto.Errorf(proto.CodeForbidden, "not the room's anchor")
	}
	if limited && !s.limit.Allow(uint64(anchor)) {
		s.mu.Unlock()
		return proto.ErrRateLimited
	}
	delete(s.open, id)
	s.byAnchor[anchor] = 0 // no new open until this close is durable
	closed := *rm
	closed.Status, closed.ClosedAt = StatusClosed, s.now().UnixMilli()
	s.mu.Unlock()

	err := s.save(&closed)
	s.mu.Lock()
	if err != nil {
		s.open[id] = rm
		s.byAnchor[anchor] = id
		s.mu.Unlock()
		return err
	}
	delete(s.byAnchor, anchor)
	s.noteClosedLocked(id)
	s.mu.Unlock()
	d, _ := proto.Marshal(proto.RoomClosedPush{RoomID: id, Reason: reason})
	s.router.CloseRoom(id, &proto.Push{Biz: proto.BizRoomClosed, Data: d, Ack: false})
	s.events("closed", closed)
	return nil
}

func (s *Service) load(id int64) (Room, error) {
	if s.shared != nil {
		rm, err := s.shared.load(id)
		if errors.Is(err, proto.ErrNotFound) {
			return rm, persist.ErrNotFound
		}
		return rm, err
	}
	var rm Room
	v, err := s.store.Get(persist.Key(persist.PrefixRoom, uint64(id)))
	if err != nil {
		return rm, err
	}
	err = proto.Unmarshal(v, &rm) // before rm is read: the order of a return's operands is not the spec's
	return rm, err
}

// Get returns room id as seen by viewer (open or closed); 10004 if unknown.
func (s *Service) Get(id, viewer int64) (Info, error) {
	if id <= 0 {
		return Info{}, proto.ErrNotFound
	}
	s.mu.RLock()
	rm, ok := s.open[id]
	var r Room
	if ok {
		r = *rm
	}
	s.mu.RUnlock()
	if !ok {
		var err error
		if r, err = s.load(id); err != nil {
			if errors.Is(err, persist.ErrNotFound) {
				return Info{}, proto.ErrNotFound
			}
			return Info{}, err
		}
	}
	return s.info(r, viewer), nil
}

func (s *Service) info(r Room, viewer int64) Info {
	in := Info{Room: r, IsAnchor: viewer != 0 && viewer == r.AnchorID}
	if r.Status == StatusOpen {
		in.Online = s.router.Online(r.ID)
		if f := s.opponent.Load(); f != nil {
			in.PKOpponent = (*f)(r.ID)
		}
		if f := s.redPacket.Load(); f != nil {
			in.RedPacketCode = (*f)(r.ID, in.IsAnchor)
		}
	}
	return in
}

// AnchorOf returns the anchor of room id while it is open (ok false: not
// open). In a cluster a room this node's replica does not have yet (opened
// through another node a moment ago: its event on its way, the next Sync
// seconds off) is asked of Redis (EnsureOpen: an error when Redis could not
// say) — before, a rain created through this node right after the room's
// open elsewhere was 10004.
func (s *Service) AnchorOf(id int64) (anchor int64, ok bool, err error) {
	if anchor, ok = s.replicaAnchor(id); ok {
		return anchor, true, nil
	}
	if open, err := s.EnsureOpen(id); !open || err != nil {
		return 0, false, err
	}
	anchor, ok = s.replicaAnchor(id)
	return anchor, ok, nil
}

// replicaAnchor is AnchorOf from this node's replica only.
func (s *Service) replicaAnchor(id int64) (int64, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if rm, open := s.open[id]; open {
		return rm.AnchorID, true
	}
	return 0, false
}

// KnownClosed reports whether room id is known closed: on a single node
// any id it gave out that is not open (ids are never reused); in a cluster
// one closed lately (recentClose), here or through another node — a room
// this node's list has not caught up with is not.
func (s *Service) KnownClosed(id int64) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if _, open := s.open[id]; open {
		return false
	}
	if s.shared == nil {
		return id > 0 && id <= s.seq
	}
	_, closed := s.closedAt[id]
	return closed
}

// IsOpen reports whether room id is open.
func (s *Service) IsOpen(id int64) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	_, ok := s.open[id]
	return ok
}

// List returns open rooms of typ (typ < 0: every type), newest first, page ≥ 1,
// 1 ≤ pageSize ≤ 100, and the total count.
func (s *Service) List(typ, page, pageSize int, viewer int64) ([]Info, int, error) {
	if page < 1 || page > MaxPage {
		return nil, 0, proto.BadRequest("page must be in 1..%d", MaxPage)
	}
	if pageSize < 1 || pageSize > MaxPageSize {
		return nil, 0, proto.BadRequest("page_size must be in 1..%d", MaxPageSize)
	}
	s.mu.RLock()
	rooms := make([]Room, 0, len(s.open))
	for _, rm := range s.open {
		if typ < 0 || rm.Type == typ {
			rooms = append(rooms, *rm)
		}
	}
	s.mu.RUnlock()
	sort.Slice(rooms, func(i, j int) bool { return rooms[i].ID > rooms[j].ID })
	total := len(rooms)
	from := (page - 1) * pageSize
	if from >= total {
		return []Info{}, total, nil
	}
	to := min(from+pageSize, total)
	// Each room's info may ask Redis (its online count elsewhere, a running
	// rain), each call bounded: asked together, a page waits as long as its
	// slowest room, not as long as all of them in turn (a Redis that stopped
	// answering held one request for minutes).
	out := make([]Info, to-from)
	var wg sync.WaitGroup
	for i, r := range rooms[from:to] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = s.info(r, viewer)
		}()
	}
	wg.Wait()
	return out, total, nil
}

// Apply brings the replica up to date with an open or close made anywhere in
// the cluster (idempotent; kind "opened" or "closed"). A close reaches the
// router without a final push: the node that closed the room sent that.
func (s *Service) Apply(kind string, rm Room) {
	s.mu.Lock()
	s.seq = max(s.seq, rm.ID) // the highest id seen: a floor if Redis loses the counter
	switch kind {
	case "opened":
		if _, ok := s.open[rm.ID]; ok {
			s.mu.Unlock()
			return
		}
		if _, ok := s.closedAt[rm.ID]; ok {
			s.mu.Unlock()
			return // closed already: a stale "opened"
		}
		r := rm
		s.open[rm.ID] = &r
		s.byAnchor[rm.AnchorID] = rm.ID
		s.mu.Unlock()
		s.router.OpenRoom(rm.ID)
	case "closed":
		_, ok := s.open[rm.ID]
		delete(s.open, rm.ID)
		if s.byAnchor[rm.AnchorID] == rm.ID {
			delete(s.byAnchor, rm.AnchorID)
		}
		s.noteClosedLocked(rm.ID)
		s.mu.Unlock()
		if ok {
			s.router.CloseRoom(rm.ID, nil)
			if f := s.onClosed.Load(); f != nil {
				(*f)(rm.ID)
			}
		}
	default:
		s.mu.Unlock()
	}
}

// noteClosedLocked remembers room id as closed for recentClose, and
// forgets what is older (s.mu held; shared mode only: a single node's
// replica is its own).
func (s *Service) noteClosedLocked(id int64) {
	now := s.now()
	if s.closedAt == nil {
		s.closedAt = map[int64]time.Time{}
	}
	for k, at := range s.closedAt {
		if now.Sub(at) > recentClose {
			delete(s.closedAt, k)
		}
	}
	s.closedAt[id] = now
}

// Sync replaces the replica with the open rooms in Redis (shared mode): at
// start, and periodically to repair events a node missed.
func (s *Service) Sync() error {
	if s.shared == nil {
		return nil
	}
	rooms, lost, err := s.shared.openRooms()
	if err != nil {
		return err
	}
	if lost {
		// Redis came back without the rooms: put back what this node knows
		// instead of closing every room (the other nodes do the same).
		s.mu.RLock()
		known := make([]Room, 0, len(s.open))
		for _, rm := range s.open {
			known = append(known, *rm)
		}
		s.mu.RUnlock()
		if len(known) == 0 {
			return nil
		}
		return s.putBack(known)
	}
	now := make(map[int64]Room, len(rooms))
	for _, rm := range rooms {
		now[rm.ID] = rm
		s.Apply("opened", rm)
	}
	s.mu.RLock()
	var gone []Room
	for id, rm := range s.open {
		if _, ok := now[id]; !ok {
			gone = append(gone, *rm)
		}
	}
	s.mu.RUnlock()
	var missing []Room
	for _, rm := range gone {
		// Opened (or learned) after the snapshot was read? Close only what
		// Redis says is closed.
		switch cur, err := s.shared.load(rm.ID); {
		case err == nil && cur.Status == StatusClosed:
			s.Apply("closed", cur)
		case errors.Is(err, proto.ErrNotFound):
			// Redis has no record of an open room at all (a closed one's
			// is kept for ClosedRecordTTL): it came back from a snapshot
			// older than the room. Put it back, as when Redis lost every
			// room — else it stays open in every replica and no one can
			// close it (close.lua: unknown room), and its anchor could
			// open a second one.
			missing = append(missing, rm)
		}
	}
	if len(missing) > 0 {
		return s.putBack(missing)
	}
	return nil
}

// putBack writes rooms back into Redis (shared.restore); one whose anchor
// opened another room meanwhile closes here (the other nodes close it at
// their Sync: it is not in Redis, and its anchor has another room).
func (s *Service) putBack(rooms []Room) error {
	closed, err := s.shared.restore(rooms)
	for _, rm := range closed {
		s.Apply("closed", rm)
	}
	return err
}

// EnsureOpen reports whether room id is open, asking Redis (shared mode) when
// the replica does not know it yet (an open through another node whose event
// has not arrived); an error when Redis could not say (the caller answers
// "retry", not "no such room" — which a client takes as final).
func (s *Service) EnsureOpen(id int64) (bool, error) {
	if s.IsOpen(id) {
		return true, nil
	}
	if s.shared == nil || id <= 0 {
		return false, nil
	}
	rm, err := s.shared.load(id)
	if errors.Is(err, proto.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("%w (%v)", errRoomsUnread, err) // answered as errRoomsUnread (proto.AsError)
	}
	if rm.Status != StatusOpen {
		return false, nil
	}
	s.Apply("opened", rm)
	return s.IsOpen(id), nil // not a room closed here a moment ago
}
