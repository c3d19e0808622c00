package gift

import (
	"bytes"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/liveedge/liveedge/gateway/proto"
)

// The hand-written encoders of the per-gift reply and push must produce
// exactly what proto.Marshal (sonic, standard-library compatible) does.
func TestAppendJSONMatchesMarshal(t *testing.T) {
	strs := []string{"", "ok", "123456", "https://cdn.example.com/svga/heart.svga?x=1&y=2",
		`quote " backslash \ slash /`, "<script>", "tab\tnl\ncr\r", "\x00\x1f\x7f", "爱心气泡",
		"bad utf8 \xff\xfe", "\u2028\u2029", "emoji 🎁"}
	rng := rand.New(rand.NewPCG(7, 8))
	for range 300 {
		b := make([]byte, rng.IntN(24))
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		strs = append(strs, string(b))
	}
	ints := []int64{0, 1, -1, 42, math.MaxInt64, math.MinInt64}
	for i, s := range strs {
		n := ints[i%len(ints)]
		rep := Reply{OrderID: s, Balance: n}
		want, err := proto.Marshal(rep)
		if err != nil {
			t.Fatal(err)
		}
		if got := rep.AppendJSON(nil); !bytes.Equal(got, want) {
			t.Errorf("Reply %q:\n got %s\nwant %s", s, got, want)
		}
		for _, combo := range []int{0, 3} {
			ev := EffectPush{From: n, To: -n, GiftID: int64(i), Count: int(n % 100), EffectURL: s, Combo: combo, OrderID: strs[(i+1)%len(strs)]}
			want, err := proto.Marshal(&ev)
			if err != nil {
				t.Fatal(err)
			}
			if got := ev.AppendJSON(nil); !bytes.Equal(got, want) {
				t.Errorf("EffectPush %+v:\n got %s\nwant %s", ev, got, want)
			}
		}
	}
	// The reply frame around it is what a marshalled d gives.
	rep := Reply{OrderID: "77", Balance: 5}
	d, _ := proto.Marshal(rep)
	if got, want := proto.EncodeReply(9, 0, "ok", rep), proto.EncodeReply(9, 0, "ok", d); !bytes.Equal(got, want) {
		t.Errorf("EncodeReply with an appender:\n got %s\nwant %s", got, want)
	}
}
