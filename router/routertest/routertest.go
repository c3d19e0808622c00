// Package routertest has a router.Session that records what it is sent, for
// tests of packages that push through a router.
package routertest

import (
	"sync"
	"time"

	"github.com/liveedge/liveedge/router"
)

// Received is one message a Recorder was sent, and when.
type Received struct {
	Bytes []byte // the encoded push frame
	At    time.Time
}

// Recorder is a router.Session that keeps every message it is sent.
type Recorder struct {
	SessionID uint64
	User      int64

	mu  sync.Mutex
	got []Received
}

var _ router.Session = (*Recorder)(nil)

// ID implements router.Session.
func (r *Recorder) ID() uint64 { return r.SessionID }

// UserID implements router.Session.
func (r *Recorder) UserID() int64 { return r.User }

// Send implements router.Session: it records f's messages and never refuses.
func (r *Recorder) Send(f *router.Frame) bool {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range f.Msgs {
		r.got = append(r.got, Received{Bytes: m.Bytes, At: now})
	}
	return true
}

// Received returns what was sent so far, in order.
func (r *Recorder) Received() []Received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Received(nil), r.got...)
}
