package gift

import (
	"testing"
	"time"

	"github.com/bytedance/sonic"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// effectPushes decodes the effect pushes v received, with their arrival times.
func effectPushes(v *routertest.Recorder) ([]EffectPush, []time.Time) {
	var got []EffectPush
	var when []time.Time
	for _, r := range v.Received() {
		var push struct {
			D EffectPush `json:"d"`
		}
		if err := sonic.Unmarshal(r.Bytes, &push); err == nil {
			got = append(got, push.D)
			when = append(when, r.At)
		}
	}
	return got, when
}

// A busy room's effect pushes are capped: after a flush of 50 effects at 100
// pushes/s, the next flush waits ~0.5 s, and what arrives meanwhile is merged
// into combos (counts summed), so nothing is lost from the display.
func TestRoomEffectsCappedByStretchingTheWindow(t *testing.T) {
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	v := &routertest.Recorder{SessionID: 1, User: 1000}
	if _, err := rt.Join(7, v); err != nil {
		t.Fatal(err)
	}
	e := newEffects(rt, 20*time.Millisecond, 100)
	t0 := time.Now()
	for from := int64(1); from <= 50; from++ {
		e.add(7, EffectPush{From: from, To: 99, GiftID: 1, Count: 1})
	}
	waitFor(t, func() bool { got, _ := effectPushes(v); return len(got) == 50 })
	// The flush of 50 at 100/s holds the room's next flush until 0.5 s after
	// it. (Measured against the hold itself, not against delivery times: on
	// a busy machine the 50 pushes may take a while to reach the viewer.)
	e.mu.Lock()
	hold, ok := e.next[7]
	e.mu.Unlock()
	if !ok || hold.Sub(t0) < 500*time.Millisecond {
		t.Fatalf("hold until %v after the first wave began (set %v), want >= 500ms", hold.Sub(t0), ok)
	}
	// Second wave: 10 senders × 5 gifts each, right after the first flush.
	for i := 0; i < 5; i++ {
		for from := int64(1); from <= 10; from++ {
			e.add(7, EffectPush{From: from, To: 99, GiftID: 1, Count: 2})
		}
	}
	waitFor(t, func() bool { got, _ := effectPushes(v); return len(got) == 60 })
	got, when := effectPushes(v)
	if when[50].Before(hold) {
		t.Fatalf("second flush arrived %v before the hold ended: the cap did not hold it back", hold.Sub(when[50]))
	}
	total := 0
	for _, p := range got[50:] {
		if p.Combo != 5 || p.Count != 10 {
			t.Fatalf("not merged: %+v", p)
		}
		total += p.Count
	}
	if total != 100 {
		t.Fatalf("count %d, want 100", total)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
