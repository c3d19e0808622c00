package gateway_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router/natstest"
)

// In a cluster a chat with a req_id is looked up in Redis (was it sent
// already?) before the chat limit, so that a retry takes no token. A flood
// of chats with fresh req_ids cost one Redis read each however many the
// limit refused; the lookups are now bounded per user (chatPeekFactor × the
// chat rate), the rest refused 10429 without one.
func TestChatReqIDLookupsBoundedPerUser(t *testing.T) {
	rds, nats := redistest.Start(t), natstest.Start(t)
	c := clusterNodeConfig(t, "gw-1", []string{"gw-1"}, rds, nats)
	c.Limits.ChatPerSecond = 5
	n := nodetest.Start(t, c)
	room := nodetest.OpenRoom(t, n, 1, 0)
	r := dial(t, n, 50, nodetest.RawOptions{})
	if f := request(t, r, 1, fmt.Sprintf(`{"t":"join","id":1,"d":{"room_id":%d}}`, room)); f.Code != 0 {
		t.Fatalf("join: %+v", f)
	}
	gets := func() int64 { return redisCalls(t, rds, "get") }
	before := gets()
	const chats = 300
	for i := range chats {
		if err := r.Send(fmt.Sprintf(`{"t":"chat","id":%d,"d":{"room_id":%d,"text":"x","req_id":"c%d"}}`, 100+i, room, i)); err != nil {
			t.Fatal(err)
		}
	}
	limited := replyCodes(t, r, 100, chats, proto.CodeRateLimited)
	if d := gets() - before; d > 100 || limited < chats-100 {
		t.Fatalf("%d chats with fresh req_ids: %d Redis GETs, %d refused; want the lookups bounded", chats, d, limited)
	}
}

// redisCalls is how many times the Redis at rds has run the commands cmds
// (lower case: "get", "evalsha"), from its commandstats.
func redisCalls(t *testing.T, rds *redistest.Server, cmds ...string) int64 {
	t.Helper()
	rdb := rds.Client(t)
	info, err := rdb.Do(context.Background(), rdb.B().Info().Section("commandstats").Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	var k int64
	for _, line := range strings.Split(info, "\r\n") {
		for _, cmd := range cmds {
			if rest, ok := strings.CutPrefix(line, "cmdstat_"+cmd+":calls="); ok {
				v, _ := strconv.ParseInt(rest[:strings.IndexByte(rest, ',')], 10, 64)
				k += v
			}
		}
	}
	return k
}
