package gateway

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// memChatOnce: a sent chat's mid is answered for chatOnceTTL, a claim in
// flight is 10409 for chatInFlightTTL (then claimable again, and the stale
// claim's late settle changes nothing), a chat not sent leaves no trace, and
// at most its size of pairs is kept (the oldest go first).
func TestMemChatOnce(t *testing.T) {
	now := time.Unix(1000, 0)
	m := newMemChatOnceSize(3)
	m.now = func() time.Time { return now }
	claim := func(user int64, req string) (string, func(string), *proto.Error) {
		t.Helper()
		return m.claim(user, req)
	}
	mid, settle, err := claim(1, "a")
	if mid != "" || settle == nil || err != nil {
		t.Fatalf("first claim: %q %v", mid, err)
	}
	if _, _, err := claim(1, "a"); err != errChatInFlight {
		t.Fatalf("in flight: %v", err)
	}
	settle("m1")
	if mid, _, err := claim(1, "a"); mid != "m1" || err != nil {
		t.Fatalf("sent: %q %v", mid, err)
	}
	now = now.Add(chatOnceTTL)
	if mid, settle, err := claim(1, "a"); mid != "" || settle == nil || err != nil {
		t.Fatalf("after the TTL: %q %v", mid, err)
	} else {
		settle("") // not sent
	}
	if mid, settle, err := claim(1, "a"); mid != "" || settle == nil || err != nil {
		t.Fatalf("after a chat not sent: %q %v", mid, err)
	}
	// A claim in flight past its TTL is claimed again; its late settle is
	// not the new claim's.
	now = now.Add(chatInFlightTTL)
	_, stale, _ := claim(2, "b")
	now = now.Add(chatInFlightTTL)
	_, fresh, err := claim(2, "b")
	if fresh == nil || err != nil {
		t.Fatalf("a claim past its TTL: %v", err)
	}
	stale("old")
	if _, _, err := claim(2, "b"); err != errChatInFlight {
		t.Fatalf("after the stale settle: %v, want the fresh claim in flight", err)
	}
	fresh("new")
	if mid, _, _ := claim(2, "b"); mid != "new" {
		t.Fatalf("after the fresh settle: %q", mid)
	}
	// Bounded: three pairs kept, the least recently used go first.
	for _, r := range []string{"c", "d", "e"} {
		_, s, _ := claim(3, r)
		s("m-" + r)
	}
	if m.lru.Len() != 3 {
		t.Fatalf("%d pairs kept, want 3", m.lru.Len())
	}
	if mid, _, _ := claim(3, "c"); mid != "m-c" {
		t.Fatalf("the newest three kept: %q", mid)
	}
	if mid, _, _ := claim(2, "b"); mid != "" {
		t.Fatalf("an evicted pair answered %q", mid)
	}
}
