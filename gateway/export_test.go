package gateway

import (
	"crypto/sha1"
	"fmt"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

// ConnUsers is the number of users holding a connection slot (the per-user
// count map's size), for tests that check the map stays bounded.
func (s *Server) ConnUsers() int { return s.users.size() }

// WriterTook reports whether user has a connection whose writer holds a
// batch (or a direct write's rest) with nothing queued behind it: blocked on
// a client that stopped reading.
func (s *Server) WriterTook(user int64) bool {
	for _, c := range s.snapshot() {
		if c.ident.UserID != user {
			continue
		}
		c.mu.Lock()
		took := c.writing && len(c.queue) == 0 && c.closeCode == 0
		c.mu.Unlock()
		if took {
			return true
		}
	}
	return false
}

// AckRightAfterEnqueue makes every Conn.Send of s ack the frame's reliable
// pushes right after it is queued — as a client does that reads and acks
// a push before the sending goroutine runs again.
func (s *Server) AckRightAfterEnqueue() {
	s.afterEnqueue = func(c *Conn, f *router.Frame) {
		var mids []string
		for _, m := range f.Msgs {
			if m.Ack {
				mids = append(mids, m.Mid)
			}
		}
		c.acked(mids)
	}
}

// OnAttached makes s run f with the user of each connection the router has
// just made reachable, before what the user is owed is given to it. Set
// before any connection.
func (s *Server) OnAttached(f func(user int64)) {
	s.afterAttached = func(c *Conn) { f(c.ident.UserID) }
}

// PendingAcks is the number of reliable pushes user's connections wait an
// ack for.
func (s *Server) PendingAcks(user int64) int {
	return s.sumOver(user, func(c *Conn) int {
		c.ackMu.Lock()
		defer c.ackMu.Unlock()
		return len(c.pending)
	})
}

// PanicOnFrame makes s's handler of frames of type t panic, as a bug would.
func (s *Server) PanicOnFrame(t string) {
	s.onFrame = func(ft string) {
		if ft == t {
			panic("a handler bug (test)")
		}
	}
}

// ShortenChatClaims makes s's chat claims in flight (a cluster's, in Redis)
// last d instead of chatInFlightTTL — and their chats numbered within half
// of it or never. Set before any connection.
func (s *Server) ShortenChatClaims(d time.Duration) { s.chatOnce.(*redisChatOnce).ttl = d }

// FailChatClaims makes every chat claim of s fail with perr after the
// chat's rate was checked, as a cluster's Redis that stopped answering
// between the two would. Set before any connection.
func (s *Server) FailChatClaims(perr *proto.Error) { s.chatOnce = failingClaims{s.chatOnce, perr} }

type failingClaims struct {
	chatOnce
	perr *proto.Error
}

func (f failingClaims) claim(int64, string) (string, func(string), *proto.Error) {
	return "", nil, f.perr
}

// PauseChat holds the chats with req_id req at two steps: right after its
// claim was taken, until claimed returns; right after its publish
// returned, before its claim is settled, until published returns.
func (s *Server) PauseChat(req string, claimed, published func()) {
	f := func(r string, done bool) {
		switch {
		case r != req:
		case done:
			published()
		default:
			claimed()
		}
	}
	s.chatStep.Store(&f)
}

// Backlogged is the number of pushes waiting in the backlogs of user's
// connections (SendBacklog).
func (s *Server) Backlogged(user int64) int {
	return s.sumOver(user, func(c *Conn) int {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.backlogMsgs
	})
}

// sumOver sums f over user's connections.
func (s *Server) sumOver(user int64, f func(c *Conn) int) int {
	n := 0
	for _, c := range s.snapshot() {
		if c.ident.UserID == user {
			n += f(c)
		}
	}
	return n
}

// SetHandshakeBounds sets the bounds on upgrade requests read at once, in
// all and per address, for the servers started after it; restore puts the
// defaults back.
func SetHandshakeBounds(all, perIP int) (restore func()) {
	a, p := maxHandshakes, maxHandshakesPerIP
	maxHandshakes, maxHandshakesPerIP = all, perIP
	return func() { maxHandshakes, maxHandshakesPerIP = a, p }
}

// HandshakesReading is the number of upgrade requests s is reading.
func (s *Server) HandshakesReading() int { return s.handshakes.reading() }

// ConfirmReqSHA is the SHA-1 of the script that confirms a req_id's order
// binding (a fault proxy's pattern for its EVALSHA).
var ConfirmReqSHA = fmt.Sprintf("%x", sha1.Sum([]byte(confirmLua)))

// RainOwner is who this node asks for code's rain (rainOwner), with the
// owners it saw first aged past their lease's TTL.
func (n *Node) RainOwner(code string) (string, error) {
	n.owners.mu.Lock()
	for w, o := range n.owners.m {
		o.at = time.Time{}
		n.owners.m[w] = o
	}
	n.owners.mu.Unlock()
	return n.rainOwner(code)
}
