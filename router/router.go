package router

import (
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Errors returned by a Router.
var (
	ErrNoRoom       = errors.New("router: room not open")
	ErrRoomBusy     = errors.New("router: room queue full")
	ErrTooManyRooms = errors.New("router: session is in too many rooms")
)

// Session is a local connection as the router sees it. Implemented by the
// gateway's connection.
type Session interface {
	// ID is unique among the node's live sessions.
	ID() uint64
	// UserID is the authenticated user.
	UserID() int64
	// Send queues f for writing and never blocks. It returns false when the
	// session is closing (its queue overflowed or it is gone); the router then
	// stops sending to it.
	Send(f *Frame) bool
}

// DirectSession is a Session that a room's fan-out may ask to write a frame
// at once, on the fan-out's goroutine, when it has nothing queued — without
// waking a writer goroutine per receiver (one frame to thousands of idle
// viewers is the common case of a live room). SendNow never blocks either:
// what cannot be written at once is queued, with Send's ordering and bounds.
// ok is Send's result; direct reports that f was written, not queued.
type DirectSession interface {
	Session
	SendNow(f *Frame) (ok, direct bool)
}

// Router owns room membership and delivers pushes to sessions. A single node
// uses Local; a later cluster router backs the same interface with NATS + Redis.
//
// Promises: pushes published to one room reach each member in publish order;
// a push is encoded once per node, not once per receiver; no call blocks on a
// slow session.
type Router interface {
	// OpenRoom makes room joinable. Idempotent.
	OpenRoom(room int64)
	// CloseRoom publishes final (if non-nil) to the room, then removes every
	// member; later joins fail with ErrNoRoom.
	CloseRoom(room int64, final *proto.Push)
	// Join adds s to room and returns the room's online count.
	Join(room int64, s Session) (online int, err error)
	// JoinAt is Join for a client that knows its position since (nil: a
	// fresh join). The room's pushes after since that are still kept are
	// queued to s, in order, before any later push (Recovered); when they
	// are not kept, or since is in another epoch, Recovered is false and the
	// client re-syncs.
	JoinAt(room int64, s Session, since *proto.Position) (Joined, error)
	// Leave removes s from room (no-op if absent).
	Leave(room int64, s Session)
	// IsMember reports whether s has joined room.
	IsMember(room int64, s Session) bool
	// Online is the number of sessions in room.
	Online(room int64) int
	// UserInRoom reports whether user has a session that joined room (a
	// Local: on this node; a Cluster: on any live node). An error: it could
	// not be read (a cluster's Redis did not answer) — unknown, not "not in
	// the room".
	UserInRoom(room, user int64) (bool, error)
	// PublishRoom queues p for every member of room, in order. A zero Mid is
	// filled in; the mid is returned.
	PublishRoom(room int64, p proto.Push) (mid string, err error)
	// Register / Unregister index a session by user for SendUser.
	Register(s Session)
	Unregister(s Session)
	// SendUser sends p to every session of user on this node and returns how
	// many sessions it reached. A zero Mid is filled in.
	SendUser(user int64, p proto.Push) (mid string, reached int)
	// Stats is a snapshot of counters for metrics.
	Stats() Stats
}

// Attached is a Session told when Register has made it reachable (SendUser
// finds it), before the user's offline pushes are sent to it: the gateway
// writes nothing to the connection, its hello first, until then, so a client
// that has its hello is reachable.
type Attached interface {
	Attached()
}

// Backlogged is a Session that takes pushes owed from before — a user's
// offline pushes, those handed on from their closed sessions — behind its
// send queue, moving them in as the queue drains, rather than all at once: a
// backlog larger than the queue's bound does not close it as a slow
// consumer. False: the session is closing and did not take f (the caller
// keeps its pushes).
type Backlogged interface {
	SendBacklog(f *Frame) bool
}

// Draining is a Backlogged session told while Register gathers the pushes
// owed to its user (the offline box; in a cluster, then the shared list):
// from DrainStart to DrainDone the live reliable user pushes sent to it wait
// behind every owed push it is given, even one given after them — a push
// made while the user was reconnecting never overtakes an older one kept for
// them (an order's status never goes back). Once per session.
type Draining interface {
	DrainStart()
	DrainDone()
}

// drainStart starts s's drain (Draining) and returns what ends it.
func drainStart(s Session) (done func()) {
	if d, ok := s.(Draining); ok {
		d.DrainStart()
		return d.DrainDone
	}
	return func() {}
}

// send hands s frame f; owed: of pushes owed from before (see Backlogged).
func send(s Session, f *Frame, owed bool) bool {
	if b, ok := s.(Backlogged); ok && owed {
		return b.SendBacklog(f)
	}
	return s.Send(f)
}

// Keeper is a Router that can hand a user's reliable pushes on again. The
// gateway gives it the user pushes a closing connection had not seen
// acked (queued, or written and not acked): they were "sent", so SendUser
// kept nothing of them.
type Keeper interface {
	// Keep sends msgs (reliable user pushes: Ack, Off 0, their mids kept)
	// again as SendUser would: to the user's sessions (a session that had
	// them already drops them by mid), or to the offline box for the
	// user's next connect when no session can take them.
	Keep(user int64, msgs []Msg)
}

// Joined is the outcome of JoinAt.
type Joined struct {
	Online    int    // sessions in the room (the whole cluster's in a cluster)
	Off       int64  // the room's offset the session is at: later pushes follow
	Ep        string // the room's epoch
	Recovered bool   // since was given and every push after it was replayed
}

// Stats are cumulative counters and gauges of a Router.
type Stats struct {
	Rooms        int64 // open rooms (gauge)
	RoomPushes   int64 // pushes published to rooms
	UserPushes   int64 // pushes sent to users
	FramesFanned int64 // frames handed to sessions
	FramesDirect int64 // of those, written at once by the fan-out (DirectSession)
	RoomDropped  int64 // pushes refused because a room queue was full
	// RoomOverrun: pushes numbered by the cluster dropped from a room's
	// queue here, the oldest first, because the room's fan-out on this
	// node fell MaxPending behind (its members see a gap and re-sync).
	RoomOverrun  int64
	SessionsGone int64 // sends refused by a closing session
	// OfflineDropped: reliable user pushes dropped for the bounds of what
	// is kept for a user (the offline box full, the newest of a hand-on
	// kept).
	OfflineDropped int64
	MembersOnline  int64 // room memberships (gauge)
}

// Msg is one encoded server frame inside a Frame.
type Msg struct {
	Mid   string // "" for replies
	Ack   bool   // reliable push: the receiver must ack Mid
	Off   int64  // a room push's offset (0 otherwise)
	Bytes []byte // the encoded frame (JSON object)
}

// Frame is an immutable group of encoded messages shared by every receiver of a
// fan-out. Receivers that accept batch frames write it as one WebSocket frame
// (Batch); the others write each Msg as its own frame.
type Frame struct {
	Msgs []Msg
	size int

	once  sync.Once
	batch []byte

	wireOnce sync.Once
	wire     []byte
}

// NewFrame wraps msgs.
func NewFrame(msgs ...Msg) *Frame {
	f := &Frame{Msgs: msgs}
	for _, m := range msgs {
		f.size += len(m.Bytes)
	}
	return f
}

// Size is the number of payload bytes (for queue accounting).
func (f *Frame) Size() int { return f.size }

// Batch returns the single-frame encoding: the message itself when there is
// one, else {"t":"batch","d":[...]}. Built once, shared by all receivers.
func (f *Frame) Batch() []byte {
	if len(f.Msgs) == 1 {
		return f.Msgs[0].Bytes
	}
	f.once.Do(func() {
		parts := make([][]byte, len(f.Msgs))
		for i := range f.Msgs {
			parts[i] = f.Msgs[i].Bytes
		}
		f.batch = proto.AppendBatch(make([]byte, 0, f.size+len(f.Msgs)+24), parts)
	})
	return f.batch
}

// Wire returns enc(f.Batch()), built once for every receiver: the frame as
// one transport frame (the gateway's WebSocket frame), written as is.
func (f *Frame) Wire(enc func([]byte) []byte) []byte {
	f.wireOnce.Do(func() { f.wire = enc(f.Batch()) })
	return f.wire
}

// MidSource makes push ids unique across nodes and restarts:
// "<node>.<boot ms base36>.<seq base36>".
type MidSource struct {
	prefix string
	seq    atomic.Uint64
}

// NewMidSource returns a MidSource for node.
func NewMidSource(node string) *MidSource {
	return &MidSource{prefix: sanitizeNode(node) + "." + strconv.FormatInt(time.Now().UnixMilli(), 36) + "."}
}

// Next returns a fresh mid.
func (m *MidSource) Next() string {
	return m.prefix + strconv.FormatUint(m.seq.Add(1), 36)
}

// sanitizeNode keeps mids JSON-safe whatever the node id is.
func sanitizeNode(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			b[i] = '_'
		}
	}
	return string(b)
}
