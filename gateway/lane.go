package gateway

import (
	"sync"

	"github.com/lxzan/gws"

	"github.com/liveedge/liveedge/gateway/proto"
)

// A connection's requests are served in the order they arrive, on its
// reader — until one may wait on Redis (in a cluster: a join, whose room
// and history may be read there; a chat, numbered there). That one and
// every message after it go to the connection's lane: a goroutine that
// serves them in order, while the reader reads on and answers control
// frames at once (a ping's pong) — a request waiting on Redis no
// longer delays them. Once the lane has served what it was given it ends
// and the reader serves again. At most one lane per connection; the reader
// queues at most laneBytes of messages (copies) behind it and then waits,
// unread bytes staying in the socket (the client's own backpressure). The
// connection's end (the answer to a close frame, OnClose) comes after every
// message read before it is served, as on the reader.
type connLane struct {
	mu    sync.Mutex
	q     []laneMsg
	bytes int
	// space, when the reader waits for room in q, is closed (and cleared)
	// by the lane at its next message.
	space chan struct{}
	// onEnd: the reader's end of the connection, run by the lane once q
	// is served.
	onEnd func()
}

// laneMsg is a message queued behind a lane. One refused whatever it holds
// (binary, or text over proto.MaxFrameBytes) keeps no payload, only its
// refusal: what is queued holds at most a request's bytes each.
type laneMsg struct {
	op      gws.Opcode
	p       []byte
	refused *proto.Error
}

// newLaneMsg is b's entry (a copy, or its refusal).
func newLaneMsg(op gws.Opcode, b []byte) laneMsg {
	switch {
	case op != gws.OpcodeText:
		return laneMsg{op: op, refused: proto.ErrBinaryFrame}
	case len(b) > proto.MaxFrameBytes:
		return laneMsg{op: op, refused: proto.ErrFrameTooLarge}
	}
	return laneMsg{op: op, p: append([]byte(nil), b...)}
}

// cost is what m counts against laneBytes.
func (m laneMsg) cost() int { return len(m.p) + laneMsgCost }

// push queues m (l.mu held).
func (l *connLane) push(m laneMsg) {
	l.q = append(l.q, m)
	l.bytes += m.cost()
}

// laneBytes bounds what is queued behind a lane's request: each message
// costs its bytes and laneMsgCost (an empty frame is 6 bytes on the wire, a
// queue entry is more), so at most laneBytes/laneMsgCost messages; one
// message is always taken (at most proto.MaxFrameBytes kept).
const (
	laneBytes   = 64 << 10
	laneMsgCost = 64
)

// offload starts c's lane with the message b (a copy), unless the caller
// is the lane already (then false: the caller serves b itself). Only the
// reader starts a lane, and only while none runs (the reader queues behind
// a running one instead).
func (c *Conn) offload(op gws.Opcode, b []byte) bool {
	if c.laneOn.Load() {
		return false
	}
	if c.lane == nil {
		c.lane = &connLane{}
	}
	l := c.lane
	l.mu.Lock()
	l.push(newLaneMsg(op, b))
	c.laneOn.Store(true)
	l.mu.Unlock()
	c.srv.metrics.lanes.Add(1)
	go c.srv.runLane(c)
	return true
}

// queueBehindLane, on the reader, queues a copy of b behind c's lane if one runs
// (false: none does, the reader serves b). With laneBytes queued already it
// waits for the lane to take some.
func (c *Conn) queueBehindLane(op gws.Opcode, b []byte) bool {
	if !c.laneOn.Load() {
		return false
	}
	l := c.lane
	m := newLaneMsg(op, b)
	l.mu.Lock()
	defer l.mu.Unlock()
	for c.laneOn.Load() && len(l.q) > 0 && l.bytes+m.cost() > laneBytes {
		if l.space == nil {
			l.space = make(chan struct{})
		}
		ch := l.space
		l.mu.Unlock()
		c.holdReads(func() { <-ch })
		l.mu.Lock()
	}
	if !c.laneOn.Load() {
		return false
	}
	l.push(m)
	return true
}

// afterLane, on the reader at the connection's end, hands end to c's lane
// if one runs: it runs end once every message queued is served (false:
// none runs, the reader runs end).
func (c *Conn) afterLane(end func()) bool {
	if !c.laneOn.Load() {
		return false
	}
	l := c.lane
	l.mu.Lock()
	defer l.mu.Unlock()
	if !c.laneOn.Load() {
		return false
	}
	l.onEnd = end
	return true
}

// runLane serves c's lane until it is empty, then the reader's end if it
// was handed over.
func (s *Server) runLane(c *Conn) {
	l := c.lane
	for {
		l.mu.Lock()
		if len(l.q) == 0 {
			c.laneOn.Store(false)
			end := l.onEnd
			l.q, l.bytes, l.onEnd = nil, 0, nil
			l.mu.Unlock()
			s.metrics.lanes.Add(-1)
			if end != nil {
				end()
			}
			return
		}
		m := l.q[0]
		l.q[0] = laneMsg{}
		l.q = l.q[1:]
		l.bytes -= m.cost()
		if l.space != nil {
			close(l.space)
			l.space = nil
		}
		l.mu.Unlock()
		if m.refused != nil {
			s.refuseMessage(c, m.refused)
		} else {
			s.serveMessage(c, m.op, m.p)
		}
	}
}
