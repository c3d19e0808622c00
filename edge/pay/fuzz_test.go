package pay_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

const fuzzSecret = "fuzz-secret-0123456789"

// FuzzNotify drives the webhook handler with arbitrary headers and bodies,
// signed or not. It must never panic, answer only with the documented
// statuses, and never credit more than the one paid order is worth.
// Seed corpus: testdata/fuzz/FuzzNotify.
func FuzzNotify(f *testing.F) {
	dir := f.TempDir()
	st, err := persist.Open(dir)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = st.Close() })
	l, err := persist.NewLedger(st, nil)
	if err != nil {
		f.Fatal(err)
	}
	svc, err := pay.New(st, l, router.NewLocal("fuzz", router.LocalConfig{}), pay.Config{Node: "fuzz", Secrets: []string{fuzzSecret},
		ReconcileEvery: time.Hour})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(svc.Close)
	o, err := svc.CreateOrder(7, pay.CreateReq{ProductID: 1, Channel: "mock", ReqID: "fuzz"})
	if err != nil {
		f.Fatal(err)
	}
	good, _ := proto.Marshal(pay.Event{EventID: "e1", OrderID: o.OrderID, Amount: o.Amount, Status: "SUCCESS"})
	f.Add("", good, true)
	f.Add("t=1,v1=00", good, false)
	f.Add("", []byte(fmt.Sprintf(`{"event_id":"e2","order_id":%q,"amount":-1,"status":"SUCCESS"}`, o.OrderID)), true)
	f.Add("", []byte(`{"event_id":"e3","order_id":"1","amount":1,"status":"FAILED"}`), true)
	f.Add("", []byte(`{"event_id":"","order_id":"","amount":0}`), true)
	f.Add("", []byte(`[]`), true)
	f.Add("", []byte(`{"event_id":"e4","order_id":"99999999999999999999","amount":1,"status":"SUCCESS"}`), true)
	f.Add("t=99999999999999999999,v1=zz,v1=", []byte("{}"), false)
	f.Add("", []byte(fmt.Sprintf(`{"event_id":"e5","txn_id":"t5","order_id":%q,"amount":%d,"status":"SUCCESS"}`, o.OrderID, o.Amount)), true)
	f.Add("", []byte(fmt.Sprintf(`{"event_id":"e6","txn_id":"t6","order_id":%q,"amount":%d,"status":"SUCCESS"}`, o.OrderID, o.Amount)), true)
	f.Add("", []byte(fmt.Sprintf(`{"event_id":"e7","txn_id":7,"order_id":%q,"amount":1,"status":"SUCCESS"}`, o.OrderID)), true)
	f.Fuzz(func(t *testing.T, header string, body []byte, sign bool) {
		if sign {
			header = pay.Sign(fuzzSecret, time.Now(), body)
		}
		status, _ := svc.Notify("mock", header, body)
		switch status {
		case pay.NotifyOK, pay.NotifyBadRequest, pay.NotifyUnauthorized, pay.NotifyNotFound, pay.NotifyConflict:
		default:
			t.Fatalf("status %d for %q %q", status, header, body)
		}
		if !sign && status != pay.NotifyUnauthorized {
			// Only a real signature gets past the first check.
			if err := pay.Verify(header, body, []string{fuzzSecret}, time.Now(), pay.DefaultTolerance); err != nil {
				t.Fatalf("unsigned input accepted: %d", status)
			}
		}
		if b, _ := l.Balance(7); b != 0 && b != o.Coins {
			t.Fatalf("balance %d", b)
		}
	})
}
