package router

import (
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/liveedge/liveedge/gateway/proto"
)

// directSink is a sink that the fan-out may ask to write at once, and that
// records the goroutine-visible order of the calls it gets.
type directSink struct {
	sink
	direct int
	order  *fanOrder
}

func (s *directSink) SendNow(f *Frame) (ok, direct bool) {
	s.mu.Lock()
	s.direct++
	s.mu.Unlock()
	s.order.add(s.id)
	return s.Send(f), true
}

type fanOrder struct {
	mu  sync.Mutex
	ids []uint64
}

func (o *fanOrder) add(id uint64) {
	o.mu.Lock()
	o.ids = append(o.ids, id)
	o.mu.Unlock()
}

// A frame to a big room is shared among fan-out workers; every member still
// gets every push once, in publish order, through SendNow; members are
// visited in connection order (oldest first), whatever order they joined in.
func TestBigRoomFanoutSharedAmongWorkers(t *testing.T) {
	const members = 5*fanoutChunk + 7
	l := NewLocal("gw-1", LocalConfig{FanoutWorkers: 4})
	l.OpenRoom(1)
	order := &fanOrder{}
	sinks := make([]*directSink, members)
	for i := range sinks {
		sinks[i] = &directSink{sink: sink{id: uint64(i + 1), user: int64(i + 1)}, order: order}
	}
	// Join in reverse order of the sessions' ids.
	for i := members - 1; i >= 0; i-- {
		if _, err := l.Join(1, sinks[i]); err != nil {
			t.Fatal(err)
		}
	}
	const pushes = 20
	var want []string
	for i := 0; i < pushes; i++ {
		mid, err := l.PublishRoom(1, proto.Push{Biz: proto.BizChat, Data: []byte(fmt.Sprintf(`{"i":%d}`, i))})
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, mid)
	}
	waitFor(t, func() bool {
		for _, s := range sinks {
			if len(s.got()) < pushes {
				return false
			}
		}
		return true
	})
	for _, s := range sinks {
		if got := s.got(); !slices.Equal(got, want) {
			t.Fatalf("session %d got %d pushes %v…, want %v…", s.id, len(got), got[:min(3, len(got))], want[:3])
		}
		if s.direct != s.frames {
			t.Fatalf("session %d: %d frames, %d through SendNow", s.id, s.frames, s.direct)
		}
	}
	// The first frame went out after every join: each worker's part in id
	// order, the parts themselves interleaved by the scheduler.
	order.mu.Lock()
	first := order.ids[:members]
	order.mu.Unlock()
	seen := map[uint64]bool{}
	last := make(map[int]uint64) // part → last id
	size := (members + 3) / 4
	for _, id := range first {
		if seen[id] {
			t.Fatalf("session %d visited twice for one frame", id)
		}
		seen[id] = true
		p := int(id-1) / size
		if id <= last[p] {
			t.Fatalf("part %d visited session %d after %d: not in connection order", p, id, last[p])
		}
		last[p] = id
	}
	if len(seen) != members {
		t.Fatalf("%d sessions visited, want %d", len(seen), members)
	}
	// The counters are added once a frame's whole fan-out returns, a little
	// after the sinks saw it (direct before fanned): wait until they cover
	// every frame handed out.
	frames := int64(0)
	for _, s := range sinks {
		frames += int64(s.frames)
	}
	waitFor(t, func() bool { st := l.Stats(); return st.FramesFanned >= frames })
	if st := l.Stats(); st.SessionsGone != 0 || st.FramesDirect != st.FramesFanned {
		t.Fatalf("sessions gone %d; frames written directly %d of %d", st.SessionsGone, st.FramesDirect, st.FramesFanned)
	}
}
