package gateway_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// A room's fan-out writes a frame itself to connections with nothing queued
// (the gateway frames it once for every receiver). Every push size crosses
// one of the WebSocket length encodings (7-bit, 16-bit, 64-bit), for batch
// and per-message clients; each must arrive whole and in order, and the
// direct path must have been taken.
func TestRoomPushesWrittenDirectlyArriveWhole(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := nodetest.OpenRoom(t, n, 1, 0)
	clients := make([]*nodetest.Raw, 4)
	for i := range clients {
		clients[i] = dial(t, n, int64(2000+i), nodetest.RawOptions{Batch: i%2 == 0})
		if f := request(t, clients[i], 1, fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)); f.Code != 0 {
			t.Fatalf("join %d: %+v", i, f)
		}
	}
	var sizes []int
	for s := 0; s <= 140; s += 3 {
		sizes = append(sizes, s)
	}
	for s := 65300; s <= 65700; s += 37 {
		sizes = append(sizes, s)
	}
	sizes = append(sizes, 1000, 20000, 200000)
	for seq, size := range sizes {
		d := fmt.Sprintf(`{"seq":%d,"pad":"%s"}`, seq, strings.Repeat("x", size))
		if _, err := n.Router.PublishRoom(room, proto.Push{Biz: proto.BizChat, Data: []byte(d)}); err != nil {
			t.Fatalf("publish %d: %v", seq, err)
		}
		for i, c := range clients {
			f := c.NextOfType(proto.TypePush, 5*time.Second)
			got, ok := jsonInt(f.D, `"seq":`)
			if !ok || int(got) != seq {
				t.Fatalf("client %d: push %s…, want seq %d", i, head(f.D), seq)
			}
			if want := fmt.Sprintf(`"pad":"%s"}`, strings.Repeat("x", size)); !strings.HasSuffix(string(f.D), want) {
				t.Fatalf("client %d: push %d has %d bytes, want a pad of %d", i, seq, len(f.D), size)
			}
		}
	}
	if v := metricValue(t, n, "liveedge_frames_direct_total"); v < float64(len(sizes)) {
		t.Fatalf("frames written directly = %v, want at least %d (one push at a time to idle viewers)", v, len(sizes))
	}
}

func head(b []byte) string {
	if len(b) > 60 {
		return string(b[:60])
	}
	return string(b)
}
