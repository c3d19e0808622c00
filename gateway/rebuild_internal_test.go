package gateway

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
)

// While the shared wallet is not ready (Redis lost its data; the rebuild is
// bringing the rains' one-per-user places and the payment req_id bindings
// back), neither a place nor a binding is taken or confirmed: "retry" —
// a claim meanwhile could hand out what the rebuild is about to restore.
func TestClaimsAndBindingsWaitForTheRebuild(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	state := func(s string) {
		t.Helper()
		if err := rdb.Do(ctx, rdb.B().Hset().Key(persist.SharedMetaKey).FieldValue().FieldValue("state", s).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	n := &Node{Redis: rdb}
	binds := payReqClaims{rdb: rdb}
	until := time.Now().Add(time.Minute).UnixMilli()
	for _, s := range []string{"", "rebuilding"} {
		if s != "" {
			state(s)
		}
		if _, err := n.claimRain(ctx, "CODE", 7, until, "n1:a:1", nil); !errors.Is(err, redpacket.ErrClaimsUnavailable) {
			t.Fatalf("a rain place with the wallet %q: %v, want unavailable", s, err)
		}
		if _, err := binds.Claim(7, "req", 100); err == nil {
			t.Fatalf("a req_id binding with the wallet %q: taken", s)
		}
		if _, err := binds.Confirm(7, "req", 100); err == nil {
			t.Fatalf("a req_id confirm with the wallet %q: done", s)
		}
	}
	state("ready")
	if ok, err := n.claimRain(ctx, "CODE", 7, until, "n1:a:1", nil); !ok || err != nil {
		t.Fatalf("a rain place once ready: %v %v", ok, err)
	}
	if ok, err := n.claimRain(ctx, "CODE", 7, until, "n1:a:2", nil); ok || err != nil {
		t.Fatalf("the same place again: %v %v, want taken", ok, err)
	}
	if prev, err := binds.Claim(7, "req", 100); prev != 0 || err != nil {
		t.Fatalf("a binding once ready: %d %v", prev, err)
	}
	if bound, err := binds.Confirm(7, "req", 100); bound != 100 || err != nil {
		t.Fatalf("its confirm: %d %v", bound, err)
	}
}
