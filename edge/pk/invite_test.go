package pk

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// An invitation that nobody accepts expires after its TTL: it can no longer
// be accepted, no contest exists, and its inviter's pending slot is free.
func TestInvitationExpires(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	rt, _ := twoRooms(t)
	noTallies := func(string, int64) (int64, error) { return 0, nil }
	s := New(rt, func(int64) (bool, error) { return true, nil }, st, noTallies, nil)
	t.Cleanup(s.Close)
	s.ttl = 100 * time.Millisecond
	var ids []string
	for i := 0; i < MaxInvitesPerInviter; i++ {
		inv, err := s.Invite(7, 1, 2, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, inv.ID)
	}
	if _, err := s.Invite(7, 1, 2, time.Minute); proto.AsError(err).Code != proto.CodeRateLimited {
		t.Fatalf("invitation over the bound: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, pending := s.Invitation(ids[0]); !pending {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("invitation did not expire")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, id := range ids {
		if _, err := s.Accept(id); proto.AsError(err).Code != proto.CodeNotFound {
			t.Fatalf("accept of expired %s: %v", id, err)
		}
		if _, found := s.Get(id); found {
			t.Fatalf("contest %s exists", id)
		}
	}
	if s.Opponent(1) != 0 || s.Opponent(2) != 0 {
		t.Fatal("a room is in a contest")
	}
	// The timers dropped the expired invitations: the inviter may invite again.
	for {
		s.mu.Lock()
		n := len(s.invites) + s.invitesN[7]
		s.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("expired invitations still held")
		}
		time.Sleep(10 * time.Millisecond)
	}
	inv, err := s.Invite(7, 1, 2, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := s.Accept(inv.ID); err != nil || c.ID != inv.ID || s.Opponent(2) != 1 {
		t.Fatalf("accept: %+v %v", c, err)
	}
}

// An inviter who withdraws each invitation at once frees its pending slot,
// so the pending bound alone let an invite/withdraw loop send the other
// anchor an unbounded stream of reliable 5562 pushes: past InviteBurst
// invitations in a minute, 10429.
func TestInviteWithdrawLoopIsRateLimited(t *testing.T) {
	rt, _ := twoRooms(t)
	noTallies := func(string, int64) (int64, error) { return 0, nil }
	s := New(rt, func(int64) (bool, error) { return true, nil }, nil, noTallies, nil)
	t.Cleanup(s.Close)
	for i := 0; i < InviteBurst; i++ {
		inv, err := s.Invite(7, 1, 2, time.Minute)
		if err != nil {
			t.Fatalf("invitation %d: %v", i, err)
		}
		if err := s.Decline(inv.ID); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Invite(7, 1, 2, time.Minute); proto.AsError(err).Code != proto.CodeRateLimited {
		t.Fatalf("invitation %d in the minute: %v, want 10429", InviteBurst+1, err)
	}
	// Another inviter is not held back.
	if _, err := s.Invite(8, 2, 1, time.Minute); err != nil {
		t.Fatalf("another inviter: %v", err)
	}
}

// An accept that cannot start the contest now (a room busy in another PK)
// leaves the invitation standing: accepted again once the room is free, it
// starts. Before, the failed accept consumed it and the retry was 10004.
func TestFailedAcceptKeepsTheInvitation(t *testing.T) {
	rt := router.NewLocal("t", router.LocalConfig{})
	for _, r := range []int64{1, 2, 3} {
		rt.OpenRoom(r)
	}
	noTallies := func(string, int64) (int64, error) { return 0, nil }
	s := New(rt, func(int64) (bool, error) { return true, nil }, nil, noTallies, nil)
	t.Cleanup(s.Close)
	inv, err := s.Invite(7, 1, 2, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	busy, err := s.Start(2, 3, time.Minute) // room 2 pairs with room 3 first
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Accept(inv.ID); proto.AsError(err).Code != proto.CodeConflict {
		t.Fatalf("accept while room 2 is busy: %v, want 10409", err)
	}
	if _, ok := s.Invitation(inv.ID); !ok {
		t.Fatal("the failed accept consumed the invitation")
	}
	s.EndRoom(3) // room 3 closes: its contest ends, room 2 is free
	deadline := time.Now().Add(5 * time.Second)
	for {
		if c, ok := s.Get(busy.ID); ok && c.Over {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("room 3's contest did not end")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if c, err := s.Accept(inv.ID); err != nil || c.ID != inv.ID {
		t.Fatalf("accept again: %+v %v", c, err)
	}
}
