package gateway

import (
	"cmp"
	"encoding/binary"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

// maxPendingAcks bounds the reliable pushes awaiting an ack on one connection;
// a client that lets more pile up is treated as slow (close 4408).
const maxPendingAcks = 4096

// maxWriteBytes bounds one merged batch write; it stays a little under gws's
// largest pooled frame buffer (256 KiB) so that full writes reuse buffers.
const maxWriteBytes = 256<<10 - 8<<10

// Conn is one WebSocket connection: one reader (wsReader, which runs the
// handlers, on a goroutine only while the client sends) and at most one writer goroutine, taken (Server.startWriter) when
// the queue becomes non-empty and given back when it is drained.
//
// Invariants (under mu): queued == Σ size of queue; writingBytes is the size
// of the batch the writer took (or of a direct write's rest), until its
// write returns; of those, owedQueued and owedWriting are frames moved from
// the backlog, bounded apart (moveBacklog); the rest, queued - owedQueued +
// writingBytes - owedWriting ≤ ws.send_queue_bytes, give or take
// the one frame of a direct write (more closes the connection 4408: a
// stalled client holds about that many unsent bytes here, not a full queue
// beside a batch blocked in its write); once closeCode != 0 nothing
// more is queued; the writer is the only goroutine that writes to ws, except
// for gws's own control replies (pong, close echo) which take gws's lock.
type Conn struct {
	id    uint64
	ident Identity
	ws    *gws.Conn
	srv   *Server
	batch bool // the client accepts {"t":"batch"} frames
	// helloOut: the hello (always the first frame queued) has been written.
	// It goes out as a frame of its own, never merged into a batch with
	// what followed it (a push kept for the user while they were away
	// is queued right behind it). Writer goroutine only.
	helloOut bool
	// held: the writer role (writing) is held since the upgrade, until the
	// connection is registered with the router (Attached).
	held atomic.Bool

	lastRead atomic.Int64 // unix ns of the last frame read
	// readHeld: the reader holds off reading on purpose (the lane full
	// behind requests waiting on Redis, or MaxInflight gifts in flight):
	// the client's frames wait unread, so the silence is not the client's
	// (the sweep's 4402 skips it; lastRead is moved on when the wait ends).
	readHeld atomic.Bool
	// expires is when the connection's token ends (unix ns): the upgrade's
	// token's exp (ident.Expires), moved on by each refresh request.
	expires atomic.Int64

	mu           sync.Mutex
	queue        []*router.Frame
	queued       int
	writingBytes int // the batch being written (see the invariants)
	writing      bool
	closeCode    int // != 0: closing with this code
	// closing is closeCode != 0, read without mu: the reader serves no
	// frame read after the close was decided (its reply could not be
	// queued: a request run then — a chat posted, a gift debited — would
	// go unanswered while the writer drains or waits out a stalled write).
	closing atomic.Bool
	// registered: made reachable through the router (OnOpen), so OnClose
	// unregisters it — not one refused at a shutdown before that.
	registered atomic.Bool
	drain      bool // write what is queued before the close frame
	// backlog: frames of pushes owed from before (SendBacklog) waiting
	// for room; the writer moves them into the queue as it drains it
	// (moveBacklog). backlogMsgs counts their pushes (≤ maxBacklog);
	// backlogged is len(backlog) > 0 || draining, read without mu.
	// owedQueued and owedWriting are the bytes of moved frames in queued
	// and writingBytes: they have a budget of their own
	// (ws.send_queue_bytes again), so what a client is owed never leaves
	// its live traffic without room.
	backlog     []*router.Frame
	backlogMsgs int
	backlogged  atomic.Bool
	owedQueued  int
	owedWriting int
	// draining: the router is draining what the user is owed
	// (DrainStart); meanwhile the backlog's first owedEnd frames are the
	// owed ones, the rest live user pushes (Send) that wait behind every
	// owed push given until the drain is done — only those first ones move.
	draining bool
	owedEnd  int
	// ackWait: the backlog's first frame waits for acks (moveBacklog moved
	// nothing for the bound on unacked pushes); only kickBacklog, or a new
	// first frame, makes it movable again.
	ackWait   bool
	badCount  int
	badWindow time.Time

	// sem bounds async requests in flight; made by the first (begin, on
	// the goroutine serving requests: the reader or the lane), as most
	// connections never send one.
	sem chan struct{}
	// laneOn: a lane serves the connection's requests (lane.go); lane is
	// made by the first (on the reader).
	laneOn atomic.Bool
	lane   *connLane
	cork   *corkConn // the socket's net.Conn
	rd     *wsReader // reads the socket, runs the handlers

	// Reliable pushes awaiting an ack: pending is made by the first one
	// (most connections have none), ackDone is set once the connection is
	// gone (nothing more is tracked).
	ackMu sync.Mutex
	// resendMu makes resend passes one at a time, from choosing what is
	// due to queuing it: a pass re-arms the timer before it queues its
	// pushes, and the next pass (pushes due a moment later) would
	// otherwise queue its own ahead of them — resent out of order.
	resendMu sync.Mutex
	pending  map[string]*pendingPush
	ackDone  bool
	ackSeq   uint64
	given    int // pending entries given up on (kept for the hand-on at close)
	timer    *time.Timer
	timerAt  int64 // when timer fires, unix ns
	done     chan struct{}
}

type pendingPush struct {
	msg   router.Msg
	tries int
	next  time.Time
	seq   uint64 // order tracked (stopAcks)
	// given: resent ws.resend_max_tries times, not acked — no more resends
	// here; a user push is kept until the connection goes, then handed on
	// with the other unacked ones (the user's next session gets it).
	given bool
}

var (
	_ router.Session       = (*Conn)(nil)
	_ router.DirectSession = (*Conn)(nil)
	_ router.Backlogged    = (*Conn)(nil)
	_ router.Draining      = (*Conn)(nil)
)

// ID implements router.Session.
func (c *Conn) ID() uint64 { return c.id }

// UserID implements router.Session.
func (c *Conn) UserID() int64 { return c.ident.UserID }

// Send implements router.Session: queue f, never block. Its reliable pushes
// are tracked before f is queued: its writer may write it at once, and an
// ack that came before the tracking was lost — the push resent, then handed
// on at close as unacked (a duplicate on the user's next connection).
func (c *Conn) Send(f *router.Frame) bool {
	if c.backlogged.Load() && userPushes(f) {
		// Behind the older ones the client is still owed (an order's
		// status must not go back).
		return c.sendBacklog(f, false)
	}
	if !c.trackAll(f) {
		return false
	}
	queued := c.enqueue(f)
	if c.srv.afterEnqueue != nil {
		c.srv.afterEnqueue(c, f)
	}
	if queued {
		return true
	}
	// Refused: the connection is closing (or just closed as a slow
	// consumer). Tracked, f's reliable pushes are handed on by the close
	// (stopAcks), so f counts as sent; a frame with none is not sent.
	for i := range f.Msgs {
		if f.Msgs[i].Ack {
			return true
		}
	}
	return false
}

// trackAll tracks f's reliable pushes; false: the connection closed before
// they were all tracked (its queue, f with it, is discarded and its unacked
// pushes were handed on already), so the caller keeps f as unsent.
func (c *Conn) trackAll(f *router.Frame) bool {
	ok := true
	for i := range f.Msgs {
		if f.Msgs[i].Ack && !c.track(f.Msgs[i]) {
			ok = false
		}
	}
	return ok
}

// SendBacklog implements router.Backlogged: f waits in the backlog and the
// writer moves it into the queue once there is room for it, on a budget of
// its own (moveBacklog), so a client owed more than ws.send_queue_bytes when
// it connects (its offline pushes, those handed on from its other
// connection) takes them as fast as it reads instead of being closed 4408
// for them, and its live traffic keeps its room. Its reliable pushes are
// tracked when moved; live user pushes sent meanwhile wait behind it (Send).
// At most maxBacklog pushes wait so: more closes the connection as a slow
// consumer (they are handed on with the unacked ones, as are those that
// wait when it closes). False: closed, f's pushes not taken.
func (c *Conn) SendBacklog(f *router.Frame) bool { return c.sendBacklog(f, true) }

// sendBacklog puts f in the backlog: at its end, or, owed while the router
// drains (DrainStart), behind the owed frames only — ahead of the live
// pushes that came meanwhile.
func (c *Conn) sendBacklog(f *router.Frame, owed bool) bool {
	c.ackMu.Lock()
	if c.ackDone {
		c.ackMu.Unlock()
		return false
	}
	c.mu.Lock()
	if c.closeCode != 0 && !slices.ContainsFunc(f.Msgs, func(m router.Msg) bool { return m.Ack }) {
		c.mu.Unlock()
		c.ackMu.Unlock()
		return false // nothing in f the close would hand on
	}
	at := len(c.backlog)
	if owed && c.draining {
		at = c.owedEnd
		c.owedEnd++
	}
	c.backlog = slices.Insert(c.backlog, at, f)
	if at == 0 {
		c.ackWait = false // a new first frame: it may fit where the last did not
	}
	c.backlogMsgs += len(f.Msgs)
	c.backlogged.Store(true)
	over := c.closeCode == 0 && c.backlogMsgs > c.maxBacklog()
	start := !over && !c.writing && c.closeCode == 0 && c.movable()
	if start {
		c.writing = true
	}
	c.mu.Unlock()
	c.ackMu.Unlock()
	switch {
	case over:
		c.srv.metrics.queueDrops.Inc()
		c.Close(proto.CloseSlowConsumer, false)
	case start:
		c.srv.startWriter(c)
	}
	return true
}

// DrainStart implements router.Draining: until DrainDone, live reliable
// user pushes wait in the backlog behind the owed ones.
func (c *Conn) DrainStart() {
	c.mu.Lock()
	c.draining = true
	c.backlogged.Store(true)
	c.mu.Unlock()
}

// DrainDone implements router.Draining: the live pushes that waited move
// behind the owed ones.
func (c *Conn) DrainDone() {
	c.mu.Lock()
	c.draining, c.owedEnd = false, 0
	if len(c.backlog) == 0 {
		c.backlog = nil
		c.backlogged.Store(false)
	}
	start := c.movable() && !c.writing && c.closeCode == 0
	if start {
		c.writing = true
	}
	c.mu.Unlock()
	if start {
		c.srv.startWriter(c)
	}
}

// movable reports whether the backlog holds frames the writer may move
// (not while its first waits for acks; while the router drains, the owed
// ones only). mu held.
func (c *Conn) movable() bool {
	return len(c.backlog) > 0 && !c.ackWait && (!c.draining || c.owedEnd > 0)
}

// maxBacklog bounds the pushes waiting in a backlog: what a connection may
// hold unacked, or a whole offline box if that is more.
func (c *Conn) maxBacklog() int { return max(router.MaxHandOn, c.srv.cfg.WS.OfflineMax) }

// userPushes reports whether f holds reliable user pushes only (what a
// backlog holds).
func userPushes(f *router.Frame) bool {
	for i := range f.Msgs {
		if !f.Msgs[i].Ack || f.Msgs[i].Off != 0 {
			return false
		}
	}
	return len(f.Msgs) > 0
}

// kickBacklog starts a writer for a backlog left waiting on acks
// (moveBacklog) once some came.
func (c *Conn) kickBacklog() {
	if !c.backlogged.Load() {
		return
	}
	c.mu.Lock()
	c.ackWait = false // a writer running sees it before it leaves (writeLoop)
	start := c.movable() && !c.writing && c.closeCode == 0
	if start {
		c.writing = true
	}
	c.mu.Unlock()
	if start {
		c.srv.startWriter(c)
	}
}

// moveBacklog moves the backlog's first frames into the queue while the
// moved bytes not yet written stay within ws.send_queue_bytes (the first
// frame always, when there are none) and the pushes awaiting an ack within
// half of maxPendingAcks (beyond, the backlog waits for acks: kickBacklog;
// the other half is left to live reliable pushes, which close the
// connection at the bound), and
// tracks their reliable pushes — under ackMu, so that a close's stopAcks
// finds each of them either still waiting or pending. Writer only (nothing
// it moves is written before it returns).
func (c *Conn) moveBacklog() {
	c.ackMu.Lock()
	defer c.ackMu.Unlock()
	if c.ackDone {
		return
	}
	c.mu.Lock()
	if c.closeCode != 0 {
		c.mu.Unlock()
		return
	}
	inFlight := c.owedQueued + c.owedWriting
	room := c.srv.cfg.WS.SendQueueBytes - inFlight
	acks := maxPendingAcks/2 - (len(c.pending) - c.given)
	limit := len(c.backlog)
	if c.draining {
		limit = c.owedEnd // the live pushes behind wait for the drain's end
	}
	n, msgs, size := 0, 0, 0
	for n < limit {
		f := c.backlog[n]
		if len(f.Msgs) > acks-msgs {
			c.ackWait = n == 0
			break
		}
		if f.Size() > room-size && (n > 0 || inFlight > 0) {
			break
		}
		size += f.Size()
		msgs += len(f.Msgs)
		n++
	}
	if n == 0 {
		c.mu.Unlock()
		return
	}
	moved := slices.Clone(c.backlog[:n])
	c.queue = append(c.queue, moved...)
	c.queued += size
	c.owedQueued += size
	c.backlogMsgs -= msgs
	clear(c.backlog[:n]) // the moved frames are not kept alive by the backlog
	c.backlog = c.backlog[n:]
	if c.draining {
		c.owedEnd -= n
	}
	if len(c.backlog) == 0 {
		c.backlog = nil
		c.backlogged.Store(c.draining)
	}
	c.mu.Unlock()
	for _, f := range moved {
		for i := range f.Msgs {
			if f.Msgs[i].Ack {
				c.trackLocked(f.Msgs[i])
			}
		}
	}
}

// SendNow implements router.DirectSession: when nothing is queued or being
// written, f is written here and now with one non-blocking write (the frame
// bytes are shared by every receiver: f.Wire); the caller (a room's fan-out)
// takes the writer role for the length of that write. What the socket does
// not take, and anything queued meanwhile, is left to a writer goroutine.
// Otherwise f is queued as by Send. The router counts the direct writes
// (frames_direct_total, part of frames_out_total): no shared counter is
// touched per write here.
func (c *Conn) SendNow(f *router.Frame) (ok, direct bool) {
	if c.cork.raw == nil || (!c.batch && len(f.Msgs) != 1) {
		return c.Send(f), false
	}
	c.mu.Lock()
	if c.writing || c.closeCode != 0 || (c.batch && !c.helloOut) {
		c.mu.Unlock()
		return c.Send(f), false
	}
	c.writing = true
	c.mu.Unlock()
	if !c.trackAll(f) {
		// Closed meanwhile: not sent (the caller keeps it); the writer
		// role goes on to a writer goroutine, which writes the close.
		c.srv.startWriter(c)
		return false, false
	}
	left, busy, err := c.cork.writeNow(f.Wire(wsTextFrame))
	if busy {
		// A control frame is being written (maybe blocked on a full
		// socket): f goes to the queue (this holds the writer role, so
		// no writer starts there) and a writer goroutine takes the role
		// over; the room's fan-out goes on. Tracked, f counts as sent
		// even if the queue refuses it (closing): the close hands its
		// unacked pushes on.
		c.enqueue(f)
		c.srv.startWriter(c)
		return true, false
	}
	if err != nil {
		c.cork.closeNow() // gws did not see this write: end the read
		c.lost()
		return true, false
	}
	c.mu.Lock()
	if !left && len(c.queue) == 0 && !c.movable() && c.closeCode == 0 {
		c.writing = false
		c.mu.Unlock()
		return true, true
	}
	if left {
		c.writingBytes = f.Size() // what the socket did not take, at most (the writer settles it)
	}
	c.mu.Unlock()
	c.srv.startWriter(c)
	return true, true
}

// wsTextFrame is p as one unmasked, final WebSocket text frame (a server's
// frame, RFC 6455 §5.2; no extension is negotiated).
func wsTextFrame(p []byte) []byte {
	n := len(p)
	var b []byte
	switch {
	case n < 126:
		b = make([]byte, 2, 2+n)
		b[1] = byte(n)
	case n <= 0xFFFF:
		b = make([]byte, 4, 4+n)
		b[1] = 126
		binary.BigEndian.PutUint16(b[2:], uint16(n))
	default:
		b = make([]byte, 10, 10+n)
		b[1] = 127
		binary.BigEndian.PutUint64(b[2:], uint64(n))
	}
	b[0] = 0x80 | byte(gws.OpcodeText)
	return append(b, p...)
}

// begin counts one asynchronous request (a gift waiting for its durable
// debit) in; at most cap(sem) are in flight per connection, beyond that the
// reader waits (backpressure on this client only). end counts it out.
// false: the node decided to close the connection (or stops) while the
// reader waited — the request is not served (its reply could not be
// queued; a debit could start after Shutdown's wait), nothing to end. It is
// counted before it waits, so Shutdown's wait covers a reader that waits.
func (c *Conn) begin() bool {
	if c.sem == nil {
		c.sem = make(chan struct{}, c.srv.cfg.Gifts.MaxInflight)
	}
	c.srv.inflight.Add(1)
	select {
	case c.sem <- struct{}{}:
	default:
		c.holdReads(func() { c.sem <- struct{}{} })
	}
	if c.closing.Load() || c.srv.draining.Load() {
		c.end()
		return false
	}
	return true
}

// holdReads runs wait, during which the reader reads nothing on purpose:
// the sweep does not take the client for silent meanwhile (before, a client
// that kept sending behind a full lane was closed 4402), and its silence
// counts from the wait's end.
func (c *Conn) holdReads(wait func()) {
	c.readHeld.Store(true)
	wait()
	c.lastRead.Store(time.Now().UnixNano())
	c.readHeld.Store(false)
}

func (c *Conn) end() {
	<-c.sem
	c.srv.inflight.Done()
}

// QueueRoom implements router.QueueRoom: the bytes the send queue can still
// take before the connection is closed as a slow consumer.
func (c *Conn) QueueRoom() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.srv.cfg.WS.SendQueueBytes - (c.queued - c.owedQueued) - (c.writingBytes - c.owedWriting)
}

// Attached implements router.Attached: the connection is registered, the
// writer role held since the upgrade goes to a writer (once).
func (c *Conn) Attached() {
	if c.held.CompareAndSwap(true, false) {
		c.srv.startWriter(c)
	}
	if c.srv.afterAttached != nil {
		c.srv.afterAttached(c)
	}
}

// reply queues a reply frame.
func (c *Conn) reply(b []byte) {
	c.enqueue(router.NewFrame(router.Msg{Bytes: b}))
}

func (c *Conn) enqueue(f *router.Frame) bool {
	c.mu.Lock()
	if c.closeCode != 0 {
		c.mu.Unlock()
		return false
	}
	if c.queued-c.owedQueued+c.writingBytes-c.owedWriting+f.Size() > c.srv.cfg.WS.SendQueueBytes {
		c.mu.Unlock()
		c.srv.metrics.queueDrops.Inc()
		c.Close(proto.CloseSlowConsumer, false)
		return false
	}
	c.queue = append(c.queue, f)
	c.queued += f.Size()
	start := !c.writing
	c.writing = true
	c.mu.Unlock()
	if start {
		c.srv.startWriter(c)
	}
	return true
}

// Close closes the connection with code. With drain, what is queued is written
// first (bounded by the write timeout); without, it is discarded.
func (c *Conn) Close(code int, drain bool) {
	c.mu.Lock()
	if c.closeCode != 0 {
		c.mu.Unlock()
		return
	}
	c.closeCode, c.drain = code, drain
	c.closing.Store(true)
	if !drain {
		c.dropQueue()
	}
	start := !c.writing
	c.writing = true
	c.mu.Unlock()
	if code == proto.CloseSlowConsumer {
		c.srv.metrics.slowCloses.Inc()
	}
	if start {
		c.srv.startWriter(c)
	}
}

// writeLoop drains the queue; it exits when the queue is empty, or after
// writing the close frame.
func (c *Conn) writeLoop() {
	var spare []*router.Frame
	var pieces [][]byte
	// The rest of a direct write (SendNow) goes first; only the holder of
	// the writer role writes directly, so nothing is owed after this.
	if err := c.cork.settle(); err != nil {
		c.cork.closeNow() // gws did not see this write: end the read
		c.lost()
		return
	}
	for {
		c.mu.Lock()
		c.writingBytes, c.owedWriting = 0, 0 // the last batch is written
		if c.movable() && c.closeCode == 0 {
			c.mu.Unlock()
			c.moveBacklog()
			c.mu.Lock()
		}
		code, drain := c.closeCode, c.drain
		if len(c.queue) == 0 || (code != 0 && !drain) {
			if code == 0 && c.movable() {
				// Acks came since moveBacklog looked (kickBacklog cleared
				// ackWait): with nothing queued, the next move takes at
				// least the first frame, or finds the acks short again.
				c.mu.Unlock()
				continue
			}
			if code == 0 {
				c.writing = false
				c.mu.Unlock()
				return
			}
			c.dropQueue()
			c.mu.Unlock()
			// The close frame sits behind what the kernel still holds for
			// the client (for 4408, a full socket buffer): it gets a whole
			// fresh write timeout (not what is left of the last data
			// write's), so a client that stalled but is alive and reads
			// again within it learns why it was cut off. Only this
			// connection's writer waits; shutdown cuts it at its deadline.
			c.cork.refreshNext()
			_ = c.ws.WriteClose(uint16(code), []byte(proto.CloseReason(code)))
			c.srv.metrics.closes.WithLabelValues(closeLabel(code)).Inc()
			return
		}
		frames := c.queue
		c.writingBytes, c.owedWriting = c.queued, c.owedQueued
		c.queue, c.queued, c.owedQueued = spare[:0], 0, 0
		c.mu.Unlock()

		corked := c.needsCork(frames)
		if corked {
			c.cork.cork()
		}
		var err error
		pieces, err = c.write(frames, pieces[:0])
		if corked {
			if ferr := c.cork.flush(); ferr != nil && err == nil {
				// gws did not see this write fail: close the socket so that
				// its read loop ends and OnClose cleans up.
				c.cork.closeNow()
				err = ferr
			}
		}
		clear(frames)
		clear(pieces)
		spare = frames
		if err != nil {
			c.lost() // gws has closed the socket
			return
		}
	}
}

// dropQueue discards what is queued (closing: nothing more is written but
// the close frame). mu held.
func (c *Conn) dropQueue() { c.queue, c.queued, c.owedQueued = nil, 0, 0 }

// lost gives up on a connection whose socket failed a write: nothing more
// is queued or written (the writer role stays taken, the queue is
// dropped); its read loop ends on the closed socket and OnClose cleans up.
// No close frame follows (the failed write may have cut a frame short): the
// client sees 1006, even when a close (4408, say) was already decided.
func (c *Conn) lost() {
	c.srv.metrics.closes.WithLabelValues("write_failed").Inc()
	c.mu.Lock()
	c.dropQueue()
	c.writingBytes, c.owedWriting = 0, 0
	if c.closeCode == 0 {
		c.closeCode = proto.CloseGoingAway
	}
	c.closing.Store(true)
	c.mu.Unlock()
}

// needsCork reports whether writing frames takes more than one WebSocket
// frame (then they are corked into one write(2)); a single frame is written
// straight through, without the extra copy.
func (c *Conn) needsCork(frames []*router.Frame) bool {
	if !c.batch {
		return len(frames) > 1 || (len(frames) == 1 && len(frames[0].Msgs) > 1)
	}
	if len(frames) == 1 {
		return false // one prebuilt batch frame
	}
	size := 0
	for _, f := range frames {
		size += f.Size()
	}
	return size > maxWriteBytes
}

var (
	batchOpen  = []byte(`{"t":"batch","d":[`)
	batchComma = []byte(",")
	batchClose = []byte("]}")
)

// write sends frames (corked by the caller when they make several
// WebSocket frames: one write(2) for the pass):
// merged into batch frames for clients that accept them, one WebSocket frame
// per message otherwise. A merged batch is written as a
// vector of the shared message bytes (gws frames it with one copy), never
// rebuilt per connection. pieces is scratch space, returned for reuse.
func (c *Conn) write(frames []*router.Frame, pieces [][]byte) ([][]byte, error) {
	m := c.srv.metrics
	if !c.batch {
		for _, f := range frames {
			for i := range f.Msgs {
				if err := c.ws.WriteMessage(gws.OpcodeText, f.Msgs[i].Bytes); err != nil {
					return pieces, err
				}
				m.framesOut.Add(1)
			}
		}
		return pieces, nil
	}
	if !c.helloOut && len(frames) > 0 {
		c.helloOut = true
		m.framesOut.Add(1)
		if err := c.ws.WriteMessage(gws.OpcodeText, frames[0].Batch()); err != nil {
			return pieces, err
		}
		frames = frames[1:]
		if len(frames) == 0 {
			return pieces, nil
		}
	}
	if len(frames) == 1 {
		m.framesOut.Add(1)
		return pieces, c.ws.WriteMessage(gws.OpcodeText, frames[0].Batch())
	}
	n, size := 0, 0
	flush := func() error {
		var err error
		switch n {
		case 0:
			return nil
		case 1:
			err = c.ws.WriteMessage(gws.OpcodeText, pieces[1])
		default:
			pieces = append(pieces, batchClose)
			err = c.ws.Writev(gws.OpcodeText, pieces...)
		}
		m.framesOut.Add(1)
		pieces, n, size = pieces[:0], 0, 0
		return err
	}
	for _, f := range frames {
		for i := range f.Msgs {
			b := f.Msgs[i].Bytes
			if size > 0 && size+len(b) > maxWriteBytes {
				if err := flush(); err != nil {
					return pieces, err
				}
			}
			if n == 0 {
				pieces = append(pieces, batchOpen)
			} else {
				pieces = append(pieces, batchComma)
			}
			pieces = append(pieces, b)
			n++
			size += len(b) + 1
		}
	}
	return pieces, flush()
}

// track registers a reliable push for resend until acked. A push already
// pending (a resend of it) keeps its schedule.
func (c *Conn) track(m router.Msg) bool {
	c.ackMu.Lock()
	if c.ackDone {
		c.ackMu.Unlock()
		return false // closed
	}
	if _, ok := c.pending[m.Mid]; !ok && len(c.pending)-c.given >= maxPendingAcks {
		c.ackMu.Unlock()
		c.Close(proto.CloseSlowConsumer, false)
		return false
	}
	c.trackLocked(m)
	c.ackMu.Unlock()
	return true
}

// trackLocked is track without its checks (ackMu held, not closed).
func (c *Conn) trackLocked(m router.Msg) {
	if c.pending == nil {
		c.pending = map[string]*pendingPush{}
	}
	if _, ok := c.pending[m.Mid]; ok {
		return
	}
	after := c.srv.cfg.WS.ResendAfter.D()
	c.ackSeq++
	next := time.Now().Add(after)
	c.pending[m.Mid] = &pendingPush{msg: m, next: next, seq: c.ackSeq}
	// The timer runs for the earliest push due: one armed for an older
	// push's backed-off resend (base << tries) would hold this one's first
	// resend back as long. (A timer already firing re-arms for it.)
	if c.timer == nil || (c.timerAt > next.UnixNano() && c.timer.Stop()) {
		c.timer, c.timerAt = time.AfterFunc(after, c.resendDue), next.UnixNano()
	}
}

// dropOldestGiven keeps at most ws.offline_max given-up pushes
// (router.MaxHandOn with the offline boxes off) — what the hand-on at close
// keeps anyway (router's newest) — dropping the oldest; one pass per resend
// round (ackMu held). Before, with the boxes off it kept none: pushes given
// up on were lost at the close instead of handed on.
func (c *Conn) dropOldestGiven() {
	keep := c.srv.cfg.WS.OfflineMax
	if keep <= 0 {
		keep = router.MaxHandOn
	}
	over := c.given - keep
	if over <= 0 {
		return
	}
	given := make([]*pendingPush, 0, c.given)
	for _, p := range c.pending {
		if p.given {
			given = append(given, p)
		}
	}
	slices.SortFunc(given, func(a, b *pendingPush) int { return cmp.Compare(a.seq, b.seq) })
	for _, p := range given[:over] {
		delete(c.pending, p.msg.Mid)
	}
	c.given -= over
	c.srv.metrics.givenDropped.Add(float64(over))
}

// maxResendShift caps the resend backoff's doubling (base << tries).
const maxResendShift = 16

// acked forgets acknowledged pushes.
func (c *Conn) acked(mids []string) {
	c.ackMu.Lock()
	forgot := false
	for _, mid := range mids {
		if p, ok := c.pending[mid]; ok {
			if p.given {
				c.given--
			}
			delete(c.pending, mid)
			forgot = true
		}
	}
	c.ackMu.Unlock()
	if forgot {
		c.kickBacklog()
	}
}

// resendDue resends every due push (backoff doubles per try) and re-arms the
// timer for the next one.
func (c *Conn) resendDue() {
	c.resendMu.Lock()
	defer c.resendMu.Unlock()
	now := time.Now()
	var due []*pendingPush
	c.ackMu.Lock()
	if c.ackDone {
		c.ackMu.Unlock()
		return
	}
	c.timer = nil
	// While pushes moved from the backlog are still queued or being
	// written, the round is put off: a resend would go out ahead of pushes
	// not written yet, and what was sent is still on its way. (A backlog
	// waiting on acks has none in flight: the round runs, and gives up on
	// pushes — which makes room for it.) A round queues at most half the
	// room the queue has now (the first due push, the whole queue when
	// nothing else is in it): the rest waits for the next try — a slow
	// reader's resends wait for room rather than overflow its queue (4408).
	c.mu.Lock()
	owing := c.owedQueued+c.owedWriting > 0
	live := c.queued - c.owedQueued + c.writingBytes - c.owedWriting
	room := (c.srv.cfg.WS.SendQueueBytes - live) / 2
	c.mu.Unlock()
	freed := false // a push given up on: room for a waiting backlog
	base := c.srv.cfg.WS.ResendAfter.D()
	var cand []*pendingPush
	for mid, p := range c.pending {
		switch {
		case p.given || p.next.After(now):
		case owing:
			p.next = now.Add(base)
		case p.tries >= c.srv.cfg.WS.ResendMaxTries:
			freed = true
			c.srv.metrics.resendGiveUps.Inc()
			if p.msg.Off > 0 {
				delete(c.pending, mid) // a room push: recovered by the room's offsets
			} else {
				p.given = true // a user push: handed on at close
				c.given++
			}
		default:
			cand = append(cand, p)
		}
	}
	// In the order they were first sent (the map's is random: two order
	// status pushes resent swapped would show a client its order going
	// back); once one is put off, so are those after it.
	slices.SortFunc(cand, func(a, b *pendingPush) int { return cmp.Compare(a.seq, b.seq) })
	queue := c.srv.cfg.WS.SendQueueBytes
	for _, p := range cand {
		size := len(p.msg.Bytes)
		fits := room >= 0 && (size <= room || (len(due) == 0 && live == 0 && size <= queue))
		if !fits {
			room = -1 // those after it wait too
		} else {
			room -= size
			due = append(due, p)
		}
		// A push put off for room counts the try all the same: one that
		// never fits (the queue never empties, or it is larger than the
		// queue) is given up on after resend_max_tries, as one not acked.
		p.tries++
		p.next = now.Add(base << min(p.tries, maxResendShift))
	}
	var next time.Time
	for _, p := range c.pending {
		if !p.given && (next.IsZero() || p.next.Before(next)) {
			next = p.next
		}
	}
	c.dropOldestGiven()
	if !next.IsZero() {
		c.timer, c.timerAt = time.AfterFunc(time.Until(next), c.resendDue), next.UnixNano()
	}
	// In frames of at most resendFrameBytes: one frame of thousands of
	// pushes could not be queued whole.
	msgs := make([]router.Msg, len(due))
	for i, p := range due {
		msgs[i] = p.msg
	}
	c.ackMu.Unlock()
	if freed {
		c.kickBacklog()
	}
	if len(msgs) > 0 {
		c.srv.metrics.resends.Add(float64(len(msgs)))
	}
	frameBytes := min(resendFrameBytes, c.srv.cfg.WS.SendQueueBytes/4)
	for len(msgs) > 0 {
		n, size := 1, len(msgs[0].Bytes)
		for n < len(msgs) && size+len(msgs[n].Bytes) <= frameBytes {
			size += len(msgs[n].Bytes)
			n++
		}
		if !c.enqueue(router.NewFrame(msgs[:n:n]...)) {
			return
		}
		msgs = msgs[n:]
	}
}

// resendFrameBytes bounds the pushes of one resend frame (and a quarter of
// ws.send_queue_bytes: a resend of many pushes does not fill the queue).
const resendFrameBytes = 64 << 10

// stopAcks stops the resends when the connection is gone and returns the
// reliable user pushes not acked (room pushes, Off > 0, are recovered by the
// room's offsets), in the order they were sent, then those still waiting in
// the backlog.
func (c *Conn) stopAcks() []router.Msg {
	c.ackMu.Lock()
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	var kept []*pendingPush
	for _, p := range c.pending {
		if p.msg.Off == 0 {
			kept = append(kept, p)
		}
	}
	c.pending, c.ackDone = nil, true
	c.mu.Lock()
	waiting := c.backlog
	c.backlog, c.backlogMsgs, c.owedEnd, c.ackWait = nil, 0, 0, false
	c.backlogged.Store(false)
	c.mu.Unlock()
	c.ackMu.Unlock()
	slices.SortFunc(kept, func(a, b *pendingPush) int { return cmp.Compare(a.seq, b.seq) })
	unacked := make([]router.Msg, len(kept), len(kept)+len(waiting))
	for i, p := range kept {
		unacked[i] = p.msg
	}
	for _, f := range waiting {
		for _, m := range f.Msgs {
			if m.Ack && m.Off == 0 {
				unacked = append(unacked, m)
			}
		}
	}
	return unacked
}

// badFrame answers and counts a malformed frame (binary, oversized, not JSON:
// proto.IsMalformed); more than ws.abuse_limit within a minute close with 4400.
func (c *Conn) badFrame(id int64, e *proto.Error) {
	c.srv.metrics.badFrames.Inc()
	c.reply(proto.EncodeErrorReply(id, e))
	now := time.Now()
	c.mu.Lock()
	if now.Sub(c.badWindow) > time.Minute {
		c.badWindow, c.badCount = now, 0
	}
	c.badCount++
	abuse := c.badCount > c.srv.cfg.WS.AbuseLimit
	c.mu.Unlock()
	if abuse {
		c.Close(proto.CloseAbuse, true)
	}
}

func closeLabel(code int) string {
	switch code {
	case proto.CloseGoingAway:
		return "going_away"
	case proto.CloseAbuse:
		return "abuse"
	case proto.CloseHeartbeatTimeout:
		return "heartbeat"
	case proto.CloseTokenExpired:
		return "token_expired"
	case proto.CloseSlowConsumer:
		return "slow"
	case proto.CloseNormal:
		return "normal"
	}
	return "other"
}
