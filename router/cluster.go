package router

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/keylock"
	"github.com/liveedge/liveedge/gateway/proto"
)

// ClusterConfig configures Cluster. Zero values take the defaults named.
type ClusterConfig struct {
	Node  string
	Local LocalConfig // Sequenced is forced on
	// NATS is a connection of the router's own, made with nats.NoEcho(): a
	// node never receives what it published (it delivered that locally).
	NATS  *nats.Conn
	Redis rueidis.Client
	// HistorySize / HistoryTTL bound each room's shared history in Redis
	// (defaults: Local.HistorySize, at least 4 sequencer batches (1,024);
	// Local.HistoryTTL, counted from the room's last push).
	HistorySize int
	HistoryTTL  time.Duration
	// EpochTTL is how long a room's epoch and counter stay in Redis after
	// its last push, or a node's subscribing to it (default 24 h, at least
	// HistoryTTL): a room
	// quiet for less keeps its epoch — its next push follows the offsets
	// its viewers have, not a new epoch that every one of them would
	// re-sync from. Its history still ages out after HistoryTTL.
	EpochTTL time.Duration
	// GapWait is how long a node waits for a missing offset before it reads
	// it from the shared history (default 100 ms).
	GapWait time.Duration
	// PresenceTTL: a node's presence entries count while its alive key,
	// refreshed every third of this, lives (default 10 s).
	PresenceTTL time.Duration
	// Linger keeps a room's subscription this long after its last local
	// member left (default 30 s).
	Linger time.Duration
	// CallTimeout bounds each Redis call (default 2 s).
	CallTimeout time.Duration
	Log         *slog.Logger
}

// defaultEpochTTL is ClusterConfig.EpochTTL's default.
const defaultEpochTTL = 24 * time.Hour

// Redis keys (one hash tag per room or user, so every script touches one
// Redis Cluster slot).
func seqKey(room int64) string    { return "le:r:{" + strconv.FormatInt(room, 10) + "}:seq" }
func epKey(room int64) string     { return "le:r:{" + strconv.FormatInt(room, 10) + "}:ep" }
func histKey(room int64) string   { return "le:r:{" + strconv.FormatInt(room, 10) + "}:h" }
func batchKey(room int64) string  { return "le:r:{" + strconv.FormatInt(room, 10) + "}:nb" }
func onlineKey(room int64) string { return "le:on:{" + strconv.FormatInt(room, 10) + "}" }
func userKey(user int64) string   { return "le:up:{" + strconv.FormatInt(user, 10) + "}" }
func connsKey(user int64) string  { return "le:uc:{" + strconv.FormatInt(user, 10) + "}" }
func aliveKey(node string) string { return "le:alive:" + node }

// NodeIDInUse reports whether another running process holds node's alive key:
// watched for one heartbeat period (ttl/3, and some slack), it is refreshed.
// A key left by a process of this node.id that died (kill -9) is not — the
// start goes on, after that wait; a graceful stop deletes the key (no wait).
// Redis not answering: false (the start's next steps report it).
func NodeIDInUse(ctx context.Context, rdb rueidis.Client, node string, ttl time.Duration) bool {
	if ttl <= 0 {
		ttl = 10 * time.Second
	}
	deadline := time.Now().Add(ttl/3 + 500*time.Millisecond)
	last := int64(-1)
	for {
		pttl, err := rdb.Do(ctx, rdb.B().Pttl().Key(aliveKey(node)).Build()).AsInt64()
		switch {
		case err != nil || pttl < 0: // unreachable, or no such key
			return false
		case last >= 0 && pttl > last+50: // refreshed meanwhile
			return true
		case time.Now().After(deadline):
			return false
		}
		last = pttl
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func roomSubject(room int64) string { return "le.r." + strconv.FormatInt(room, 10) }
func userSubject(user int64) string { return "le.u." + strconv.FormatInt(user, 10) }

//go:embed lua/sequence.lua
var sequenceLua string

var sequenceScript = rueidis.NewLuaScript(sequenceLua)

//go:embed lua/history.lua
var historyLua string

var historyScript = rueidis.NewLuaScript(historyLua)

//go:embed lua/drain.lua
var drainLua string

var drainScript = rueidis.NewLuaScript(drainLua)

//go:embed lua/release.lua
var releaseLua string

var releaseScript = rueidis.NewLuaScript(releaseLua)

func offlineKey(user int64) string { return "le:off:{" + strconv.FormatInt(user, 10) + "}" }

// leaseKey holds the user's offline pushes taken by drains not yet
// released (drain.lua).
func leaseKey(user int64) string { return "le:off:{" + strconv.FormatInt(user, 10) + "}:l" }

//go:embed lua/position.lua
var positionLua string

var positionScript = rueidis.NewLuaScript(positionLua)

// closeGrace is how long a room closed through another node stays open
// here for that node's final push to arrive.
const closeGrace = 3 * time.Second

// minSharedHistory is the least a room's Redis history keeps (4 batches).
const minSharedHistory = 4 * maxSeqBatch

const (
	// maxPendingBytes bounds the bytes of a room's pushes waiting for the
	// sequencer (with MaxPending, their count): pushes wait while Redis
	// does not answer (roomForLocked: what happens at the bound).
	maxPendingBytes = 8 << 20
	// maxSeqRetryWait caps the backoff between numbering attempts of a
	// batch Redis did not answer (100 ms, doubled).
	maxSeqRetryWait = time.Second
)

const (
	maxSeqBatch   = 256  // pushes numbered by one script call
	maxGapBuffer  = 4096 // pushes held while a gap is open; beyond, it is filled now
	maxStash      = 4096 // pushes held while a room's subscription starts
	presenceEvery = 200 * time.Millisecond
	// presenceKeep bounds how long a presence hash outlives its last write
	// (every live node rewrites its entries every presenceRewrite), so the
	// entries of nodes that never came back go.
	presenceKeep    = 24 * time.Hour
	presenceRewrite = 6 * time.Hour
)

var _ Router = (*Cluster)(nil)

// Cluster is the Router of one node of a cluster: Local for the node's own
// sessions, NATS between nodes, Redis for what all nodes share.
//
// Room pushes: PublishRoom queues the push on the room's sequencer (one
// goroutine per busy room on the publishing node). The sequencer numbers a
// batch of pending pushes with one Lua script (INCRBY of the room's counter
// and XADD of each push into the room's capped history stream, atomically),
// encodes them once with their offsets and publishes ONE NATS message on
// le.r.<room>. Every node with members of the room is subscribed to that
// subject (interest-based: a node subscribes when its first member joins and
// unsubscribes Linger after its last leaves), so the message costs one
// delivery per node with members. Each node delivers a room's pushes to Local
// strictly in offset order: a batch ahead of the next expected offset waits
// GapWait for the missing ones, then they are read from the history stream;
// a tail loss is found by a sweep comparing the room's counter with the last
// offset delivered (and at once after a NATS reconnect). The order is thus the
// counter's: the same on every node. A batch whose numbering fails (Redis
// unreachable, slow past CallTimeout) is retried whole, with the same batch
// number, until Redis answers or the room closes here; the room's later
// pushes wait behind it, bounded (retryBatch, roomForLocked).
//
// Users: each node subscribes le.u.<user> for the users it holds; SendUser
// delivers locally and publishes once to that subject. Reliable pushes are
// resent by the node that holds the connection, until acked there.
//
// Presence: per room a hash node → "<boot>:<local members>", per user a hash
// node → "<boot>|<rooms>", written by each node for its own sessions (dirty
// entries every 200 ms); an entry counts only while le:alive:<node> holds the
// same boot, so a dead node's entries stop counting within PresenceTTL. Reads
// go through rueidis client-side caching (invalidated by Redis on change).
//
// Lock order: Cluster.mu → croom.mu → Local's locks. No NATS or Redis call is
// made under Cluster.mu; croom.mu is held across Local.Deliver (which only
// queues) but never across I/O.
type Cluster struct {
	cfg   ClusterConfig
	local *Local
	nc    *nats.Conn
	rdb   rueidis.Client
	log   *slog.Logger
	boot  string
	// behindLogged: when a join whose since was ahead of Redis's counter
	// was last logged (unix ns).
	behindLogged atomic.Int64

	// userq are the user subscriptions' queues (userShards, a user's always
	// the same one): their messages are handled by one goroutine per
	// queue, not by one per subscription — nats.go gives each async
	// subscription a goroutine, ~3 KB (stack and state) per connected user.
	userq []chan *nats.Msg
	// lanes hold the messages of users with one waiting for Redis (a
	// drain hint, a push kept for a user who left): each user's in order
	// on a goroutine of its own while it has any, so a slow Redis holds
	// that user's messages, never a queue's other users'. One set per
	// queue (a user's with the queue's), so queues share no lock per message.
	lanes []userLanes

	// fillMu guards stopping: once Close began, no gap fill, drain retry
	// or room sequencer starts (its wg.Add would race Close's wg.Wait). A
	// leaf lock (taken under a room's, a seqRoom's, and under redrainMu).
	fillMu   sync.Mutex
	stopping bool

	mu    sync.Mutex
	rooms map[int64]*croom   // rooms this node is subscribed to
	seqs  map[int64]*seqRoom // rooms with pushes being numbered here
	users map[int64]*cuser   // users with sessions here

	dirtyMu    sync.Mutex
	dirtyRooms map[int64]struct{}
	dirtyUsers map[int64]struct{}

	// staleDrops are the dead nodes' presence fields being deleted (at
	// most maxStaleDrops at once, each once).
	staleMu    sync.Mutex
	staleDrops map[staleField]struct{}

	// handoffs are reliable pushes sent to the user's other nodes, waiting
	// for a holder's answer (handoff.go).
	handoffs handoffs

	// redrains are the users whose offline list is drained again, a drain
	// having failed (redrain): true when another failed since the retry's
	// attempt began.
	redrainMu sync.Mutex
	redrains  map[int64]bool
	// redrainWaits are the drains (DrainDone) of sessions that registered
	// while their user's list could not be drained: their live pushes wait
	// behind what a retry delivers, up to redrainHold (redrainMu).
	redrainWaits map[int64][]*drainWait
	// drains: one drain of a user's list at a time on this node (drainOnce).
	drains keylock.Map[int64]
	// reconnDraining: every local user's list is being drained after a
	// NATS reconnect (drainAfterReconnect); reconnAgain: NATS reconnected
	// again since its attempt began, reconnKick wakes its wait for that.
	reconnDraining, reconnAgain bool
	reconnKick                  chan struct{}

	stop chan struct{}
	wg   sync.WaitGroup

	// batchNo numbers this process's sequencer batches (sequence.lua
	// numbers each once).
	batchNo atomic.Uint64
	// drainNo numbers this process's offline drains (their lease tokens).
	drainNo atomic.Uint64

	stats clusterStats
}

type clusterStats struct {
	batchesOut, batchesIn, pushesSequenced, gapFills, gapsLost, seqErrors, badWire atomic.Int64
	handoffsKept, epochsForced                                                     atomic.Int64
	pushesGivenUp                                                                  atomic.Int64
}

// croom is a room this node is subscribed to. Invariant: once ready, every
// offset below next has been handed to Local (or given up as lost and
// counted); buf holds batches past a gap, sorted by first offset.
type croom struct {
	id    int64
	ready chan struct{} // closed when the subscription and position are set
	err   error         // set before ready is closed if the start failed

	joining  int // joins between subscribe and Local.JoinAt (Cluster.mu); dropIdle keeps the room
	mu       sync.Mutex
	dead     bool // dropped: late callbacks, timers and fills do nothing
	sub      *nats.Subscription
	ep       string
	prevEp   string
	prevNext int64 // next in prevEp when the room left it (checkTails may go back)
	next     int64
	// seqRead, seqReadEp: the room's counter in Redis as a join last read
	// it (behindSince), in that epoch: a join whose since is within it
	// needs no read.
	seqRead   int64
	seqReadEp string
	buf       []roomBatch
	buffered  int
	stash     []roomBatch // batches that arrived before ready
	gapArmed  bool
	filling   bool
	lastAct   time.Time
	idleFrom  time.Time // when the last local member left (zero: members)
	// suspect: a batch of the room's epoch came with offsets this node had
	// delivered already — a duplicate, or Redis went back and numbered them
	// again: the next tail sweep checks the room whatever its activity.
	suspect bool
}

type cuser struct {
	sub         *nats.Subscription
	subscribing bool
	sessions    int
	gen         int // bumped when the last session leaves; the linger timer checks it
}

// noRedrain: keepAway from a drain (see keepAway).
const noRedrain = ^uint64(0)

// regsOf is Local.regsOf: read before a send that no session took, it
// changed if a session (of this user, or another of its shard) registered
// since — an atomic load, not the cluster's lock, on every user push.
func (c *Cluster) regsOf(user int64) uint64 { return c.local.regsOf(user) }

// userLinger keeps a user's subscription after their last session here left,
// so a push already on its way (the sender's presence read was older than the
// leave) still arrives and is kept for them (storeOffline).
const userLinger = 2 * time.Second

// seqRoom queues a room's pushes for the sequencer.
type seqRoom struct {
	mu      sync.Mutex
	pending []seqItem
	bytes   int // of pending (seqItem.size)
	running bool
	// closingAt: when the room's final push, pending, was queued (zero:
	// none is) — a batch retried ahead of it gives up in time for it.
	closingAt time.Time
	evicted   int       // pushes dropped from pending for a reliable one (logged, then zeroed)
	loggedAt  time.Time // when evictions were last logged
}

type seqItem struct {
	p       proto.Push
	closing bool
	at      time.Time  // when a closing item was queued
	done    chan error // nil: nobody waits
	size    int        // pushSize
	// state, when a caller waits (PublishRoomWait): itemQueued, then
	// itemTaken once the sequencer took it into a batch, or itemAbandoned
	// by a caller that stopped waiting first (then it is never sent);
	// itemUnwaited once a caller stopped waiting for a push taken.
	state *atomic.Int32
	// by: numbered by then or never (PublishRoomBy; zero: no bound).
	by time.Time
	// late is told the push's fate when its caller was answered before it
	// was known (PublishRoomBy); doubted: the sequencer answered it
	// "unconfirmed".
	late    func(mid string)
	doubted bool
}

// The states of a waited-for seqItem.
const (
	itemQueued int32 = iota
	itemTaken
	itemAbandoned
	itemUnwaited
)

// tell answers the push's waiter err, if it still waits.
func (it *seqItem) tell(err error) {
	if it.done != nil {
		it.done <- err
		it.done = nil
	}
}

// settle tells late the push's fate once known, after tell: its mid
// (numbered) or "" (never sent) — when its caller was answered
// "unconfirmed" or stopped waiting (an answer sent meanwhile may have gone
// unread: late then repeats it). A push given up after a failed attempt
// has no known fate: late is not called.
func (it *seqItem) settle(mid string) {
	if it.late != nil && (it.doubted || it.state.Load() == itemUnwaited) {
		it.late(mid)
	}
}

// NewCluster starts the cluster router. Close stops its loops.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	if cfg.NATS == nil || cfg.Redis == nil {
		return nil, errors.New("router: cluster needs NATS and Redis")
	}
	cfg.Local.Sequenced = true
	local := NewLocal(cfg.Node, cfg.Local) // fills the Local defaults
	// The shared history must outlast a few sequencer batches: a batch that
	// was numbered but never published (a node died, or its call timed out
	// after the script ran) is read back from it by every node, and a
	// history no longer than one batch is trimmed by the next one first.
	cfg.HistorySize = max(cfg.HistorySize, local.cfg.HistorySize, minSharedHistory)
	if cfg.HistoryTTL <= 0 {
		cfg.HistoryTTL = local.cfg.HistoryTTL
	}
	if cfg.EpochTTL <= 0 {
		cfg.EpochTTL = defaultEpochTTL
	}
	cfg.EpochTTL = max(cfg.EpochTTL, cfg.HistoryTTL)
	if cfg.GapWait <= 0 {
		cfg.GapWait = 100 * time.Millisecond
	}
	if cfg.PresenceTTL <= 0 {
		cfg.PresenceTTL = 10 * time.Second
	}
	if cfg.Linger <= 0 {
		cfg.Linger = 30 * time.Second
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 2 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	c := &Cluster{
		cfg: cfg, nc: cfg.NATS, rdb: cfg.Redis, log: cfg.Log, boot: NewEpoch(),
		rooms: map[int64]*croom{}, seqs: map[int64]*seqRoom{}, users: map[int64]*cuser{},
		dirtyRooms: map[int64]struct{}{}, dirtyUsers: map[int64]struct{}{},
		staleDrops: map[staleField]struct{}{}, redrains: map[int64]bool{}, redrainWaits: map[int64][]*drainWait{}, reconnKick: make(chan struct{}, 1),
		stop: make(chan struct{}),
	}
	c.local = local
	c.local.cfg.History = c.history
	if err := c.startHandoffs(); err != nil {
		return nil, err
	}
	c.lanes = make([]userLanes, userShards)
	for i := range c.lanes {
		c.lanes[i].m = map[int64][]*nats.Msg{}
	}
	c.userq = make([]chan *nats.Msg, userShards)
	for i := range c.userq {
		c.userq[i] = make(chan *nats.Msg, userShardCap)
		c.wg.Add(1)
		go c.userLoop(c.userq[i])
	}
	c.heartbeat(true)
	c.wg.Add(4)
	go c.heartbeatLoop()
	go c.presenceLoop()
	go c.sweepLoop()
	go c.keeper()
	return c, nil
}

// Close stops the loops and withdraws this node's presence (best effort).
// The rooms' sequencers end first: what they hold is numbered while Redis
// answers, given up from the first batch it does not (sequence) — none
// tries after Close returns.
func (c *Cluster) Close() {
	select {
	case <-c.stop:
		return
	default:
	}
	c.fillMu.Lock()
	c.stopping = true
	c.fillMu.Unlock()
	close(c.stop)
	c.wg.Wait()
	_ = c.handoffs.sub.Unsubscribe()
	c.keepUnanswered()
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.CallTimeout)
	defer cancel()
	// Withdraw this node's presence: its entries, then its alive key.
	cmds := rueidis.Commands{}
	for _, id := range c.local.roomIDs() {
		cmds = append(cmds, c.rdb.B().Hdel().Key(onlineKey(id)).Field(c.cfg.Node).Build())
	}
	for _, u := range c.local.userIDs() {
		cmds = append(cmds, c.rdb.B().Hdel().Key(userKey(u)).Field(c.cfg.Node).Build(),
			c.rdb.B().Hdel().Key(connsKey(u)).Field(c.cfg.Node).Build())
	}
	cmds = append(cmds, c.rdb.B().Del().Key(aliveKey(c.cfg.Node)).Build())
	for len(cmds) > 0 {
		n := min(len(cmds), 1024)
		_ = c.rdb.DoMulti(ctx, cmds[:n]...)
		cmds = cmds[n:]
	}
}

// Reconnected is called when the router's NATS connection is back: messages
// may have been lost meanwhile, so every room is checked against Redis now,
// and every local user's offline list is drained (pushes handed off to this
// node while it was away).
func (c *Cluster) Reconnected() {
	go c.checkTails(0)
	c.drainAfterReconnect()
}

// Local is the node-local part (for metrics and tests).
func (c *Cluster) LocalRouter() *Local { return c.local }

func (c *Cluster) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.cfg.CallTimeout)
}

// --- rooms ---

// OpenRoom implements Router (on this node; every node opens every open room).
func (c *Cluster) OpenRoom(id int64) { c.local.OpenRoom(id) }

// CloseRoom implements Router. With a final push, the push is numbered and
// sent to every node, each of which closes its local room after delivering
// it; without one (the room was closed through another node), the local room
// closes now.
func (c *Cluster) CloseRoom(id int64, final *proto.Push) {
	if final == nil {
		// Closed through another node, whose final push (biz 5559) is on
		// its way after a Redis round trip: its batch closes the room here
		// once delivered; this is the backstop if it never comes.
		time.AfterFunc(closeGrace, func() { c.closeLocal(id) })
		return
	}
	if _, err := c.enqueue(id, *final, true, nil); err != nil {
		c.closeLocal(id)
	}
}

func (c *Cluster) closeLocal(id int64) {
	c.local.CloseRoom(id, nil)
	c.mu.Lock()
	st := c.rooms[id]
	delete(c.rooms, id)
	c.mu.Unlock()
	if st != nil {
		<-st.ready
		st.mu.Lock()
		st.dead = true
		if st.sub != nil {
			_ = st.sub.Unsubscribe()
			st.sub = nil
		}
		st.mu.Unlock()
	}
	c.markRoom(id)
}

// Join implements Router.
func (c *Cluster) Join(id int64, s Session) (int, error) {
	j, err := c.JoinAt(id, s, nil)
	return j.Online, err
}

// JoinAt implements Router: the node subscribes to the room first (so the
// room's position here is known), then Local joins and replays.
func (c *Cluster) JoinAt(id int64, s Session, since *proto.Position) (Joined, error) {
	if c.local.room(id) == nil {
		return Joined{}, ErrNoRoom
	}
	st, err := c.subscribe(id)
	if err != nil {
		return Joined{}, err
	}
	j, err := c.local.JoinAt(id, s, since)
	c.joined(st)
	if err != nil {
		return j, err
	}
	if j.Recovered && since.Ep == j.Ep && since.Off > j.Off && c.behindSince(st, since) {
		// The client has offsets Redis never handed out in this epoch:
		// Redis came back from an older snapshot, and the next pushes
		// reuse offsets the client has (it would drop them). Not
		// recovered: it re-syncs and takes this reply's position. (Never
		// a new epoch on a client's word: any client could force one.)
		if now := time.Now().UnixNano(); now-c.behindLogged.Load() > int64(time.Second) {
			c.behindLogged.Store(now) // one line a second, not one per viewer reconnecting
			c.log.Warn("join since beyond the room's counter in Redis: Redis went back; not recovered", "room", id, "since", since.Off, "at", j.Off)
		}
		j.Recovered = false
	}
	st.mu.Lock()
	st.idleFrom = time.Time{}
	st.mu.Unlock()
	c.markRoom(id)
	c.markUser(s.UserID())
	j.Online = c.clusterOnline(id)
	return j, nil
}

// behindSince reports whether Redis's counter of room st, in since's
// epoch, is below since's offset: that offset was handed out before Redis
// went back. Redis in another epoch (the room moved on: the client re-syncs
// at its first push) or not answering: false. A counter read before is
// enough for a since within it (the counter only grows in an epoch, and a
// node that has the room sees it go back itself): a node's viewers moving
// here after their node died cost one read, not one each.
func (c *Cluster) behindSince(st *croom, since *proto.Position) bool {
	st.mu.Lock()
	known := st.seqReadEp == since.Ep && since.Off <= st.seqRead
	st.mu.Unlock()
	if known {
		return false
	}
	ctx, cancel := c.ctx()
	defer cancel()
	vals, err := c.rdb.Do(ctx, c.rdb.B().Mget().Key(epKey(st.id), seqKey(st.id)).Build()).ToArray()
	if err != nil || len(vals) != 2 {
		return false
	}
	ep, err1 := vals[0].ToString()
	seq, err2 := vals[1].AsInt64()
	if err1 != nil || err2 != nil || ep != since.Ep {
		return false
	}
	st.mu.Lock()
	if st.seqReadEp != ep || st.seqRead < seq {
		st.seqRead, st.seqReadEp = seq, ep
	}
	st.mu.Unlock()
	return seq < since.Off
}

// Leave implements Router.
func (c *Cluster) Leave(id int64, s Session) {
	// Presence changes only if s was in the room: a leave of any other
	// room id (a client's input) costs no Redis write.
	if c.local.leave(id, s) {
		c.markRoom(id)
		c.markUser(s.UserID())
	}
}

// IsMember implements Router.
func (c *Cluster) IsMember(id int64, s Session) bool { return c.local.IsMember(id, s) }

// Online implements Router: members on every live node.
func (c *Cluster) Online(id int64) int { return c.clusterOnline(id) }

// UserInRoom implements Router: a session of user joined room on any live
// node; the error of a presence that could not be read (Redis did not
// answer).
func (c *Cluster) UserInRoom(id, user int64) (bool, error) {
	if c.local.userInRoom(id, user) {
		return true, nil
	}
	ctx, cancel := c.ctx()
	defer cancel()
	fields, err := c.rdb.DoCache(ctx, c.rdb.B().Hgetall().Key(userKey(user)).Cache(), 5*time.Second).AsStrMap()
	if err != nil {
		return false, err
	}
	alive, err := c.aliveBoots(ctx, fields)
	if err != nil {
		return false, err
	}
	for node, v := range fields {
		boot, rooms, _ := strings.Cut(v, "|")
		if node == c.cfg.Node || alive[node] != boot {
			continue
		}
		for _, r := range strings.Split(rooms, ",") {
			if r == strconv.FormatInt(id, 10) {
				return true, nil
			}
		}
	}
	return false, nil
}

// PublishRoom implements Router: the push is queued for the room's
// sequencer; it is numbered and sent within a Redis round trip or two — or,
// while Redis does not answer, once it does (retryBatch): it is lost only if
// the room closes here first (or the node stops), counted PushesGivenUp.
func (c *Cluster) PublishRoom(id int64, p proto.Push) (string, error) {
	return c.enqueue(id, p, false, nil)
}

// PublishRoomWait is PublishRoom that waits until the push is numbered and
// handed to NATS (or failed): for a client that is told "sent". A push it
// stops waiting for before the sequencer took it is never sent
// (ErrUnavailable); one the sequencer took whose numbering failed or did not
// end in time may still go out (ErrUnconfirmed: the script may have run
// and its reply been lost — the nodes then fill it from the history — and
// the sequencer retries it until Redis answers or the room closes).
func (c *Cluster) PublishRoomWait(id int64, p proto.Push) (string, error) {
	return c.PublishRoomBy(id, p, time.Time{}, nil)
}

// PublishRoomBy is PublishRoomWait for a push that is numbered by by or
// never (zero: no bound) — a chat whose req_id is held until a while after
// by: held no longer than its push may go out, its retry once the req_id
// is free is never doubled by the first push going out late. Redis decides
// by its own clock (sequence.lua), so a late attempt of its batch —
// retried, or held on a slow link — is refused too; a batch refused so
// numbers its other pushes at once, and the push is "not sent" (an
// ErrRoomBusy). When the wait's answer was ErrUnconfirmed (or a wait that
// ended as the answer came), late, if not nil, is told the push's fate once
// known: its mid once numbered, "" once it never will be; not if its batch
// is given up (the room closed here, the node stopped: Redis can no longer
// tell; by still holds). late runs on the room's sequencer: it must not
// block.
func (c *Cluster) PublishRoomBy(id int64, p proto.Push, by time.Time, late func(mid string)) (string, error) {
	done := make(chan error, 1)
	state := new(atomic.Int32)
	mid, err := c.enqueueItem(id, seqItem{p: p, done: done, state: state, by: by, late: late})
	if err != nil {
		return "", err
	}
	select {
	case err = <-done:
	case <-time.After(2 * c.cfg.CallTimeout):
		err = waitTimedOut(state, done)
	}
	return mid, err
}

// waitTimedOut is PublishRoomWait's answer when its wait ran out: a push the
// sequencer never took is abandoned (never sent: ErrUnavailable); one
// dropped from a full queue meanwhile (roomForLocked: abandoned, then
// answered ErrRoomBusy on done) is not sent either — that answer, not
// "unconfirmed"; one taken may still go out (ErrUnconfirmed) — unless it
// was answered as the wait ran out (then that answer: the sequencer, which
// answers before it reads the state, tells a late callback only when it
// finds the caller gone).
func waitTimedOut(state *atomic.Int32, done chan error) error {
	switch {
	case state.CompareAndSwap(itemQueued, itemAbandoned):
		return ErrUnavailable
	case state.Load() == itemAbandoned:
		return <-done // sent right after the state changed, under the room's lock
	}
	state.CompareAndSwap(itemTaken, itemUnwaited)
	select {
	case err := <-done:
		return err
	default:
		return ErrUnconfirmed
	}
}

// ErrUnavailable: the shared state a cluster push needs (Redis) could not be
// reached; the push was not sent.
var ErrUnavailable = errors.New("router: cluster sequencer unavailable")

// ErrUnconfirmed (an ErrUnavailable): the push was not confirmed in time and
// may still go out.
var ErrUnconfirmed = fmt.Errorf("%w: the push was not confirmed in time and may still be sent", ErrUnavailable)

func (c *Cluster) enqueue(id int64, p proto.Push, closing bool, done chan error) (string, error) {
	return c.enqueueItem(id, seqItem{p: p, closing: closing, done: done})
}

// enqueueItem queues it (its push given a mid and the room) for the room's
// sequencer.
func (c *Cluster) enqueueItem(id int64, it seqItem) (string, error) {
	p, closing := it.p, it.closing
	if c.local.room(id) == nil {
		return "", ErrNoRoom
	}
	if p.Mid == "" {
		p.Mid = c.local.mids.Next()
	}
	p.Room = id
	it.p = p
	c.mu.Lock()
	sr := c.seqs[id]
	if sr == nil {
		sr = &seqRoom{}
		c.seqs[id] = sr
	}
	sr.mu.Lock()
	c.mu.Unlock()
	it.size = pushSize(&it.p)
	if !closing && !c.roomForLocked(sr, it) {
		// (A room's final push is always queued: every node's viewers learn
		// that the room closed only from it.)
		sr.mu.Unlock()
		c.local.dropped.Add(1)
		return "", ErrRoomBusy
	}
	// The sequencers are Close's goroutines: once Close began none starts
	// and nothing more is queued (what is, Close flushes while Redis
	// answers).
	start := !sr.running
	stopping := c.closed()
	if start && !stopping {
		c.fillMu.Lock()
		if stopping = c.stopping; !stopping {
			c.wg.Add(1)
		}
		c.fillMu.Unlock()
	}
	if stopping {
		sr.mu.Unlock()
		return "", ErrUnavailable
	}
	if closing {
		it.at = time.Now()
		if sr.closingAt.IsZero() {
			sr.closingAt = it.at
		}
	}
	sr.pending = append(sr.pending, it)
	sr.bytes += it.size
	sr.running = true
	sr.mu.Unlock()
	if start {
		go c.sequence(id, sr)
	}
	return p.Mid, nil
}

// pushSize is what a queued push counts against maxPendingBytes.
func pushSize(p *proto.Push) int { return 64 + len(p.Mid) + len(p.Data) }

// roomForLocked tells whether it fits in the room's queue (MaxPending
// pushes, maxPendingBytes) — the queue fills when the pushes wait for Redis
// (down, unreachable, slow: the sequencer retries the batch ahead). At the
// bound a push that is not reliable is refused (ErrRoomBusy, its caller
// told); a reliable one (ack: a rain's start or end, a PK result) makes
// room by dropping the oldest pushes queued that are not reliable and that
// nobody waits for — effects, progress — counted (RoomDropped) and logged:
// it is refused only when the queue holds nothing else. Order is kept: what
// stays goes out in the order it was queued. sr.mu is held.
func (c *Cluster) roomForLocked(sr *seqRoom, it seqItem) bool {
	queued := len(sr.pending)
	fits := func() bool {
		return queued < c.local.cfg.MaxPending && sr.bytes+it.size <= maxPendingBytes
	}
	if fits() {
		return true
	}
	if !it.p.Ack {
		return false
	}
	dropped := 0
	keep := sr.pending[:0]
	for _, q := range sr.pending {
		switch {
		case fits() || q.closing || q.p.Ack:
			keep = append(keep, q)
			continue
		case q.state != nil && !q.state.CompareAndSwap(itemQueued, itemAbandoned):
			// its caller gave up on it already: never sent anyway
		case q.done != nil:
			q.done <- ErrRoomBusy // never sent: its caller may send it again
			dropped++
		default:
			dropped++
		}
		sr.bytes -= q.size
		queued--
	}
	clear(sr.pending[len(keep):])
	sr.pending = keep
	if dropped > 0 {
		c.local.dropped.Add(int64(dropped))
		sr.evicted += dropped
		if time.Since(sr.loggedAt) >= time.Second {
			c.log.Warn("room pushes dropped from a full queue for reliable ones (Redis not answering?)",
				"room", it.p.Room, "dropped", sr.evicted, "queued", len(sr.pending))
			sr.evicted, sr.loggedAt = 0, time.Now()
		}
	}
	return fits()
}

// sequence numbers the room's pending pushes, batch by batch, until none are
// left. One runs per room and node, one of Close's goroutines: once Close
// began, a batch whose numbering fails is given up, and so is every push
// queued behind it (Close flushes what Redis still answers, no more).
func (c *Cluster) sequence(id int64, sr *seqRoom) {
	defer c.wg.Done()
	stopped := false // a batch was given up as the node stopped
	for {
		c.mu.Lock()
		sr.mu.Lock()
		var rest []seqItem
		if stopped {
			rest = sr.pending
			sr.pending, sr.bytes, sr.closingAt = nil, 0, time.Time{}
		}
		if len(sr.pending) == 0 {
			sr.running = false
			delete(c.seqs, id)
			sr.mu.Unlock()
			c.mu.Unlock()
			c.giveUpQueued(id, rest)
			return
		}
		n := min(len(sr.pending), maxSeqBatch)
		items := make([]seqItem, 0, n)
		for _, it := range sr.pending[:n] {
			sr.bytes -= it.size
			if it.closing {
				sr.closingAt = time.Time{}
			}
			if it.state == nil || it.state.CompareAndSwap(itemQueued, itemTaken) {
				items = append(items, it)
			} // else its caller stopped waiting: never sent
		}
		left := copy(sr.pending, sr.pending[n:])
		clear(sr.pending[left:])
		sr.pending = sr.pending[:left]
		sr.mu.Unlock()
		c.mu.Unlock()
		if len(items) == 0 {
			continue
		}

		// A batch with the room's final push: its attempts end by finalCut
		// after the push was queued, before the other nodes' backstop.
		var start time.Time
		if i := slices.IndexFunc(items, func(it seqItem) bool { return it.closing }); i >= 0 {
			start = items[i].at
		}
		no := c.batchNo.Add(1)
		b, err := c.numberDue(id, &items, &no, cutAt(start))
		if err != nil {
			c.stats.seqErrors.Add(1)
			// Its waiters are answered now (the script may have run, its
			// reply lost: the pushes may be numbered and go out — and they
			// will, once Redis answers a retry).
			unconfirmed := fmt.Errorf("%w: %w", ErrUnconfirmed, err)
			for i := range items {
				if items[i].done != nil {
					items[i].tell(unconfirmed)
					items[i].doubted = true
				}
			}
			c.log.Warn("room pushes not numbered yet: retrying", "room", id, "pushes", len(items), "err", err)
			b, err = c.retryBatch(id, sr, &items, &no, err, start)
		}
		for i := range items {
			items[i].tell(err)
		}
		if err != nil {
			stopped = c.closed()
			c.stats.pushesGivenUp.Add(int64(len(items)))
			reliable := 0
			for _, it := range items {
				if it.p.Ack {
					reliable++
				}
			}
			c.log.Error("room pushes given up: not numbered", "room", id, "pushes", len(items), "reliable", reliable, "err", err)
			if b.closing {
				c.closeLocal(id)
			}
			continue
		}
		for i := range items {
			items[i].settle(items[i].p.Mid)
		}
		if len(items) == 0 {
			continue // every push past its deadline (numberDue answered them)
		}
		if err := c.nc.Publish(roomSubject(id), appendRoomBatch(nil, &b)); err != nil {
			// Numbered and in the history: other nodes fill it from there.
			c.log.Warn("room batch not published", "room", id, "err", err)
		} else {
			c.stats.batchesOut.Add(1)
		}
		c.stats.pushesSequenced.Add(int64(len(b.msgs)))
		c.mu.Lock()
		st := c.rooms[id]
		c.mu.Unlock()
		if st != nil {
			c.receive(st, b)
		} else if b.closing {
			c.closeLocal(id)
		}
	}
}

// closed tells whether Close began.
func (c *Cluster) closed() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// giveUpQueued gives up pushes queued behind a batch given up as the node
// stopped: never tried, so never sent — their waiters are told so
// (ErrUnavailable). Counted and logged as any push given up; a final push
// among them closes the room here.
func (c *Cluster) giveUpQueued(id int64, items []seqItem) {
	if len(items) == 0 {
		return
	}
	closing, n := false, 0
	for i := range items {
		it := &items[i]
		if it.state != nil && !it.state.CompareAndSwap(itemQueued, itemAbandoned) {
			continue // its caller stopped waiting: never sent anyway
		}
		it.tell(ErrUnavailable)
		closing = closing || it.closing
		n++
	}
	c.stats.pushesGivenUp.Add(int64(n))
	c.log.Error("room pushes given up: the node stopped", "room", id, "pushes", n)
	if closing {
		c.closeLocal(id)
	}
}

// finalCut is when, after it was queued, the numbering of a room's final
// push is given up: 0.5 s before the other nodes' backstop (closeGrace)
// closes the room without it.
const finalCut = closeGrace - 500*time.Millisecond

// cutAt is the deadline of a final push's attempt (zero start: none).
func cutAt(start time.Time) time.Time {
	if start.IsZero() {
		return start
	}
	return start.Add(finalCut)
}

// errRoomGone: a batch retried until its room closed on this node.
var errRoomGone = errors.New("router: the room closed before its pushes were numbered")

// errSuperseded: sequence.lua found a later batch of this process numbered
// (not expected: a batch is retried until numbered or given up).
var errSuperseded = errors.New("router: sequence script: a later batch was numbered")

// retryBatch numbers a batch again, whole and in order, after numbering it
// failed with err — with the same batch number (no), so that a retry after
// a lost reply (the script ran) gets the offsets the batch was given
// instead of numbering it twice (sequence.lua). The room's later pushes wait
// behind it: offsets promise order. Attempts back off from 100 ms to
// maxSeqRetryWait, for as long as Redis does not answer, until:
//   - the room closes on this node (its pushes have nobody to go to);
//   - the node stops;
//   - the room's final push is in the batch or queued behind it (start, or
//     the queue's closingAt): no attempt starts after half the other nodes'
//     backstop (closeGrace) from when it was queued, so each has at least a
//     second, and none lasts past finalCut (every other node's viewers learn
//     the room closed only from it; without it they are dropped by the
//     backstop, untold).
//
// A push with a deadline (PublishRoomBy: a chat whose req_id is held) is
// not held past it: once Redis answers, it refuses the batch if that
// passed and the others go on at once (numberDue).
//
// What is given up is counted (ClusterStats.PushesGivenUp) and logged by the
// caller.
func (c *Cluster) retryBatch(id int64, sr *seqRoom, items *[]seqItem, no *uint64, err error, start time.Time) (roomBatch, error) {
	b := roomBatch{closing: slices.ContainsFunc(*items, func(it seqItem) bool { return it.closing })}
	for wait := 100 * time.Millisecond; err != nil && !errors.Is(err, errSuperseded); wait = min(2*wait, maxSeqRetryWait) {
		final := start
		if final.IsZero() {
			sr.mu.Lock()
			final = sr.closingAt
			sr.mu.Unlock()
		}
		if !final.IsZero() && time.Now().Add(wait).After(final.Add(closeGrace/2)) {
			break
		}
		select {
		case <-c.stop:
			return b, err
		case <-time.After(wait):
		}
		if !b.closing && c.local.room(id) == nil {
			return b, fmt.Errorf("%w (last error: %w)", errRoomGone, err)
		}
		b, err = c.numberDue(id, items, no, cutAt(final))
	}
	return b, err
}

// errPastDue answers a push not numbered by its deadline (PublishRoomBy):
// never sent.
var errPastDue = fmt.Errorf("%w: not numbered by its deadline", ErrRoomBusy)

// pastDue: sequence.lua refused a batch holding a push past its deadline
// (seqItem.by), at now by Redis's clock: not numbered, nor will it be.
type pastDue struct{ now int64 }

func (e *pastDue) Error() string { return "router: sequence script: a push's deadline passed" }

// numberDue is numberBy for *items, batch *no, that answers the pushes of a
// batch refused for their deadline "not sent" (errPastDue, and late with
// "") and numbers the others at once as a new batch (*items and *no then
// change; none left: an empty batch, no error).
func (c *Cluster) numberDue(id int64, items *[]seqItem, no *uint64, until time.Time) (roomBatch, error) {
	for {
		b, err := c.numberBy(id, *items, *no, until)
		var due *pastDue
		if !errors.As(err, &due) {
			return b, err
		}
		keep := (*items)[:0]
		for _, it := range *items {
			if !it.by.IsZero() && it.by.UnixMilli() < due.now {
				it.tell(errPastDue)
				it.settle("")
				continue
			}
			keep = append(keep, it)
		}
		c.log.Warn("room pushes not numbered: past their deadline", "room", id, "pushes", len(*items)-len(keep))
		clear((*items)[len(keep):])
		*items = keep
		if len(keep) == 0 {
			return roomBatch{}, nil
		}
		*no = c.batchNo.Add(1)
	}
}

// number runs the sequence script for items (a new batch) and encodes them
// with their offsets.
func (c *Cluster) number(id int64, items []seqItem) (roomBatch, error) {
	return c.numberBy(id, items, c.batchNo.Add(1), time.Time{})
}

// numberBy is number for batch no of this process (the same for each attempt
// of a batch: sequence.lua numbers it once), with its Redis call cut at until
// as well (zero: only CallTimeout).
func (c *Cluster) numberBy(id int64, items []seqItem, no uint64, until time.Time) (roomBatch, error) {
	// What this node has received of the room: Redis's counter below it in
	// the same epoch lost data (the script starts a new epoch then).
	var ep string
	var last int64
	c.mu.Lock()
	st := c.rooms[id]
	c.mu.Unlock()
	if st != nil {
		st.mu.Lock()
		ep, last = st.ep, st.next-1
		st.mu.Unlock()
	}
	// The batch's deadline: its earliest push's (0: none).
	var by int64
	for _, it := range items {
		if !it.by.IsZero() && (by == 0 || it.by.UnixMilli() < by) {
			by = it.by.UnixMilli()
		}
	}
	closing := false
	for _, it := range items {
		closing = closing || it.closing
	}
	// A room's ids are never reused: the batch that closes it leaves its
	// epoch and counter to expire with its history, not a day later.
	epochTTL := c.cfg.EpochTTL
	if closing {
		epochTTL = c.cfg.HistoryTTL
	}
	args := make([]string, 0, 11+4*len(items))
	args = append(args, strconv.Itoa(c.cfg.HistorySize), strconv.FormatInt(c.cfg.HistoryTTL.Milliseconds(), 10),
		NewEpoch(), strconv.FormatInt(time.Now().UnixMilli(), 10), strconv.Itoa(len(items)), ep, strconv.FormatInt(max(last, 0), 10),
		c.boot, strconv.FormatUint(no, 10), strconv.FormatInt(by, 10), strconv.FormatInt(epochTTL.Milliseconds(), 10))
	for _, it := range items {
		args = append(args, it.p.Mid, strconv.Itoa(it.p.Biz), string(rune('0'+boolByte(it.p.Ack))), string(pushData(it.p.Data)))
	}
	ctx, cancel := c.ctx()
	defer cancel()
	if !until.IsZero() {
		var cut context.CancelFunc
		ctx, cut = context.WithDeadline(ctx, until)
		defer cut()
	}
	arr, err := sequenceScript.Exec(ctx, c.rdb, []string{seqKey(id), epKey(id), histKey(id), batchKey(id)}, args).ToArray()
	if err != nil {
		return roomBatch{closing: closing}, err
	}
	if len(arr) < 2 || len(arr) > 4 {
		return roomBatch{closing: closing}, errors.New("router: sequence script: bad reply")
	}
	first, err1 := arr[0].AsInt64()
	ep, err2 := arr[1].ToString()
	if err := errors.Join(err1, err2); err != nil {
		return roomBatch{closing: closing}, err
	}
	if len(arr) == 4 {
		now, err := arr[3].AsInt64()
		if err != nil {
			return roomBatch{closing: closing}, err
		}
		return roomBatch{closing: closing}, &pastDue{now: now}
	}
	if len(arr) == 3 {
		if again, _ := arr[2].AsInt64(); again == 2 || first <= 0 {
			return roomBatch{closing: closing}, errSuperseded
		}
		// Numbered by an attempt whose reply was lost: its offsets.
		c.log.Info("room pushes numbered by an earlier attempt (its reply was lost)", "room", id, "first", first, "pushes", len(items))
	}
	b := roomBatch{ep: ep, first: first, closing: closing, msgs: make([]Msg, len(items))}
	for i := range items {
		p := items[i].p
		p.Off, p.Ep = first+int64(i), ep
		b.msgs[i] = encodeMsg(&p)
	}
	return b, nil
}

func pushData(d []byte) []byte {
	if len(d) == 0 {
		return []byte("{}")
	}
	return d
}

// history reads offsets from..to of room in epoch ep from the shared
// history (Local.History).
func (c *Cluster) history(id int64, ep string, from, to int64) ([]Msg, error) {
	return c.readHistory(id, ep, from, to)
}

// errNotKept: the shared history no longer has (all of) what was asked, or
// the room's epoch changed; asking again will not help.
var errNotKept = errors.New("router: not in the room's history")

// errOtherEpoch: the room is in another epoch in Redis than the one asked
// (an errNotKept too: nothing of that epoch can be read).
var errOtherEpoch = fmt.Errorf("%w: the room is in another epoch", errNotKept)

// historyRange reads offsets from..to of room id in epoch ep from the
// shared history (history.lua: errNotKept if the room is in another epoch),
// with each entry's offset.
func (c *Cluster) historyRange(id int64, ep string, from, to int64) ([]rueidis.XRangeEntry, []int64, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	entries, err := historyScript.Exec(ctx, c.rdb, []string{epKey(id), histKey(id)},
		[]string{ep, strconv.FormatInt(from, 10), strconv.FormatInt(to, 10)}).AsXRange()
	if rueidis.IsRedisNil(err) { // another epoch (or none)
		return nil, nil, errOtherEpoch
	}
	if err != nil {
		return nil, nil, err
	}
	offs := make([]int64, len(entries))
	for i, e := range entries {
		off, _, _ := strings.Cut(e.ID, "-")
		offs[i], _ = strconv.ParseInt(off, 10, 64)
	}
	return entries, offs, nil
}

// historyMsgs encodes history entries (their offsets offs) as room id's
// pushes of epoch ep.
func historyMsgs(id int64, ep string, entries []rueidis.XRangeEntry, offs []int64) []Msg {
	msgs := make([]Msg, 0, len(entries))
	for i, e := range entries {
		biz, _ := strconv.Atoi(e.FieldValues["b"])
		p := proto.Push{Mid: e.FieldValues["m"], Biz: biz, Room: id, Ack: e.FieldValues["a"] == "1",
			Data: []byte(e.FieldValues["d"]), Off: offs[i], Ep: ep}
		msgs = append(msgs, encodeMsg(&p))
	}
	return msgs
}

// readHistory is history with the reason of a failure: errNotKept (not all
// of from..to kept, or its first push older than HistoryTTL), or a Redis
// error (worth retrying).
func (c *Cluster) readHistory(id int64, ep string, from, to int64) ([]Msg, error) {
	entries, offs, err := c.historyRange(id, ep, from, to)
	if err != nil {
		return nil, err
	}
	if int64(len(entries)) != to-from+1 {
		return nil, errNotKept
	}
	for i, o := range offs {
		if o != from+int64(i) {
			return nil, errNotKept
		}
	}
	if len(entries) > 0 {
		if t, _ := strconv.ParseInt(entries[0].FieldValues["t"], 10, 64); t < time.Now().Add(-c.cfg.HistoryTTL).UnixMilli() {
			return nil, errNotKept
		}
	}
	return historyMsgs(id, ep, entries, offs), nil
}

// readTail reads what the shared history still has of offsets from..to for
// a gap: the run of consecutive kept offsets that ends at the newest kept
// one, from its first offset — whatever their age (a live viewer who missed
// them is better served late than never; readHistory's age rule is for
// joins, whose recovered:true must mean "everything since"). errNotKept
// when nothing is kept (or the epoch changed).
func (c *Cluster) readTail(id int64, ep string, from, to int64) (int64, []Msg, error) {
	entries, offs, err := c.historyRange(id, ep, from, to)
	if err != nil {
		return 0, nil, err
	}
	start := len(entries) - 1
	for start > 0 && offs[start-1] == offs[start]-1 {
		start--
	}
	if start < 0 || offs[start] < from {
		return 0, nil, errNotKept
	}
	return offs[start], historyMsgs(id, ep, entries[start:], offs[start:]), nil
}

// subscribe returns the room's subscription state, starting it if needed:
// subscribe on NATS, flush (the server has the interest), then read the
// room's position from Redis. A push numbered after the read arrives through
// the subscription; one numbered before it is history.
func (c *Cluster) subscribe(id int64) (*croom, error) {
	c.mu.Lock()
	st := c.rooms[id]
	if st != nil {
		st.joining++
		c.mu.Unlock()
		<-st.ready
		if st.err != nil {
			c.joined(st)
			return nil, st.err
		}
		return st, nil
	}
	st = &croom{id: id, ready: make(chan struct{}), lastAct: time.Now(), joining: 1}
	c.rooms[id] = st
	c.mu.Unlock()

	err := c.startRoom(st)
	if err != nil {
		st.mu.Lock()
		st.dead = true
		st.mu.Unlock()
		st.err = err // read only after ready is closed
		c.mu.Lock()
		if c.rooms[id] == st {
			delete(c.rooms, id)
		}
		st.joining--
		c.mu.Unlock()
		close(st.ready)
		return nil, err
	}
	close(st.ready)
	return st, nil
}

// joined ends a join that subscribe started (the room may be dropped again).
func (c *Cluster) joined(st *croom) {
	c.mu.Lock()
	st.joining--
	c.mu.Unlock()
}

func (c *Cluster) startRoom(st *croom) error {
	sub, err := c.nc.Subscribe(roomSubject(st.id), func(m *nats.Msg) {
		b, err := decodeRoomBatch(m.Data)
		if err != nil {
			c.stats.badWire.Add(1)
			return
		}
		c.stats.batchesIn.Add(1)
		c.receive(st, b)
	})
	if err != nil {
		return err
	}
	if err := c.nc.FlushTimeout(c.cfg.CallTimeout); err != nil {
		_ = sub.Unsubscribe()
		return ErrUnavailable
	}
	// What this node delivered of the room before (a room dropped and
	// subscribed again): Redis's counter below it in that epoch went back.
	knownEp, knownLast, _ := c.local.Position(st.id)
	ep, last, err := c.position(st.id, knownEp, knownLast)
	if err != nil {
		_ = sub.Unsubscribe()
		return ErrUnavailable
	}
	c.local.SetPosition(st.id, ep, last)
	st.mu.Lock()
	st.sub, st.ep, st.next = sub, ep, last+1
	stash := st.stash
	st.stash = nil
	for _, b := range stash {
		c.acceptLocked(st, b)
	}
	st.mu.Unlock()
	return nil
}

// position reads a room's epoch and newest offset from Redis, giving the
// room an epoch first if it has none, or a new one if its counter is below
// knownLast in epoch knownEp (what this node received: "" and 0 for
// nothing) — Redis went back (position.lua).
func (c *Cluster) position(id int64, knownEp string, knownLast int64) (string, int64, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	arr, err := positionScript.Exec(ctx, c.rdb, []string{seqKey(id), epKey(id), histKey(id)},
		[]string{NewEpoch(), strconv.FormatInt(c.cfg.EpochTTL.Milliseconds(), 10), knownEp, strconv.FormatInt(max(knownLast, 0), 10)}).ToArray()
	if err != nil {
		return "", 0, err
	}
	if len(arr) != 2 {
		return "", 0, errors.New("router: position script: bad reply")
	}
	ep, err1 := arr[0].ToString()
	last, err2 := arr[1].AsInt64()
	return ep, last, errors.Join(err1, err2)
}

// receive takes a numbered batch (from NATS or this node's sequencer).
func (c *Cluster) receive(st *croom, b roomBatch) {
	select {
	case <-st.ready:
	default:
		st.mu.Lock()
		if st.sub == nil && !st.dead { // still starting: keep it for startRoom
			if len(st.stash) < maxStash {
				st.stash = append(st.stash, b)
			}
			st.mu.Unlock()
			return
		}
		st.mu.Unlock()
	}
	st.mu.Lock()
	if !st.dead {
		c.acceptLocked(st, b)
	}
	st.mu.Unlock()
}

// switchEpoch moves st to epoch ep, expecting offset next there; where it
// was (prevEp, prevNext) is kept for a way back. What was buffered belongs
// to the epoch left. st.mu is held.
func (st *croom) switchEpoch(ep string, next int64) {
	st.prevEp, st.prevNext, st.ep, st.next = st.ep, st.next, ep, next
	st.buf, st.buffered = nil, 0
}

// acceptLocked delivers b in order, buffers it past a gap, or drops what was
// already delivered. st.mu is held.
func (c *Cluster) acceptLocked(st *croom, b roomBatch) {
	if b.ep != st.ep {
		if b.ep == st.prevEp {
			// A straggler of the epoch before: dropped, and not counted as
			// the room's activity — if this node left the room's real epoch
			// for a stale one (a batch of an older epoch that arrived late,
			// from a NATS reconnect buffer or a start-up stash), the room
			// goes quiet here and the tail sweep takes it back to the epoch
			// Redis holds (checkTails).
			return
		}
		// A new epoch: the room's history was lost (or it had none) and
		// numbering restarted at 1. Batches of the new epoch may arrive in
		// any order, so the next one expected is 1, not this batch's first:
		// anything before it is waited for, then read from the history.
		// Epochs have no order, so this may be an older one arriving late:
		// where the room was is kept (prevNext) for the way back.
		st.switchEpoch(b.ep, 1)
	}
	if b.first < st.next {
		// Offsets delivered already: a duplicate — or Redis went back and
		// numbered them again (an older snapshot, and a node that knew
		// nothing of the room numbered this batch). Not the room's
		// activity: the tail sweep checks it (checkTails).
		st.suspect = true
		if b.last() < st.next {
			if b.closing {
				// The room's final push, delivered already from the history
				// (which does not carry the closing mark): the room closes
				// now, not at the closed event's backstop.
				go c.closeLocal(st.id)
			}
			return
		}
	}
	st.lastAct = time.Now()
	if b.first > st.next {
		i := len(st.buf)
		for i > 0 && st.buf[i-1].first > b.first {
			i--
		}
		st.buf = append(st.buf, roomBatch{})
		copy(st.buf[i+1:], st.buf[i:])
		st.buf[i] = b
		st.buffered += len(b.msgs)
		switch {
		case st.buffered > 2*maxGapBuffer:
			// The hole could not be read in time (Redis unreachable from
			// this node, or slow) while the room went on: given up, so
			// that the buffer stays bounded and the viewers get what came
			// after it.
			c.skipHole(st)
		case st.buffered > maxGapBuffer:
			c.startFill(st, 0)
		default:
			c.armGap(st)
		}
		return
	}
	c.deliverLocked(st, b)
	c.drainLocked(st)
}

// skipHole gives up the hole before the first buffered batch (counted
// lost, as one gone from the history) and delivers what follows it. A fill
// of it still on its way finds the room moved on and drains. st.mu is held.
func (c *Cluster) skipHole(st *croom) {
	if len(st.buf) == 0 || st.buf[0].first <= st.next {
		return
	}
	c.stats.gapsLost.Add(1)
	c.log.Warn("room offsets given up: the hole could not be read while the room went on", "room", st.id,
		"from", st.next, "to", st.buf[0].first-1, "buffered", st.buffered)
	st.next = st.buf[0].first
	c.drainLocked(st)
	c.armGap(st) // a further hole in what is left
}

func (c *Cluster) deliverLocked(st *croom, b roomBatch) {
	msgs := b.msgs[st.next-b.first:]
	if len(msgs) > 0 {
		c.local.Deliver(st.id, st.ep, msgs)
		st.next = b.last() + 1
	}
	if b.closing {
		go c.closeLocal(st.id)
	}
}

func (c *Cluster) drainLocked(st *croom) {
	for len(st.buf) > 0 && st.buf[0].first <= st.next {
		b := st.buf[0]
		st.buf = st.buf[1:]
		st.buffered -= len(b.msgs)
		if b.last() >= st.next {
			c.deliverLocked(st, b)
		}
	}
	if len(st.buf) == 0 {
		st.buf = nil
	}
}

// armGap reads the room's open hole from the history after GapWait, unless
// a read is already scheduled or nothing is buffered. st.mu is held.
func (c *Cluster) armGap(st *croom) {
	if len(st.buf) == 0 || st.gapArmed || st.dead {
		return
	}
	st.gapArmed = true
	time.AfterFunc(c.cfg.GapWait, func() {
		st.mu.Lock()
		st.gapArmed = false
		c.startFill(st, 0)
		st.mu.Unlock()
	})
}

// startFill reads offsets [next, upTo] from the shared history in the
// background (upTo 0: through the newest buffered offset — one read catches
// up with everything known, instead of one gap per GapWait while NATS is
// still re-subscribing). Buffered batches the read covers are dropped as
// duplicates when it lands. st.mu is held.
func (c *Cluster) startFill(st *croom, upTo int64) {
	if st.filling || st.dead {
		return
	}
	if upTo == 0 {
		if len(st.buf) == 0 {
			return
		}
		upTo = st.buf[len(st.buf)-1].last()
	}
	if upTo < st.next {
		return
	}
	c.fillMu.Lock()
	defer c.fillMu.Unlock()
	if c.stopping {
		return // closing: no fill starts (wg.Wait is under way)
	}
	st.filling = true
	from, ep := st.next, st.ep
	c.log.Debug("room gap: reading history", "room", st.id, "ep", ep, "from", from, "to", upTo, "buffered", st.buffered)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		first, msgs, err := c.readTail(st.id, ep, from, upTo)
		st.mu.Lock()
		defer st.mu.Unlock()
		st.filling = false
		if st.dead {
			return
		}
		if st.ep != ep || st.next != from {
			// The room moved on meanwhile (NATS brought part of the hole):
			// what the read has past where it is now is still delivered.
			if b := (roomBatch{ep: ep, first: first, msgs: msgs}); err == nil && st.ep == ep && first <= st.next && b.last() >= st.next {
				c.stats.gapFills.Add(1)
				c.deliverLocked(st, b)
			}
			c.drainLocked(st)
			c.armGap(st) // a hole left behind: its own timer (the one that fired found this fill under way)
			return
		}
		switch {
		case err == nil:
			if first > from {
				// The start of the hole is gone from the history (trimmed):
				// skipped, up to what is kept or buffered — delivered.
				to := first - 1
				if len(st.buf) > 0 && st.buf[0].first > from && st.buf[0].first <= to {
					to = st.buf[0].first - 1
				}
				c.stats.gapsLost.Add(1)
				c.log.Warn("room offsets lost", "room", st.id, "from", from, "to", to)
				st.next = to + 1
				c.drainLocked(st)
			}
			if b := (roomBatch{ep: ep, first: first, msgs: msgs}); b.first <= st.next && b.last() >= st.next {
				c.log.Debug("room gap filled", "room", st.id, "from", st.next, "to", b.last())
				c.stats.gapFills.Add(1)
				c.deliverLocked(st, b)
			}
		case errors.Is(err, errOtherEpoch):
			// Redis is in another epoch than this room here (a late batch
			// of an older epoch moved it, or Redis lost the room): what is
			// buffered of this one is not delivered as if only a hole were
			// lost — the tail sweep takes the room to Redis's epoch.
			c.log.Warn("room gap in an epoch Redis is not in: buffered pushes dropped, the sweep adopts Redis's", "room", st.id, "ep", ep, "buffered", st.buffered)
			st.buf, st.buffered = nil, 0
			st.suspect = true
			return
		case errors.Is(err, errNotKept):
			// Gone from the history: skip the hole only — what is buffered
			// past it is delivered (a later hole is read again). Clients that
			// join with a since before it are told recovered:false by the
			// same check.
			c.stats.gapsLost.Add(1)
			to := upTo
			if len(st.buf) > 0 && st.buf[0].first > from {
				to = st.buf[0].first - 1
			}
			c.log.Warn("room offsets lost", "room", st.id, "from", from, "to", to)
			st.next = to + 1
		default:
			// Redis unreachable: the gap timer (a later batch) or the tail
			// sweep tries again.
			c.log.Warn("room gap not filled yet", "room", st.id, "from", from, "to", upTo, "err", err)
		}
		c.drainLocked(st)
		c.armGap(st) // a hole still open (a further one, or Redis was down): try again
	}()
}

// checkTails compares every subscribed room idle for at least idle with the
// room's counter in Redis and fills what this node has not received.
func (c *Cluster) checkTails(idle time.Duration) {
	c.mu.Lock()
	rooms := make([]*croom, 0, len(c.rooms))
	for _, st := range c.rooms {
		rooms = append(rooms, st)
	}
	c.mu.Unlock()
	now := time.Now()
	// Each room with its epoch when it was picked: one that moved to
	// another before Redis's answer is compared with it at the next sweep
	// (an answer read before a new epoch's first batch arrived would send
	// the room back to the epoch it just left).
	type tail struct {
		st *croom
		ep string
	}
	var check []tail
	var regressed []regression
	for _, st := range rooms {
		select {
		case <-st.ready:
		default:
			continue
		}
		st.mu.Lock()
		if st.err == nil && st.sub != nil && (now.Sub(st.lastAct) >= idle || st.suspect) && !st.filling {
			st.suspect = false
			check = append(check, tail{st, st.ep})
		}
		st.mu.Unlock()
	}
	// One pass takes at most CallTimeout of Redis (the sweep's drops and
	// hand-offs come after it on the same goroutine): rooms not looked at
	// by then stay suspect for the next.
	passEnd := time.Now().Add(c.cfg.CallTimeout)
	for len(check) > 0 {
		if time.Now().After(passEnd) {
			for _, tl := range check {
				tl.st.mu.Lock()
				tl.st.suspect = true
				tl.st.mu.Unlock()
			}
			break
		}
		n := min(len(check), 256)
		part := check[:n]
		check = check[n:]
		cmds := make(rueidis.Commands, 0, 2*n)
		for _, tl := range part {
			cmds = append(cmds, c.rdb.B().Get().Key(epKey(tl.st.id)).Build(), c.rdb.B().Get().Key(seqKey(tl.st.id)).Build())
		}
		ctx, cancel := context.WithDeadline(context.Background(), passEnd)
		res := c.rdb.DoMulti(ctx, cmds...)
		cancel()
		for i, tl := range part {
			ep, err1 := res[2*i].ToString()
			last, err2 := res[2*i+1].AsInt64()
			if err1 != nil || err2 != nil {
				continue
			}
			st := tl.st
			st.mu.Lock()
			if st.ep != tl.ep {
				st.suspect = true // moved meanwhile: looked at again next sweep
				st.mu.Unlock()
				continue
			}
			switch {
			case ep != st.ep && ep != "" && ep == st.prevEp:
				// The room's epoch in Redis is the one this node left: the
				// batch that moved it here was of an older epoch, late (a
				// NATS reconnect buffer flushed after the history expired
				// and a new epoch began). Back to where the room was, and
				// what was dropped meanwhile is read from the history;
				// otherwise every batch of the real epoch would be dropped
				// as a straggler for as long as the room is busy.
				c.log.Warn("room left its epoch for a stale one: back", "room", st.id, "stale", st.ep, "to", ep)
				st.switchEpoch(ep, st.prevNext)
				if last >= st.next {
					c.startFill(st, last)
				}
			case ep != st.ep && ep != "":
				// A new epoch this node has not heard of (every batch of it
				// lost on the way): it starts at 1.
				c.log.Warn("room epoch changed unseen", "room", st.id, "from", st.ep, "to", ep)
				st.switchEpoch(ep, 1)
				if last >= 1 {
					c.startFill(st, last)
				}
			case ep == st.ep && last >= st.next:
				c.startFill(st, last)
			case ep == st.ep && last < st.next-1:
				// Redis's counter is below what this node delivered in the
				// same epoch: Redis went back (an older snapshot). Offsets
				// it hands out again would be dropped here as duplicates —
				// numbering must restart in a new epoch (position.lua checks
				// again atomically: the counter only ever grows otherwise).
				regressed = append(regressed, regression{st, ep, st.next - 1})
			}
			st.mu.Unlock()
		}
	}
	for _, r := range regressed {
		if time.Now().After(passEnd) {
			break // the next sweep (the room stays suspect: a duplicate comes again)
		}
		ep, last, err := c.position(r.st.id, r.ep, r.last)
		if err != nil {
			continue // the next sweep (the room stays suspect: a duplicate comes again)
		}
		if ep != r.ep {
			c.stats.epochsForced.Add(1)
			c.log.Error("room counter went back in Redis (data loss): new epoch", "room", r.st.id, "from", r.ep, "delivered", r.last, "to", ep, "at", last)
		}
	}
}

// regression is a room whose counter in Redis is below what this node
// delivered in epoch ep.
type regression struct {
	st   *croom
	ep   string
	last int64
}

// sweepLoop checks idle rooms for lost tails every second and drops the
// subscriptions of rooms without local members for Linger.
func (c *Cluster) sweepLoop() {
	defer c.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		c.checkTails(time.Second)
		c.dropIdle()
		c.sweepHandoffs()
	}
}

func (c *Cluster) dropIdle() {
	now := time.Now()
	var drop []*croom
	c.mu.Lock()
	for id, st := range c.rooms {
		select {
		case <-st.ready:
		default:
			continue
		}
		if c.local.Online(id) > 0 || st.joining > 0 {
			st.mu.Lock()
			st.idleFrom = time.Time{}
			st.mu.Unlock()
			continue
		}
		st.mu.Lock()
		dropped := false
		if st.idleFrom.IsZero() {
			st.idleFrom = now
		} else if now.Sub(st.idleFrom) >= c.cfg.Linger {
			st.dead, dropped = true, true
			drop = append(drop, st)
			delete(c.rooms, id)
		}
		st.mu.Unlock()
		if dropped {
			// Under c.mu: a join subscribing anew (and filling the ring
			// again) comes after.
			c.local.ForgetHistory(id)
		}
	}
	c.mu.Unlock()
	for _, st := range drop {
		st.mu.Lock()
		if st.sub != nil {
			_ = st.sub.Unsubscribe()
			st.sub = nil
		}
		st.mu.Unlock()
	}
}

// --- users ---

// Register implements Router: the node subscribes to the user's subject with
// its first session.
func (c *Cluster) Register(s Session) {
	// Until the shared list is drained too, live pushes wait behind what
	// it held, as behind the node's box (Draining) — and behind what a
	// retried drain delivers, when Redis did not answer this one, up to
	// redrainHold.
	done := drainStart(s)
	held := false
	defer func() {
		if !held {
			done()
		}
	}()
	c.local.register(s)
	u := s.UserID()
	c.mu.Lock()
	cu := c.users[u]
	if cu == nil {
		cu = &cuser{}
		c.users[u] = cu
	}
	cu.sessions++
	first := cu.sessions == 1
	subscribed := cu.sub != nil || cu.subscribing
	if first && !subscribed {
		cu.subscribing = true
	}
	c.mu.Unlock()
	switch {
	case !first || subscribed:
		// Subscribed already (another session here, or back within the
		// linger). Every session drains the list, not only the first (as
		// Local.Register): a push kept while the user's other session here
		// was closing waits there otherwise.
		c.drainOffline(u)
		held = c.holdDrain(u, done)
	default:
		sub, err := c.nc.ChanSubscribe(userSubject(u), c.userq[uint64(u)%userShards])
		c.mu.Lock()
		cu.subscribing = false
		if err != nil || c.users[u] != cu {
			c.mu.Unlock()
			if sub != nil {
				_ = sub.Unsubscribe()
			}
			if err != nil {
				c.log.Warn("user subscription failed", "user", u, "err", err)
			}
		} else {
			cu.sub = sub
			if cu.sessions == 0 { // every session left while subscribing
				c.lingerUser(u, cu)
			}
			c.mu.Unlock()
			// Subscribed first — the server has the interest once the
			// flush comes back: Subscribe only buffers it, and a push
			// published before the server has it is dropped — then
			// drained: a push stored before the sender published is in
			// the list; one published after arrives through the
			// subscription. (A flush that fails: NATS is away, and its
			// reconnect drains every user's list again.)
			// (NATS away: its reconnect drains every user's list again,
			// and a flush would hold this session's hello CallTimeout.)
			if c.nc.IsConnected() {
				if err := c.nc.FlushTimeout(c.cfg.CallTimeout); err != nil {
					c.log.Debug("NATS flush after a user subscription failed", "user", u, "err", err)
				}
			}
			c.drainOffline(u)
			held = c.holdDrain(u, done)
		}
	}
	c.markUser(u)
}

// redrainHold bounds how long a registering session's live pushes wait
// behind a retried drain of its user's list (Redis did not answer the
// first): past it they go, and what the retry still delivers comes after
// them.
const redrainHold = 2 * time.Second

// holdDrain ends a registering session's drain (done) when the retried
// drain of user's list has delivered (its own drain's retry, or one under
// way already that may deliver what this one missed), or after
// redrainHold, whichever comes first; false: no retry is under way (end
// it now).
func (c *Cluster) holdDrain(user int64, done func()) bool {
	w := &drainWait{done: done}
	c.redrainMu.Lock()
	if _, on := c.redrains[user]; !on {
		c.redrainMu.Unlock()
		return false
	}
	// Those that ended by their time are dropped as others come: a user
	// reconnecting in a loop through a long outage leaves at most
	// redrainHold's worth of them.
	waits := slices.DeleteFunc(c.redrainWaits[user], func(o *drainWait) bool { return o.ended.Load() })
	c.redrainWaits[user] = append(waits, w)
	c.redrainMu.Unlock()
	time.AfterFunc(redrainHold, w.end)
	return true
}

// drainWait is a session's drain held behind a retried drain (holdDrain).
type drainWait struct {
	once  sync.Once
	ended atomic.Bool
	done  func()
}

func (w *drainWait) end() {
	w.once.Do(func() {
		w.ended.Store(true)
		w.done()
	})
}

// endDrainWaits ends the drains held behind user's retried drain. With
// redrainMu.
func (c *Cluster) endDrainWaits(user int64) {
	for _, w := range c.redrainWaits[user] {
		w.end()
	}
	delete(c.redrainWaits, user)
}

// userShards is the number of user-subscription queues (Cluster.userq).
const userShards = 64

// userShardCap bounds the messages waiting in one user queue: past it NATS
// drops a message (a slow consumer, counted by NATS's error handler) — a
// hand-off then goes unanswered and its sender keeps the push in the user's
// offline list and hints the holders, a hint is sent again, and a push
// without ack is lost as an unreliable push may be.
const userShardCap = 4096

// userLoop handles one user queue's messages in order.
func (c *Cluster) userLoop(q chan *nats.Msg) {
	defer c.wg.Done()
	for {
		select {
		case <-c.stop:
			return
		case m := <-q:
			c.onUserMsg(m)
		}
	}
}

// onUserMsg handles a message on a user's subject, on its queue's
// goroutine: a push for the user's sessions here is given to them and a
// hand-off answered; what needs Redis (a drain hint, a reliable push no
// session here took) goes to the user's lane, and so does every later
// message of the user while the lane has any (their order kept).
func (c *Cluster) onUserMsg(m *nats.Msg) {
	u, err := strconv.ParseInt(strings.TrimPrefix(m.Subject, "le.u."), 10, 64)
	if err != nil {
		c.stats.badWire.Add(1)
		return
	}
	ln := c.lanesOf(u)
	ln.mu.Lock()
	if q, busy := ln.m[u]; busy {
		if len(q) < laneCap {
			ln.m[u] = append(q, m)
		} // else dropped, as by a full queue (userShardCap)
		ln.mu.Unlock()
		return
	}
	ln.mu.Unlock()
	if len(m.Data) == 0 { // a drain hint (handoff.go)
		c.toLane(u, m)
		return
	}
	msg, err := decodeUserPush(m.Data)
	if err != nil {
		c.stats.badWire.Add(1)
		return
	}
	if c.local.sendMsg(u, msg, m.Header.Get(owedHeader) != "") == 0 && msg.Ack {
		c.toLane(u, m) // kept there (keepAway), unless a session took it meanwhile
		return
	}
	answerHandoff(m)
}

// userLanes are one user queue's lanes.
type userLanes struct {
	mu sync.Mutex
	m  map[int64][]*nats.Msg
}

// lanesOf is the lanes of user u's queue.
func (c *Cluster) lanesOf(u int64) *userLanes { return &c.lanes[uint64(u)%userShards] }

// laneCap bounds the messages waiting in one user's lane.
const laneCap = 1024

// toLane starts user's lane with m (none is running: onUserMsg checked).
func (c *Cluster) toLane(u int64, m *nats.Msg) {
	c.fillMu.Lock()
	defer c.fillMu.Unlock()
	if c.stopping {
		return // closing: a hand-off unanswered is kept by its sender
	}
	ln := c.lanesOf(u)
	ln.mu.Lock()
	ln.m[u] = []*nats.Msg{m}
	ln.mu.Unlock()
	c.wg.Add(1)
	go c.laneLoop(u)
}

// laneLoop handles user's lane until it is empty.
func (c *Cluster) laneLoop(u int64) {
	defer c.wg.Done()
	for {
		ln := c.lanesOf(u)
		ln.mu.Lock()
		q := ln.m[u]
		stopping := false
		select {
		case <-c.stop:
			stopping = true // the rest dropped: an unanswered hand-off is kept by its sender
		default:
		}
		if len(q) == 0 || stopping {
			delete(ln.m, u)
			ln.mu.Unlock()
			return
		}
		m := q[0]
		q[0] = nil
		ln.m[u] = q[1:]
		ln.mu.Unlock()
		c.onUserMsgSlow(u, m)
	}
}

// onUserMsgSlow handles a message of user's lane (the per-subscription
// handler it was before the queues).
func (c *Cluster) onUserMsgSlow(u int64, m *nats.Msg) {
	if len(m.Data) == 0 { // a drain hint (handoff.go)
		c.drainOffline(u)
		return
	}
	msg, err := decodeUserPush(m.Data)
	if err != nil {
		c.stats.badWire.Add(1)
		return
	}
	regs := c.regsOf(u)
	if c.local.sendMsg(u, msg, m.Header.Get(owedHeader) != "") == 0 && msg.Ack {
		// The user left this node meanwhile: kept for their next connect
		// if they are nowhere else. (Online elsewhere, they got it there:
		// that node is subscribed too — or, if it is away from NATS, a
		// hand-off is not answered here: its sender keeps it for them.)
		if c.keepAway(u, regs, msg) {
			return
		}
		// Kept: the other nodes are hinted, as by a hand-off's sender that
		// kept it (keepForHolder) — this one answers, so its sender does
		// not. A session that registered on another node, not in the
		// presence read yet, may have drained the list before the push
		// was stored (before, it waited there for the user's next connect
		// while the user stayed connected). SendUser and Keep need none:
		// they publish the push itself after storing it.
		c.hintKept(u)
	}
	answerHandoff(m)
}

// keepAway keeps reliable pushes no session here took: in the shared
// offline list when the user is connected nowhere — or, when Redis cannot
// tell or take them (down, unreachable), in this node's offline box: a
// session here drains it (before, they were dropped; a session on another
// node then misses them, a session on a node that had them gets them).
// elsewhere: the user is connected on another node (their pushes are
// handed off there, handOff). regs: regsOf(user) read before no session
// here took ms — a session registered since may have drained the list
// before ms were stored, and this node never gets its own publish (NoEcho):
// the list is drained again (noRedrain: called from a drain, whose pushes a
// closing session refused; a closing session alone is no reason either).
func (c *Cluster) keepAway(user int64, regs uint64, ms ...Msg) (elsewhere bool) {
	online, known := c.onlineElsewhere(user)
	switch {
	case !known:
		c.local.keepHere(user, ms)
	case !online:
		if !c.storeOffline(user, ms...) {
			c.local.keepHere(user, ms)
		} else if regs != noRedrain && c.regsOf(user) != regs && c.local.userSessions(user) > 0 {
			c.drainOffline(user) // a session registered since (see above)
		}
	}
	return known && online
}

// storeOffline appends ms to the user's shared offline list (false: Redis
// did not take them).
func (c *Cluster) storeOffline(user int64, ms ...Msg) bool {
	max, ttl := c.local.cfg.OfflineMax, c.local.cfg.OfflineTTL
	if max <= 0 || len(ms) == 0 {
		return true
	}
	ctx, cancel := c.ctx()
	defer cancel()
	k := offlineKey(user)
	els := make([]string, len(ms))
	for i, m := range ms {
		els[i] = string(appendUserPush(nil, m))
	}
	for _, r := range c.rdb.DoMulti(ctx,
		c.rdb.B().Rpush().Key(k).Element(els...).Build(),
		c.rdb.B().Ltrim().Key(k).Start(int64(-max)).Stop(-1).Build(),
		c.rdb.B().Pexpire().Key(k).Milliseconds(ttl.Milliseconds()).Build()) {
		if err := r.Error(); err != nil {
			c.log.Warn("offline push not kept in Redis, kept on this node", "user", user, "err", err)
			return false
		}
	}
	return true
}

// Keep implements Keeper, as SendUser: to the user's sessions here and on
// the other nodes (published), kept in the offline list when the user is
// connected nowhere.
func (c *Cluster) Keep(user int64, msgs []Msg) {
	msgs = c.local.newest(msgs)
	regs := c.regsOf(user)
	var away []Msg
	for _, m := range msgs {
		if c.local.sendMsg(user, m, true) == 0 {
			away = append(away, m)
		}
	}
	c.handOn(user, msgs, away, regs)
}

// handOn publishes msgs to the user's sessions on the other nodes and keeps
// away (those no session here took) in the offline list when the user is
// connected nowhere; connected elsewhere, the reliable ones of away are
// handed off (answered, handOff). regs: as keepAway's.
func (c *Cluster) handOn(user int64, msgs, away []Msg, regs uint64) {
	var handed map[string]bool
	if len(away) > 0 && c.keepAway(user, regs, away...) {
		handed = make(map[string]bool, len(away))
		for _, m := range away {
			handed[m.Mid] = m.Ack
		}
	}
	for _, m := range msgs {
		if handed[m.Mid] {
			c.handOff(user, m, regs, true)
		} else if err := c.nc.PublishMsg(userPushMsg(user, "", m, true)); err != nil {
			c.log.Warn("user push not published", "user", user, "err", err)
		}
	}
}

// owedHeader marks a user push owed from before (handed on from a closed
// session, drained from the offline list but refused here): the receiving
// node sends it as such (Backlogged), behind the session's queue. A node
// that does not know the header sends it as a live push.
const owedHeader = "Le-Owed"

// userPushMsg is m on user's subject (reply: a hand-off's inbox, or "").
func userPushMsg(user int64, reply string, m Msg, owed bool) *nats.Msg {
	msg := &nats.Msg{Subject: userSubject(user), Reply: reply, Data: appendUserPush(nil, m)}
	if owed {
		msg.Header = nats.Header{owedHeader: []string{"1"}}
	}
	return msg
}

// drainOffline delivers the user's offline pushes to their sessions here;
// a drain Redis did not answer is retried in the background (redrain), as
// is one that found pushes leased to another drain (drainOnce).
func (c *Cluster) drainOffline(user int64) {
	err := c.drainOnce(user)
	var held leased
	switch {
	case errors.As(err, &held):
		c.redrain(user)
	case err != nil:
		c.log.Warn("offline pushes not read; retrying", "user", user, "err", err)
		c.redrain(user)
	}
}

// A failed drain is retried after redrainFirst, then twice as long each
// time, up to redrainMax, each wait up to half as long again at random:
// when Redis was down or overloaded, every user who connected meanwhile is
// retried — not all at once, and at most one call per user every
// redrainMax while it stays so (the pushes are kept for offline_ttl). A
// drain that found pushes leased to another is retried the same way, but
// no later than leaseSlack after that lease runs out.
const (
	redrainFirst = 250 * time.Millisecond
	redrainMax   = 30 * time.Second
	leaseSlack   = 50 * time.Millisecond
)

// redrain drains the user's offline list again in the background until
// Redis answers and no push is leased to another drain, while a session of
// theirs is here and the router is open: a session drains the list when it
// registers (then on a hint or a NATS reconnect only), so what was kept for
// the user waited until their next connect — lost after offline_ttl if they
// stayed connected. One goroutine per user at most: a drain failing
// meanwhile makes it go on.
func (c *Cluster) redrain(user int64) {
	c.redrainMu.Lock()
	defer c.redrainMu.Unlock()
	if _, on := c.redrains[user]; on {
		c.redrains[user] = true
		return
	}
	c.fillMu.Lock()
	defer c.fillMu.Unlock()
	if c.stopping {
		return // closing: its sessions go too (wg.Wait is under way)
	}
	c.redrains[user] = false
	c.wg.Add(1)
	go c.redrainLoop(user)
}

func (c *Cluster) redrainLoop(user int64) {
	defer c.wg.Done()
	wait := redrainFirst
	t := time.NewTimer(wait + rand.N(wait/2))
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			c.redrainMu.Lock()
			c.endDrainWaits(user)
			c.redrainMu.Unlock()
			return
		case <-t.C:
		}
		c.redrainMu.Lock()
		c.redrains[user] = false
		c.redrainMu.Unlock()
		if c.local.userSessions(user) > 0 {
			if err := c.drainOnce(user); err != nil {
				// Still not answered, or some pushes still leased to
				// another drain: that one may have lost its release's
				// reply, or died — taken back here once the lease ran out.
				wait = min(2*wait, redrainMax)
				next := wait + rand.N(wait/2)
				var held leased
				if errors.As(err, &held) {
					next = min(next, held.left+leaseSlack)
				}
				t.Reset(next)
				continue
			}
		}
		// Drained, or the user left: done — unless a drain failed since
		// this attempt began (it may have missed what was kept then).
		c.redrainMu.Lock()
		again := c.redrains[user]
		if !again {
			delete(c.redrains, user)
			c.endDrainWaits(user)
		}
		c.redrainMu.Unlock()
		if !again {
			return
		}
		wait = redrainFirst
		t.Reset(wait + rand.N(wait/2))
	}
}

// drainLease is how long a drain's pushes stay its own (leased, drain.lua)
// before a later drain may take them back: as long as a node that is alive
// needs to get the script's reply (within CallTimeout of asking), deliver
// them (a refused one handed on: two calls more) and release the lease
// (one call), and one CallTimeout to spare. Only a drain whose reply was
// lost, whose release was lost or late, or whose node died leaves its
// pushes to a later one: at least once, and twice only then (the second
// copy dropped by the SDKs, by mid).
func (c *Cluster) drainLease() time.Duration { return 5 * c.cfg.CallTimeout }

// leased is drainOnce's answer when some of the user's offline pushes are
// leased to another drain for left still: delivered by it, or taken back
// by a drain after that.
type leased struct{ left time.Duration }

func (e leased) Error() string {
	return "router: offline pushes leased to another drain for " + e.left.String()
}

// drainOnce is one drain of the user's offline list: its pushes — and those
// of drains whose lease ran out — are leased to this drain (drain.lua),
// delivered to the user's sessions here, and the lease released. An error:
// Redis did not answer (nothing delivered; what the script may have taken
// waits, leased, until the lease runs out), or leased (what it took was
// delivered; some pushes are another drain's still).
func (c *Cluster) drainOnce(user int64) error {
	// One at a time per user here: a drain that started first (a hint's,
	// on the subscription) delivers its pushes before a Register's own
	// drain returns — while that session still puts live pushes behind
	// them (Draining) — instead of the second finding them leased.
	defer c.drains.Lock(user)()
	ctx, cancel := c.ctx()
	defer cancel()
	tok := c.boot + ":" + strconv.FormatUint(c.drainNo.Add(1), 10)
	cfg := c.local.cfg
	arr, err := drainScript.Exec(ctx, c.rdb, []string{offlineKey(user), leaseKey(user)}, []string{tok,
		strconv.FormatInt(c.drainLease().Milliseconds(), 10), strconv.Itoa(max(cfg.OfflineMax, 0)),
		strconv.FormatInt(cfg.OfflineTTL.Milliseconds(), 10)}).ToArray()
	if err != nil {
		return err
	}
	if len(arr) == 0 {
		return errors.New("router: empty offline drain reply")
	}
	left, err := arr[0].AsInt64()
	if err != nil {
		return err
	}
	var away []Msg
	for _, v := range arr[1:] {
		b, err := v.ToString()
		if err != nil {
			continue
		}
		if m, err := decodeUserPush([]byte(b)); err == nil && c.local.sendMsg(user, m, true) == 0 {
			away = append(away, m)
		}
	}
	if len(away) > 0 {
		// Taken from the list but refused here (the session is closing
		// already): handed on like a closing connection's unacked pushes.
		c.handOn(user, away, away, noRedrain)
	}
	if len(arr) > 1 {
		c.release(user, tok)
	}
	if left >= 0 {
		return leased{left: time.Duration(left) * time.Millisecond}
	}
	return nil
}

// release ends a drain's lease, its pushes delivered (handed on, for those
// refused). Not answered: the lease runs out and the next drain delivers
// them again — a second copy, never none.
func (c *Cluster) release(user int64, tok string) {
	ctx, cancel := c.ctx()
	defer cancel()
	if err := releaseScript.Exec(ctx, c.rdb, []string{leaseKey(user)}, []string{tok}).Error(); err != nil {
		c.log.Warn("offline drain not released; its pushes may be delivered again", "user", user, "err", err)
	}
}

// SessionsElsewhere reports how many sessions of user the other live nodes
// hold (presence: written within ~200 ms of a change, read through the
// client-side cache), for a bound of a user's connections across the
// cluster. Redis not answering: 0 (known false) — each node's own bound
// still holds.
func (c *Cluster) SessionsElsewhere(user int64) (n int, known bool) {
	return c.countElsewhere(connsKey(user))
}

// onlineElsewhere reports whether a live node other than this one holds a
// session of user (presence, client-side cached).
// (known false: Redis could not tell).
func (c *Cluster) onlineElsewhere(user int64) (online, known bool) {
	ctx, cancel := c.ctx()
	defer cancel()
	fields, err := c.rdb.DoCache(ctx, c.rdb.B().Hgetall().Key(userKey(user)).Cache(), 5*time.Second).AsStrMap()
	if err != nil {
		return false, false
	}
	alive, err := c.aliveBoots(ctx, fields)
	if err != nil {
		return false, false
	}
	for node, v := range fields {
		boot, _, _ := strings.Cut(v, "|")
		if node != c.cfg.Node && alive[node] == boot {
			return true, true
		}
	}
	return false, true
}

// Unregister implements Router.
func (c *Cluster) Unregister(s Session) {
	rooms := c.local.roomsOf(s)
	c.local.Unregister(s)
	for _, id := range rooms {
		c.markRoom(id)
	}
	u := s.UserID()
	c.mu.Lock()
	if cu := c.users[u]; cu != nil {
		cu.sessions--
		if cu.sessions <= 0 {
			cu.sessions = 0
			c.lingerUser(u, cu)
		}
	}
	c.mu.Unlock()
	c.markUser(u)
}

// lingerUser drops the user's subscription userLinger from now unless a
// session comes back (c.mu held). A subscription still being made is handed
// back here when it completes.
func (c *Cluster) lingerUser(u int64, cu *cuser) {
	cu.gen++
	gen := cu.gen
	time.AfterFunc(userLinger, func() {
		var sub *nats.Subscription
		c.mu.Lock()
		if c.users[u] == cu && cu.sessions == 0 && cu.gen == gen && !cu.subscribing {
			sub = cu.sub
			delete(c.users, u)
		}
		c.mu.Unlock()
		if sub != nil {
			_ = sub.Unsubscribe()
		}
	})
}

// SendUser implements Router: local sessions now, other nodes' through the
// user's subject (nothing is sent where nobody is subscribed). reached counts
// this node's sessions only.
func (c *Cluster) SendUser(user int64, p proto.Push) (string, int) {
	if p.Mid == "" {
		p.Mid = c.local.mids.Next()
	}
	m := encodeMsg(&p)
	regs := c.regsOf(user)
	n := c.local.sendMsg(user, m, false)
	if p.Ack && n == 0 {
		// Stored before it is published: a node that subscribes for the
		// user after the publish drains the list after subscribing.
		if c.keepAway(user, regs, m) {
			c.handOff(user, m, regs, false)
			return p.Mid, n
		}
	}
	if err := c.nc.Publish(userSubject(user), appendUserPush(nil, m)); err != nil {
		c.log.Warn("user push not published", "user", user, "err", err)
	}
	return p.Mid, n
}

// Stats implements Router.
func (c *Cluster) Stats() Stats { return c.local.Stats() }

// ClusterStats are the cluster router's counters.
type ClusterStats struct {
	BatchesOut, BatchesIn, PushesSequenced, GapFills, GapsLost, SequencerErrors, BadWire int64
	// HandoffsKept: reliable pushes for users on other nodes that no holder
	// answered (kept in the offline list, the holders hinted to drain it).
	HandoffsKept int64
	// EpochsForced: rooms whose counter this node found gone back in Redis
	// (a data loss) and moved to a new epoch.
	EpochsForced int64
	// PushesGivenUp: room pushes made on this node whose numbering failed
	// and was retried until the room closed here (or its final push's
	// window passed, or the node stopped) — lost, unless an attempt whose
	// reply was lost had numbered them.
	PushesGivenUp   int64
	SubscribedRooms int
}

// ClusterStats returns a snapshot.
func (c *Cluster) ClusterStats() ClusterStats {
	c.mu.Lock()
	n := len(c.rooms)
	c.mu.Unlock()
	return ClusterStats{
		BatchesOut: c.stats.batchesOut.Load(), BatchesIn: c.stats.batchesIn.Load(),
		PushesSequenced: c.stats.pushesSequenced.Load(), GapFills: c.stats.gapFills.Load(),
		GapsLost: c.stats.gapsLost.Load(), SequencerErrors: c.stats.seqErrors.Load(),
		BadWire: c.stats.badWire.Load(), HandoffsKept: c.stats.handoffsKept.Load(),
		EpochsForced: c.stats.epochsForced.Load(), PushesGivenUp: c.stats.pushesGivenUp.Load(), SubscribedRooms: n,
	}
}

// --- presence ---

func (c *Cluster) markRoom(id int64) {
	c.dirtyMu.Lock()
	c.dirtyRooms[id] = struct{}{}
	c.dirtyMu.Unlock()
}

func (c *Cluster) markUser(u int64) {
	c.dirtyMu.Lock()
	c.dirtyUsers[u] = struct{}{}
	c.dirtyMu.Unlock()
}

// heartbeat refreshes the alive key; when it was missing (Redis lost it, or
// this node was away longer than the TTL), every entry is written again.
func (c *Cluster) heartbeat(force bool) {
	ctx, cancel := c.ctx()
	defer cancel()
	prev, err := c.rdb.Do(ctx, c.rdb.B().Set().Key(aliveKey(c.cfg.Node)).Value(c.boot).Get().Px(c.cfg.PresenceTTL).Build()).ToString()
	if _, refused := rueidis.IsRedisErr(err); refused && !rueidis.IsRedisNil(err) {
		c.log.Error("cluster: the node's alive key not written (its presence stops counting elsewhere)", "err", err)
	}
	if (err == nil && prev != c.boot) || rueidis.IsRedisNil(err) || force {
		c.markAll()
	}
}

func (c *Cluster) markAll() {
	rooms := c.local.roomIDs()
	users := c.local.userIDs()
	c.dirtyMu.Lock()
	for _, id := range rooms {
		c.dirtyRooms[id] = struct{}{}
	}
	for _, u := range users {
		c.dirtyUsers[u] = struct{}{}
	}
	c.dirtyMu.Unlock()
}

// heartbeatLoop refreshes the alive key every third of PresenceTTL, on a
// goroutine of its own: a big flush (a start, the 6 h rewrite) on a slow
// Redis takes many pipelines and must not hold it back past the TTL (the
// other nodes would take this one for dead and drop its entries).
func (c *Cluster) heartbeatLoop() {
	defer c.wg.Done()
	t := time.NewTicker(max(c.cfg.PresenceTTL/3, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		c.heartbeat(false)
	}
}

func (c *Cluster) presenceLoop() {
	defer c.wg.Done()
	t := time.NewTicker(presenceEvery)
	defer t.Stop()
	rewrite := time.Now()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		if time.Since(rewrite) >= presenceRewrite {
			c.markAll() // keeps the hashes' expiry ahead
			rewrite = time.Now()
		}
		c.flushPresence()
	}
}

// flushPresence writes the dirty rooms' and users' entries of this node.
func (c *Cluster) flushPresence() {
	c.dirtyMu.Lock()
	rooms, users := c.dirtyRooms, c.dirtyUsers
	if len(rooms) == 0 && len(users) == 0 {
		c.dirtyMu.Unlock()
		return
	}
	c.dirtyRooms, c.dirtyUsers = map[int64]struct{}{}, map[int64]struct{}{}
	c.dirtyMu.Unlock()
	cmds := make(rueidis.Commands, 0, len(rooms)+len(users))
	for id := range rooms {
		if n := c.local.Online(id); n > 0 {
			cmds = append(cmds, c.rdb.B().Hset().Key(onlineKey(id)).FieldValue().
				FieldValue(c.cfg.Node, c.boot+":"+strconv.Itoa(n)).Build(),
				c.rdb.B().Pexpire().Key(onlineKey(id)).Milliseconds(presenceKeep.Milliseconds()).Build())
		} else {
			cmds = append(cmds, c.rdb.B().Hdel().Key(onlineKey(id)).Field(c.cfg.Node).Build())
		}
	}
	for u := range users {
		if n := c.local.userSessions(u); n > 0 {
			cmds = append(cmds, c.rdb.B().Hset().Key(userKey(u)).FieldValue().
				FieldValue(c.cfg.Node, c.boot+"|"+joinIDs(c.local.userRooms(u))).Build(),
				c.rdb.B().Pexpire().Key(userKey(u)).Milliseconds(presenceKeep.Milliseconds()).Build(),
				c.rdb.B().Hset().Key(connsKey(u)).FieldValue().
					FieldValue(c.cfg.Node, c.boot+":"+strconv.Itoa(n)).Build(),
				c.rdb.B().Pexpire().Key(connsKey(u)).Milliseconds(presenceKeep.Milliseconds()).Build())
		} else {
			cmds = append(cmds, c.rdb.B().Hdel().Key(userKey(u)).Field(c.cfg.Node).Build(),
				c.rdb.B().Hdel().Key(connsKey(u)).Field(c.cfg.Node).Build())
		}
	}
	for len(cmds) > 0 {
		n := min(len(cmds), 1024)
		ctx, cancel := c.ctx()
		res := c.rdb.DoMulti(ctx, cmds[:n]...)
		cancel()
		for _, r := range res {
			if err := r.Error(); err != nil {
				c.log.Warn("presence not written; retrying", "err", err)
				// Rewrite everything on the next tick — and what this flush
				// was to write: a room or user no longer here is not in
				// markAll's list, and its delete would be lost (the user's
				// sessions counted elsewhere for good while this node lives).
				c.markAll()
				c.dirtyMu.Lock()
				for id := range rooms {
					c.dirtyRooms[id] = struct{}{}
				}
				for u := range users {
					c.dirtyUsers[u] = struct{}{}
				}
				c.dirtyMu.Unlock()
				return
			}
		}
		cmds = cmds[n:]
		select {
		case <-c.stop: // Close deletes the alive key: what is left here stops counting
			return
		default:
		}
	}
}

func joinIDs(ids []int64) string {
	var b []byte
	for i, id := range ids {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, id, 10)
	}
	return string(b)
}

// clusterOnline is this node's members of room plus every other live node's.
func (c *Cluster) clusterOnline(id int64) int {
	n, _ := c.countElsewhere(onlineKey(id)) // Redis not answering: this node's
	return c.local.Online(id) + n
}

// countElsewhere sums the counts of a presence hash of node →
// "<boot>:<count>" (le:on, le:uc) over the live nodes other than this one,
// read through the client-side cache; a dead node's field is dropped
// (dropStale). known is false when Redis could not tell.
func (c *Cluster) countElsewhere(key string) (n int, known bool) {
	ctx, cancel := c.ctx()
	defer cancel()
	fields, err := c.rdb.DoCache(ctx, c.rdb.B().Hgetall().Key(key).Cache(), 5*time.Second).AsStrMap()
	if err != nil {
		return 0, false
	}
	alive, err := c.aliveBoots(ctx, fields)
	if err != nil {
		return 0, false
	}
	for node, v := range fields {
		if node == c.cfg.Node {
			continue
		}
		boot, cnt, _ := strings.Cut(v, ":")
		if alive[node] != boot {
			c.dropStale(key, node, v)
			continue
		}
		k, _ := strconv.Atoi(cnt)
		n += k
	}
	return n, true
}

// staleField is a dead node's field of a presence hash.
type staleField struct{ key, node string }

// maxStaleDrops bounds the presence fields being deleted at once.
const maxStaleDrops = 64

// dropStale deletes a dead node's presence field (best effort, in the
// background) unless it changed meanwhile. A field already being deleted is
// not deleted twice, and at most maxStaleDrops are at once: every join and
// room listing reads the (cached) hash and would otherwise start a
// goroutine per stale field until the cache saw the deletion. One skipped
// is deleted by a later read.
func (c *Cluster) dropStale(key, node, was string) {
	f := staleField{key, node}
	c.staleMu.Lock()
	if _, on := c.staleDrops[f]; on || len(c.staleDrops) >= maxStaleDrops {
		c.staleMu.Unlock()
		return
	}
	c.staleDrops[f] = struct{}{}
	c.staleMu.Unlock()
	go func() {
		defer func() {
			c.staleMu.Lock()
			delete(c.staleDrops, f)
			c.staleMu.Unlock()
		}()
		ctx, cancel := c.ctx()
		defer cancel()
		_ = hdelIfScript.Exec(ctx, c.rdb, []string{key}, []string{node, was}).Error()
	}()
}

var hdelIfScript = rueidis.NewLuaScript(`if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0`)

// aliveBoots returns the boot of each node named in fields that is alive
// (client-side cached; Redis invalidates on change and on expiry).
func (c *Cluster) aliveBoots(ctx context.Context, fields map[string]string) (map[string]string, error) {
	nodes := make([]string, 0, len(fields))
	cmds := make([]rueidis.CacheableTTL, 0, len(fields))
	for node := range fields {
		if node == c.cfg.Node {
			continue
		}
		nodes = append(nodes, node)
		cmds = append(cmds, rueidis.CT(c.rdb.B().Get().Key(aliveKey(node)).Cache(), 5*time.Second))
	}
	out := make(map[string]string, len(nodes))
	if len(cmds) == 0 {
		return out, nil
	}
	for i, r := range c.rdb.DoMultiCache(ctx, cmds...) {
		v, err := r.ToString()
		switch {
		case err == nil:
			out[nodes[i]] = v
		case !rueidis.IsRedisNil(err):
			// Not "no such key": Redis could not tell — never taken for a
			// dead node (whose fields would be dropped).
			return nil, err
		}
	}
	return out, nil
}
