package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// A gift goes to the room's anchor or to a user in the room; to anyone else
// it is refused with 10003 and nothing moves.
func TestGiftReceiverMustBeAnchorOrMember(t *testing.T) {
	n := giftConfig(t)
	const anchor, sender, member, outsider = 1, 500, 501, 502
	room := nodetest.OpenRoom(t, n, anchor, 0)
	devCredit(t, n, sender, 100)
	s := sdkDial(t, n, sender, nil, nil)
	m := sdkDial(t, n, member, nil, nil)
	sdkDial(t, n, outsider, nil, nil) // connected, but not in the room
	ctx := context.Background()
	for _, c := range []interface {
		Join(context.Context, int64) (int, error)
	}{s, m} {
		if _, err := c.Join(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	for _, to := range []int64{outsider, 999999} { // an online outsider, a made-up id
		_, err := sendGift(ctx, s, giftReq(room, to, heartGift, 1, fmt.Sprintf("to-%d", to)))
		var pe *proto.Error
		if !errors.As(err, &pe) || pe.Code != proto.CodeForbidden {
			t.Fatalf("gift to %d: %v, want 10003", to, err)
		}
	}
	if b, _ := n.Ledger.Balance(sender); b != 100 {
		t.Fatalf("balance %d after refused gifts, want 100", b)
	}
	persisttest.CheckConservation(t, n.Ledger)

	if _, err := sendGift(ctx, s, giftReq(room, anchor, heartGift, 1, "to-anchor")); err != nil {
		t.Fatalf("gift to the anchor (not joined): %v", err)
	}
	if _, err := sendGift(ctx, s, giftReq(room, member, heartGift, 2, "to-member")); err != nil {
		t.Fatalf("gift to a member: %v", err)
	}
	if b, _ := n.Ledger.Balance(sender); b != 97 {
		t.Fatalf("balance %d, want 97", b)
	}
	// A member who left is no longer a receiver.
	first, err := sendGift(ctx, s, giftReq(room, member, heartGift, 1, "to-member-retried"))
	if err != nil {
		t.Fatalf("gift to a member: %v", err)
	}
	if err := m.Leave(ctx, room); err != nil {
		t.Fatal(err)
	}
	// A retry of a gift that went through replays it (its reply was lost, say),
	// though the receiver has left since: never "refused, nothing moved"
	// while the first debit stands.
	again, err := sendGift(ctx, s, giftReq(room, member, heartGift, 1, "to-member-retried"))
	if err != nil || again != first {
		t.Fatalf("retried gift after the receiver left: %+v %v, want the first result %+v", again, err, first)
	}
	// The sender is frozen meanwhile too: the retry still replays.
	freeze(t, n, sender, 2)
	if again, err := sendGift(ctx, s, giftReq(room, member, heartGift, 1, "to-member-retried")); err != nil || again != first {
		t.Fatalf("retried gift after the sender was frozen: %+v %v, want the first result %+v", again, err, first)
	}
	freeze(t, n, sender, 1)
	if b, _ := n.Ledger.Balance(sender); b != 96 {
		t.Fatalf("balance %d, want 96 (the retries moved nothing)", b)
	}
	_, err = sendGift(ctx, s, giftReq(room, member, heartGift, 1, "to-gone"))
	var pe *proto.Error
	if !errors.As(err, &pe) || pe.Code != proto.CodeForbidden {
		t.Fatalf("gift to a member who left: %v, want 10003", err)
	}
	persisttest.CheckConservation(t, n.Ledger)
}

// freeze sets user's account status (1 normal, 2 frozen) as an admin.
func freeze(t *testing.T, n *gateway.Node, user int64, status int) {
	t.Helper()
	if st, code := setStatus(t, n, nodetest.Token(t, n, 9000, gateway.RoleAdmin), user, fmt.Sprintf(`{"status":%d}`, status)); st != 200 || code != 0 {
		t.Fatalf("set status %d of %d: HTTP %d code %d", status, user, st, code)
	}
}
