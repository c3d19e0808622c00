package router

import (
	"sync"
	"time"
)

// offlineBox keeps reliable pushes (ack:true) for users with no session, so
// a gift result or a credit sent while the user was away is delivered when
// they connect again. Bounded: at most max per user (the oldest dropped),
// at most maxUsers users (a push for one more is dropped and counted), each
// push kept for ttl. Single-node mode; the cluster keeps them in Redis.
type offlineBox struct {
	max, maxUsers int
	ttl           time.Duration

	mu    sync.Mutex
	users map[int64][]offlineMsg
	// freeAt: no user's pushes expire before it (the last sweep's earliest
	// newest push): a full box is not swept again until then — a push for
	// one more user is refused at once, not after a scan of every user
	// under mu (a settlement crediting 100,000 users gone).
	freeAt int64
	sweeps int // sweeps run (tests)
}

type offlineMsg struct {
	msg     Msg
	expires int64 // unix ns
}

func newOfflineBox(max, maxUsers int, ttl time.Duration) *offlineBox {
	return &offlineBox{max: max, maxUsers: maxUsers, ttl: ttl, users: map[int64][]offlineMsg{}}
}

// put keeps m for user; false when the box is full.
func (b *offlineBox) put(user int64, m Msg, now time.Time) bool {
	if b.max <= 0 {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	q, ok := b.users[user]
	if !ok && len(b.users) >= b.maxUsers {
		if now.UnixNano() >= b.freeAt {
			b.sweepLocked(now.UnixNano())
		}
		if len(b.users) >= b.maxUsers {
			return false
		}
	}
	if len(q) >= b.max {
		q = append(q[:0], q[1:]...)
	}
	b.users[user] = append(q, offlineMsg{msg: m, expires: now.Add(b.ttl).UnixNano()})
	return true
}

// take removes and returns user's unexpired pushes, oldest first.
func (b *offlineBox) take(user int64, now time.Time) []Msg {
	b.mu.Lock()
	q := b.users[user]
	delete(b.users, user)
	b.mu.Unlock()
	out := make([]Msg, 0, len(q))
	for _, m := range q {
		if m.expires > now.UnixNano() {
			out = append(out, m.msg)
		}
	}
	return out
}

func (b *offlineBox) sweepLocked(now int64) {
	b.sweeps++
	b.freeAt = 0
	for u, q := range b.users {
		if len(q) == 0 || q[len(q)-1].expires <= now {
			delete(b.users, u)
		} else if e := q[len(q)-1].expires; b.freeAt == 0 || e < b.freeAt {
			b.freeAt = e
		}
	}
}
