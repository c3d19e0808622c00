package loadtest

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
)

func TestOrderAndLatencyCounting(t *testing.T) {
	r := &run{room: 7}
	lc := &lconn{r: r, viewer: true, known: true, off: 10, ep: "e1"}
	push := func(off int64, ep string) {
		lc.onPush(clientsdk.Push{Room: 7, Off: off, Ep: ep, Data: []byte(`{"from":1,"text":"` + chatText(0, off, 40) + `"}`)})
	}
	push(11, "e1")
	push(12, "e1")
	push(12, "e1") // duplicate
	push(15, "e1") // 13, 14 missing
	push(14, "e1") // late: counted as a duplicate (already past it)
	push(1, "e2")  // a new epoch
	push(2, "e2")
	lc.onPush(clientsdk.Push{Room: 8, Off: 99, Ep: "e2"}) // another room: ignored
	lc.onPush(clientsdk.Push{Room: 7, Ep: "e2"})          // a push to the user (no off): not a room push
	if g, d, e := r.gaps.Load(), r.dups.Load(), r.epochs.Load(); g != 2 || d != 2 || e != 1 {
		t.Fatalf("gaps %d duplicates %d epochs %d, want 2 2 1", g, d, e)
	}
	if n := r.deliveries.Load(); n != 5 || r.lat.Count() != 5 {
		t.Fatalf("deliveries %d, latencies %d, want 5", n, r.lat.Count())
	}
	if p := r.lat.Quantile(1); p < 0 || p > 1000 {
		t.Fatalf("latency %v ms", p)
	}
	ts, ok := stamp([]byte(`{"from":1,"text":"` + chatText(3, 9, 100) + `"}`))
	if !ok || time.Since(time.Unix(0, ts)) > time.Second || len(chatText(3, 9, 100)) != 100 {
		t.Fatalf("stamp %d %v", ts, ok)
	}
	if _, ok := stamp([]byte(`{"from":1,"text":"hello"}`)); ok {
		t.Fatal("a chat without a stamp was read as one")
	}
}
