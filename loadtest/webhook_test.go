package loadtest_test

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/loadtest"
)

// The signature loadgen's webhook writes is the one the node verifies.
func TestSignNotifyMatchesPay(t *testing.T) {
	at := time.Unix(1_700_000_000, 0)
	body := []byte(`{"event_id":"e1","order_id":"o1","amount":3000,"status":"SUCCESS","paid_at":1}`)
	if got, want := loadtest.SignNotify("s3cret-s3cret-s3cret", at, body), pay.Sign("s3cret-s3cret-s3cret", at, body); got != want {
		t.Fatalf("SignNotify %q, pay.Sign %q", got, want)
	}
}

// wrk posts 300 pre-signed notifies of real orders, each once; every order
// ends PAYED and every buyer is credited exactly its orders' coins.
func TestWebhookWithWrk(t *testing.T) {
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		t.Skip("wrk is not installed (make tools installs it)")
	}
	const secret = "webhook-test-secret-0123456789abcdef"
	cfg := nodetest.Config(t)
	cfg.Pay.Secrets = []string{secret}
	cfg.Pay.MaxOpenOrdersPerUser, cfg.Pay.OrdersPerMinute = 0, 0
	n := nodetest.Start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := loadtest.RunWebhook(ctx, loadtest.WebhookConfig{HTTP: nodetest.HTTPURL(n), Secret: secret,
		Orders: 300, Users: 7, Threads: 2, Conns: 8, MaxTime: 30 * time.Second, Wrk: wrk, Log: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	if !res.ExactlyOnce || res.Paid != 300 || res.Answered != 300 || res.Bad != 0 || res.CreditedCoins != res.ExpectedCoins {
		t.Fatalf("%+v", res)
	}
	if res.NotifiesPerS <= 0 || res.Seconds <= 0 || res.Seconds >= 30 {
		t.Fatalf("rate %v over %v s (wrk interrupted once done?)", res.NotifiesPerS, res.Seconds)
	}
}
