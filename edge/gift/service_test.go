package gift

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
	"github.com/liveedge/liveedge/router/routertest"
)

// inProgressWallet is the real ledger, except that the gift with req_id
// "busy" (the gift service prefixes req_ids with "gift:") gets
// persist.ErrInProgress, as from the shared wallet while another node is
// still making the first request with that req_id durable.
type inProgressWallet struct{ *persist.Ledger }

func (w inProgressWallet) ApplyAsync(op persist.Op, done func(persist.Result, error)) {
	if op.ReqID == "gift:busy" {
		done(persist.Result{}, persist.ErrInProgress)
		return
	}
	w.Ledger.ApplyAsync(op, done)
}

// A gift whose req_id is still in progress elsewhere is answered 10409 and is
// not reported as failed (no biz 5557: it may well succeed); a real failure
// (insufficient balance) is.
func TestInProgressIsNotAFailure(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	led, err := persist.NewLedger(st, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	defer led.Close()
	cat, err := NewCatalogue(PebbleCatalogue{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	rt := router.NewLocal("t", router.LocalConfig{})
	rt.OpenRoom(7)
	sender := &routertest.Recorder{SessionID: 1, User: 100}
	rt.Register(sender)
	s := New(inProgressWallet{led}, rt, cat, Config{}, nil)

	req := Req{RoomID: 7, GiftID: 24, ReceiverID: 200, Count: 1, ReqID: "busy"}
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeConflict {
		t.Fatalf("in progress: %+v, want code %d", e, proto.CodeConflict)
	}
	req.ReqID = "poor" // balance 0
	if _, e := s.Send(100, true, req); e == nil || e.Code != proto.CodeInsufficientBalance {
		t.Fatalf("insufficient: %+v", e)
	}
	time.Sleep(50 * time.Millisecond) // pushes are queued synchronously; this is slack
	var failed []string
	for _, r := range sender.Received() {
		failed = append(failed, string(r.Bytes))
	}
	if len(failed) != 1 {
		t.Fatalf("biz 5557 pushes %q, want exactly one (for the insufficient balance)", failed)
	}
}
