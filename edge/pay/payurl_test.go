package pay

import (
	"net/url"
	"strconv"
	"testing"
)

// payURL writes exactly what url.Values.Encode wrote before it (the pay_url
// stored in every order and answered to clients must not change).
func TestPayURLMatchesValuesEncode(t *testing.T) {
	for _, notify := range []string{"http://node.invalid/api/v1/pay/notify", "https://a.b:8443/x y/é?&="} {
		s := &Service{cfg: Config{ProviderURL: "http://provider.invalid"}}
		s.SetNotifyURL(notify)
		o := &Order{OrderID: "12345678901234", Amount: 9900, Channel: "mock"}
		q := url.Values{"order_id": {o.OrderID}, "amount": {strconv.FormatInt(o.Amount, 10)}, "notify_url": {notify + "/" + o.Channel}}
		if got, want := s.payURL(o), s.cfg.ProviderURL+"/pay?"+q.Encode(); got != want {
			t.Fatalf("payURL %q, want %q", got, want)
		}
	}
	if got := (&Service{}).payURL(&Order{}); got != "" {
		t.Fatalf("no provider: %q", got)
	}
}
