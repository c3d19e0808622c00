package gateway

import (
	"sync"

	"github.com/lxzan/gws"
)

// readBufSize is the buffer a connection reads its socket into (wsReader):
// taken from readBufPool for one read and given back once its whole frames
// are handled (the rest of an unfinished frame is copied out), so an idle
// connection holds none.
const readBufSize = 4096

var readBufPool = sync.Pool{New: func() any { b := make([]byte, readBufSize); return &b }}

// connSession is the gws session storage of a connection: it holds the
// *Conn and nothing else (gws's default is a map and a mutex per connection).
type connSession struct {
	c *Conn
}

var _ gws.SessionStorage = (*connSession)(nil)

func (s *connSession) Len() int {
	if s.c == nil {
		return 0
	}
	return 1
}

func (s *connSession) Load(key string) (any, bool) {
	if key != "c" || s.c == nil {
		return nil, false
	}
	return s.c, true
}

func (s *connSession) Delete(key string) {
	if key == "c" {
		s.c = nil
	}
}

func (s *connSession) Store(key string, value any) {
	if c, ok := value.(*Conn); ok && key == "c" {
		s.c = c
	}
}

func (s *connSession) Range(f func(key string, value any) bool) {
	if s.c != nil {
		f("c", s.c)
	}
}
