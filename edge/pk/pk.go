// Package pk runs PK contests: two rooms paired for a duration; PK gifts add
// to their room's score; every change pushes biz 5558 to both rooms with a
// per-contest sequence (clients drop stale ones); the contest ends exactly
// once, with a final push carrying "over":true and the winner.
//
// State is in memory behind one mutex; pushes are queued under it (Publish
// never blocks), so both rooms see a contest's pushes in sequence order and
// the final push is the last one.
package pk

import (
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"sync"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/router"
)

// Limits of a contest.
const (
	MinDuration = time.Second
	MaxDuration = time.Hour
)

// Contest is one PK.
type Contest struct {
	ID     string
	Rooms  [2]int64
	Scores [2]int64
	Seq    int64
	EndsAt time.Time
	Over   bool
	timer  *time.Timer
}

// Progress is the d of biz 5558.
type Progress struct {
	PKID   string           `json:"pk_id"`
	Scores map[string]int64 `json:"scores"`
	Seq    int64            `json:"seq"`
	EndsAt int64            `json:"ends_at"`
	Over   bool             `json:"over,omitempty"`
	Winner int64            `json:"winner,omitempty"` // room id; 0 = draw (with over)
}

// Service runs contests.
type Service struct {
	router router.Router
	isOpen func(room int64) bool

	mu       sync.Mutex
	byRoom   map[int64]*Contest
	contests map[string]*Contest
}

// New returns a PK service; isOpen tells whether a room is open.
func New(r router.Router, isOpen func(int64) bool) *Service {
	return &Service{router: r, isOpen: isOpen, byRoom: map[int64]*Contest{}, contests: map[string]*Contest{}}
}

func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Start pairs rooms a and b for d.
func (s *Service) Start(a, b int64, d time.Duration) (Contest, error) {
	if a <= 0 || b <= 0 || a == b {
		return Contest{}, proto.BadRequest("room_a and room_b must be two different rooms")
	}
	if d < MinDuration || d > MaxDuration {
		return Contest{}, proto.BadRequest("duration_s must be %d..%d", int(MinDuration.Seconds()), int(MaxDuration.Seconds()))
	}
	if !s.isOpen(a) || !s.isOpen(b) {
		return Contest{}, proto.Errorf(proto.CodeNotFound, "room not found or closed")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byRoom[a] != nil || s.byRoom[b] != nil {
		return Contest{}, proto.Errorf(proto.CodeConflict, "a room is already in a PK")
	}
	c := &Contest{ID: newID(), Rooms: [2]int64{a, b}, EndsAt: time.Now().Add(d)}
	s.byRoom[a], s.byRoom[b], s.contests[c.ID] = c, c, c
	c.timer = time.AfterFunc(d, func() { s.end(c) })
	s.publish(c)
	return *c, nil
}

// AddScore adds amount to room's side of its running contest (if any).
func (s *Service) AddScore(room int64, amount int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.byRoom[room]
	if c == nil || c.Over || amount <= 0 {
		return
	}
	side := 0
	if c.Rooms[1] == room {
		side = 1
	}
	c.Scores[side] += amount
	s.publish(c)
}

// Opponent returns the room room is contesting against (0 = none).
func (s *Service) Opponent(room int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.byRoom[room]
	if c == nil {
		return 0
	}
	if c.Rooms[0] == room {
		return c.Rooms[1]
	}
	return c.Rooms[0]
}

// Get returns contest id.
func (s *Service) Get(id string) (Contest, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.contests[id]
	if !ok {
		return Contest{}, false
	}
	return *c, true
}

// end finishes c exactly once.
func (s *Service) end(c *Contest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.Over {
		return
	}
	c.Over = true
	s.publish(c)
	delete(s.byRoom, c.Rooms[0])
	delete(s.byRoom, c.Rooms[1])
	// The contest stays readable for a while, then goes.
	time.AfterFunc(10*time.Minute, func() {
		s.mu.Lock()
		delete(s.contests, c.ID)
		s.mu.Unlock()
	})
}

// publish pushes c's state to both rooms. Called with s.mu held.
func (s *Service) publish(c *Contest) {
	c.Seq++
	p := Progress{PKID: c.ID, Seq: c.Seq, EndsAt: c.EndsAt.UnixMilli(), Over: c.Over,
		Scores: map[string]int64{
			strconv.FormatInt(c.Rooms[0], 10): c.Scores[0],
			strconv.FormatInt(c.Rooms[1], 10): c.Scores[1],
		}}
	if c.Over {
		switch {
		case c.Scores[0] > c.Scores[1]:
			p.Winner = c.Rooms[0]
		case c.Scores[1] > c.Scores[0]:
			p.Winner = c.Rooms[1]
		}
	}
	d, _ := proto.Marshal(p)
	for _, r := range c.Rooms {
		_, _ = s.router.PublishRoom(r, proto.Push{Biz: proto.BizPKProgress, Data: d, Ack: c.Over})
	}
}
