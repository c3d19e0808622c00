package gateway_test

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// A room a node's replica does not have, asked while its Redis does not
// answer, is "retry" (50000), not "no such room" (10004: final to a
// client): a join, and a rain's create. Before, both were 10004.
func TestRoomUnreadIsRetryNotNotFound(t *testing.T) {
	_, n2, px := clusterPairViaProxy(t)
	r := dial(t, n2, 50, nodetest.RawOptions{})
	px.Refuse(time.Minute)
	if f := request(t, r, 1, `{"t":"join","id":1,"d":{"room_id":987654}}`); f.Code != proto.CodeInternal {
		t.Fatalf("join of a room gw-2 cannot read: %+v, want 50000", f)
	}
	st, out := rpCall(t, n2, 8, "POST", "/rooms/987654/redpackets", `{"total_amount":100,"total_count":2,"duration_s":10}`)
	if st != 500 || out.Code != proto.CodeInternal {
		t.Fatalf("a rain created in a room gw-2 cannot read: %d %+v, want 500 50000", st, out)
	}
}
