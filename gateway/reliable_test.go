package gateway_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// A reliable push is resent (same mid, ≥ 3 tries, growing gaps) until acked,
// and never after the ack.
func TestReliablePushResentUntilAcked(t *testing.T) {
	n, r := resendingNode(t, 50*time.Millisecond, 4, 0, 500)

	mid, reached := n.Router.SendUser(500, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":1,"delta":1,"reason":"dev"}`), Ack: true})
	if reached != 1 {
		t.Fatalf("reached %d sessions", reached)
	}
	var at []time.Time
	for len(at) < 4 { // the first delivery and three resends
		f := r.NextOfType(proto.TypePush, 5*time.Second)
		if f.Mid != mid || !f.Ack || f.Biz != proto.BizWalletCredit {
			t.Fatalf("unexpected push %+v", f)
		}
		at = append(at, time.Now())
	}
	for i := 2; i < len(at); i++ {
		if at[i].Sub(at[i-1]) < at[1].Sub(at[0])/2 {
			t.Fatalf("no backoff between resends: %v", at)
		}
	}
	if err := r.Send(`{"t":"ack","d":{"mids":["` + mid + `"]}}`); err != nil {
		t.Fatal(err)
	}
	// At most one resend may cross the ack in flight; then silence for longer
	// than the next backoff step.
	if k := countPushes(r, mid, 2*time.Second); k > 1 {
		t.Fatalf("push resent %d times after its ack", k)
	}

	// An immediately acked push is never resent.
	mid2, _ := n.Router.SendUser(500, proto.Push{Biz: proto.BizOrderStatus, Ack: true})
	if f := r.NextOfType(proto.TypePush, 5*time.Second); f.Mid != mid2 {
		t.Fatalf("got %s want %s", f.Mid, mid2)
	}
	if err := r.Send(`{"t":"ack","d":{"mids":["` + mid2 + `"]}}`); err != nil {
		t.Fatal(err)
	}
	if k := countPushes(r, mid2, time.Second); k > 1 {
		t.Fatalf("acked push resent %d times", k)
	}
}

// A client may ack a push as soon as the connection's writer has written
// it — before the goroutine that queued it runs again. The push must be
// tracked by then: an ack that found nothing tracked was lost, and the push
// was resent, given up on and handed on at close as unacked — delivered
// again on the user's next connection.
func TestReliablePushAckedBeforeItsSenderRunsAgain(t *testing.T) {
	n, r := resendingNode(t, 50*time.Millisecond, 4, 8, 500)
	n.WS.AckRightAfterEnqueue()
	mid, reached := n.Router.SendUser(500, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":1,"delta":1,"reason":"dev"}`), Ack: true})
	if reached != 1 {
		t.Fatalf("reached %d sessions", reached)
	}
	if k := countPushes(r, mid, time.Second); k != 1 {
		t.Fatalf("push delivered %d times, want once (acked)", k)
	}
	if p := n.WS.PendingAcks(500); p != 0 {
		t.Fatalf("%d pushes still wait an ack after theirs came", p)
	}
}

// resendingNode starts a node that resends reliable pushes after after, tries
// times (offlineMax: ws.offline_max, 0 = the default), and connects user to
// it (batch frames).
func resendingNode(t *testing.T, after time.Duration, tries, offlineMax int, user int64) (*gateway.Node, *nodetest.Raw) {
	t.Helper()
	cfg := nodetest.Config(t)
	cfg.WS.ResendAfter = configsDuration(after)
	cfg.WS.ResendMaxTries = tries
	if offlineMax > 0 {
		cfg.WS.OfflineMax = offlineMax
	}
	n := nodetest.Start(t, cfg)
	r := dial(t, n, user, nodetest.RawOptions{Batch: true})
	// The hello goes out before the session is registered with the router
	// (ws.go OnOpen): a push sent right after it could find no session
	// (CI at 9a0fab1: "reached 0"). A ping's reply comes after OnOpen.
	if f := request(t, r, 1, `{"t":"ping","id":1,"d":{}}`); f.Code != 0 {
		t.Fatalf("ping: %+v", f)
	}
	return n, r
}

// countPushes counts pushes with mid arriving within d.
func countPushes(r *nodetest.Raw, mid string, d time.Duration) int {
	quiet := time.After(d)
	k := 0
	for {
		select {
		case f := <-r.Frames():
			if f.T == proto.TypePush && f.Mid == mid {
				k++
			}
		case <-quiet:
			return k
		}
	}
}

// A user push still not acked after the last resend is not dropped: it
// stays with the connection (no more resends) and is handed on when the
// connection goes, so the user's next session gets it — before, it was
// deleted at the last try (a 5570 wallet credit lost for good).
func TestReliablePushGivenUpIsHandedOnAtClose(t *testing.T) {
	n, r := resendingNode(t, 20*time.Millisecond, 3, 0, 501)
	mid, reached := n.Router.SendUser(501, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":1,"delta":1,"reason":"dev"}`), Ack: true})
	if reached != 1 {
		t.Fatalf("reached %d sessions", reached)
	}
	nodetest.Eventually(t, 15*time.Second, func() bool { return metricValue(t, n, "liveedge_resend_giveups_total") == 1 },
		"the push not given up on")
	if k := countPushes(r, mid, 300*time.Millisecond); k != 4 { // the first delivery and three resends, then none
		t.Fatalf("push sent %d times, want 4", k)
	}
	r.Close()
	next := dial(t, n, 501, nodetest.RawOptions{Batch: true})
	if f := next.NextOfType(proto.TypePush, 5*time.Second); f.Mid != mid {
		t.Fatalf("the next session got %+v, want the push given up on (%s)", f, mid)
	}
}

// With the offline boxes off (ws.offline_max: 0) a push given up on is still
// kept by its connection and handed on at its close to the user's other
// connection (up to router.MaxHandOn, what the hand-on keeps then). Before,
// the connection dropped every push it gave up on at once: lost.
func TestGivenUpPushHandedOnWithTheOfflineBoxesOff(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.ResendAfter = configsDuration(20 * time.Millisecond)
	cfg.WS.ResendMaxTries = 3
	cfg.WS.OfflineMax = 0
	n := nodetest.Start(t, cfg)
	r := dial(t, n, 503, nodetest.RawOptions{Batch: true})
	if f := request(t, r, 1, `{"t":"ping","id":1,"d":{}}`); f.Code != 0 {
		t.Fatalf("ping: %+v", f)
	}
	mid, reached := n.Router.SendUser(503, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":1,"delta":1,"reason":"dev"}`), Ack: true})
	if reached != 1 {
		t.Fatalf("reached %d sessions", reached)
	}
	nodetest.Eventually(t, 15*time.Second, func() bool { return metricValue(t, n, "liveedge_resend_giveups_total") == 1 },
		"the push not given up on")
	other := dial(t, n, 503, nodetest.RawOptions{Batch: true})
	if f := request(t, other, 1, `{"t":"ping","id":1,"d":{}}`); f.Code != 0 {
		t.Fatalf("ping: %+v", f)
	}
	r.Close()
	if f := other.NextOfType(proto.TypePush, 5*time.Second); f.Mid != mid {
		t.Fatalf("the user's other connection got %+v, want the push given up on (%s)", f, mid)
	}
	if v := metricValue(t, n, "liveedge_resend_given_dropped_total"); v != 0 {
		t.Fatalf("%v given-up pushes dropped, want none", v)
	}
}

// A connection keeps at most ws.offline_max pushes it gave up on (what the
// hand-on keeps anyway), the newest: a client that never acks does not pile
// them up for its whole session.
func TestGivenUpPushesKeptUpToOfflineMax(t *testing.T) {
	n, r := resendingNode(t, 20*time.Millisecond, 3, 2, 502)
	var mids []string
	for range 4 {
		mid, _ := n.Router.SendUser(502, proto.Push{Biz: proto.BizOrderStatus, Data: []byte(`{}`), Ack: true})
		mids = append(mids, mid)
	}
	// Dropped by the connection itself (not only by the hand-on's bound).
	nodetest.Eventually(t, 15*time.Second, func() bool { return metricValue(t, n, "liveedge_resend_given_dropped_total") == 2 },
		"the two oldest given-up pushes not dropped")
	r.Close()
	next := dial(t, n, 502, nodetest.RawOptions{Batch: true})
	var got []string
	for range 2 {
		got = append(got, next.NextOfType(proto.TypePush, 5*time.Second).Mid)
	}
	if got[0] != mids[2] || got[1] != mids[3] {
		t.Fatalf("the next session got %v, want the newest two of %v", got, mids)
	}
	if k := countPushes(next, mids[0], 500*time.Millisecond) + countPushes(next, mids[1], 10*time.Millisecond); k != 0 {
		t.Fatalf("an older given-up push came too (%d)", k)
	}
}

// A new reliable push's first resend comes one resend_after after it, even
// while an older unacked push's backed-off resend is far away: the timer
// was armed only when none was, for the older push's next try (here 1.6 s
// away) — the new push waited that long too.
func TestNewPushResentOnTimeBesideABackedOffOne(t *testing.T) {
	n, r := resendingNode(t, 50*time.Millisecond, 8, 0, 501)
	old, _ := n.Router.SendUser(501, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(`{"balance":1,"delta":1,"reason":"dev"}`), Ack: true})
	for i := 0; i < 6; i++ { // delivered, then resent 50, 100, 200, 400, 800 ms apart: the next in 1.6 s
		if f := r.NextOfType(proto.TypePush, 5*time.Second); f.Mid != old {
			t.Fatalf("push %+v, want %s", f, old)
		}
	}
	mid, _ := n.Router.SendUser(501, proto.Push{Biz: proto.BizOrderStatus, Data: []byte(`{}`), Ack: true})
	first := time.Time{}
	for {
		f := r.NextOfType(proto.TypePush, 5*time.Second)
		if f.Mid != mid {
			continue // the old one's resend
		}
		if first.IsZero() {
			first = time.Now()
			continue
		}
		if d := time.Since(first); d > 600*time.Millisecond {
			t.Fatalf("the new push's first resend came %v after it (resend_after 50ms)", d)
		}
		return
	}
}

// Reliable pushes not acked are resent in the order they were first sent
// (two order status pushes resent swapped show the client its order going
// back): they were resent in the order of a map.
func TestReliablePushesResentInOrder(t *testing.T) {
	n, r := resendingNode(t, 100*time.Millisecond, 3, 0, 502)
	var mids []string
	for i := range 30 {
		mid, reached := n.Router.SendUser(502, proto.Push{Biz: proto.BizWalletCredit, Data: []byte(fmt.Sprintf(`{"balance":%d,"delta":1,"reason":"dev"}`, i+1)), Ack: true})
		if reached != 1 {
			t.Fatalf("reached %d sessions", reached)
		}
		mids = append(mids, mid)
	}
	var got []string
	deadline := time.After(5 * time.Second)
	for len(got) < 2*len(mids) { // the first deliveries, then the first resends
		select {
		case f := <-r.Frames():
			if f.T == proto.TypePush {
				got = append(got, f.Mid)
			}
		case <-deadline:
			t.Fatalf("%d pushes of %d", len(got), 2*len(mids))
		}
	}
	if !slices.Equal(got[:len(mids)], mids) || !slices.Equal(got[len(mids):], mids) {
		t.Fatalf("pushes in order %v, then resent in order %v; want %v both times", got[:len(mids)], got[len(mids):], mids)
	}
}
