package mockpay_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
)

const secret = "mockpay-test-secret-0123456789abcdef"

// closeAt posts the merchant's close of order (signed with key, urlOrder
// the order id in the URL) and returns the HTTP status and the verified
// answer.
func closeAt(t *testing.T, srv *httptest.Server, order, urlOrder, key string) (int, pay.Event) {
	t.Helper()
	body, _ := json.Marshal(mockpay.CloseReq{Op: "close", OrderID: order})
	return postClose(t, srv, urlOrder, body, pay.SignRequest([]string{key}, time.Now(), body))
}

// postClose posts body to /close?order_id=urlOrder with signature sig.
func postClose(t *testing.T, srv *httptest.Server, urlOrder string, body []byte, sig string) (int, pay.Event) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/close?order_id="+urlOrder, strings.NewReader(string(body)))
	req.Header.Set(pay.SignatureHeader, sig)
	return answer(t, req)
}

func answer(t *testing.T, req *http.Request) (int, pay.Event) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var ev pay.Event
	if resp.StatusCode == http.StatusOK {
		if err := pay.Verify(resp.Header.Get(pay.SignatureHeader), b, []string{secret}, time.Now(), pay.DefaultTolerance); err != nil {
			t.Fatalf("answer %s not signed: %v", b, err)
		}
		if err := json.Unmarshal(b, &ev); err != nil {
			t.Fatal(err)
		}
	}
	return resp.StatusCode, ev
}

func payAt(t *testing.T, srv *httptest.Server, order, status string) int {
	t.Helper()
	resp, err := http.Post(srv.URL+"/pay?order_id="+order+"&amount=100&status="+status, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func queryAt(t *testing.T, srv *httptest.Server, order string) pay.Event {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/query?order_id="+order, nil)
	st, ev := answer(t, req)
	if st != http.StatusOK {
		t.Fatalf("query: %d", st)
	}
	return ev
}

// The provider's close, as a real one's: only the merchant's signed request
// closes (401 unsigned or signed otherwise, 400 for another order in the
// URL than in the signed body); an unpaid order — never paid, or only
// declined — is closed for good (CLOSED, again on every close; its /pay
// refused 409, its query CLOSED); a paid one is not closed, its payment
// answered, the same on every close.
func TestCloseAtTheProvider(t *testing.T) {
	p := mockpay.New(mockpay.Config{Secret: secret, Lost: true})
	defer p.Close()
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()

	if st, _ := closeAt(t, srv, "o1", "o1", "not-the-secret"); st != http.StatusUnauthorized {
		t.Fatalf("a close signed otherwise: %d, want 401", st)
	}
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/close?order_id=o1", strings.NewReader(`{"order_id":"o1"}`))
	if st, _ := answer(t, req); st != http.StatusUnauthorized {
		t.Fatalf("an unsigned close: %d, want 401", st)
	}
	if st, _ := closeAt(t, srv, "o1", "o2", secret); st != http.StatusBadRequest {
		t.Fatalf("another order in the URL: %d, want 400", st)
	}
	if ev := queryAt(t, srv, "o1"); ev.Status != "WAITING" {
		t.Fatalf("o1 after refused closes: %+v, want WAITING", ev)
	}

	for range 2 {
		if st, ev := closeAt(t, srv, "o1", "o1", secret); st != http.StatusOK || ev.Status != mockpay.StatusClosed || ev.OrderID != "o1" {
			t.Fatalf("close of an unpaid order: %d %+v, want CLOSED", st, ev)
		}
	}
	if st := payAt(t, srv, "o1", ""); st != http.StatusConflict {
		t.Fatalf("/pay of a closed order: %d, want 409", st)
	}
	if _, err := p.TryPay("o1", 100, "", ""); err != mockpay.ErrOrderClosed {
		t.Fatalf("TryPay of a closed order: %v", err)
	}
	if ev := queryAt(t, srv, "o1"); ev.Status != mockpay.StatusClosed {
		t.Fatalf("query of a closed order: %+v", ev)
	}

	if st := payAt(t, srv, "o2", "FAILED"); st != http.StatusOK {
		t.Fatalf("a declined attempt: %d", st)
	}
	if st, ev := closeAt(t, srv, "o2", "o2", secret); st != http.StatusOK || ev.Status != mockpay.StatusClosed {
		t.Fatalf("close after a declined attempt: %d %+v, want CLOSED", st, ev)
	}
	if st := payAt(t, srv, "o2", ""); st != http.StatusConflict {
		t.Fatalf("/pay after the close: %d, want 409", st)
	}

	if st := payAt(t, srv, "o3", ""); st != http.StatusOK {
		t.Fatalf("/pay: %d", st)
	}
	paid, _ := p.Paid("o3")
	for range 2 {
		if st, ev := closeAt(t, srv, "o3", "o3", secret); st != http.StatusOK || ev != paid || ev.Status != "SUCCESS" {
			t.Fatalf("close of a paid order: %d %+v, want its payment %+v", st, ev, paid)
		}
	}
	if ev, ok := p.Paid("o3"); !ok || ev != paid {
		t.Fatalf("the payment after the closes: %+v %v", ev, ok)
	}
}

// HangQuery makes an order's closes hang as its queries do (an unresponsive
// provider): the merchant's request ends at its own timeout.
func TestHangQueryHangsCloses(t *testing.T) {
	p := mockpay.New(mockpay.Config{Secret: secret, Lost: true})
	defer p.Close()
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	p.HangQuery("o1")
	body, _ := json.Marshal(mockpay.CloseReq{Op: "close", OrderID: "o1"})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/close?order_id=o1", strings.NewReader(string(body)))
	req.Header.Set(pay.SignatureHeader, pay.SignRequest([]string{secret}, time.Now(), body))
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("a hanging close answered %d", resp.StatusCode)
	}
	if _, err := p.TryPay("o1", 100, "", ""); err != nil {
		t.Fatalf("an order whose close never answered is not closed: %v", err)
	}
}

// Only the merchant's request closes an order: a signed answer of the
// provider's — anyone may query an order, and the same secret signs both —
// replayed to /close does not verify (requests are signed over another
// context), nor does a close signed as an answer, a body without op
// "close", or one with fields of its own. Before, the query's signed
// WAITING answer posted back to /close closed the buyer's order: nobody
// could pay it.
func TestCloseNotForgedFromASignedAnswer(t *testing.T) {
	p := mockpay.New(mockpay.Config{Secret: secret, Lost: true})
	defer p.Close()
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/query?order_id=victim")
	if err != nil {
		t.Fatal(err)
	}
	answerBody, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if st, _ := postClose(t, srv, "victim", answerBody, resp.Header.Get(pay.SignatureHeader)); st != http.StatusUnauthorized {
		t.Fatalf("a query's signed answer replayed as a close: %d, want 401", st)
	}
	body, _ := json.Marshal(mockpay.CloseReq{Op: "close", OrderID: "victim"})
	if st, _ := postClose(t, srv, "victim", body, pay.Sign(secret, time.Now(), body)); st != http.StatusUnauthorized {
		t.Fatalf("a close signed as an answer: %d, want 401", st)
	}
	for _, b := range []string{`{"order_id":"victim"}`, `{"op":"close","order_id":"victim","status":"WAITING"}`} {
		if st, _ := postClose(t, srv, "victim", []byte(b), pay.SignRequest([]string{secret}, time.Now(), []byte(b))); st != http.StatusBadRequest {
			t.Fatalf("close body %s: %d, want 400", b, st)
		}
	}
	if st := payAt(t, srv, "victim", ""); st != http.StatusOK {
		t.Fatalf("the buyer's payment after the forged closes: %d, want 200", st)
	}
}

// During a rotation of the shared secret the merchant signs its close with
// each secret it holds: the provider verifies it whichever it has. Before,
// only the first was used — every close refused (401) while the two ends
// held different first secrets.
func TestCloseSignedWithEverySecret(t *testing.T) {
	p := mockpay.New(mockpay.Config{Secret: secret, Lost: true})
	defer p.Close()
	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	body, _ := json.Marshal(mockpay.CloseReq{Op: "close", OrderID: "o1"})
	sig := pay.SignRequest([]string{"the-new-secret-not-at-the-provider-yet", secret}, time.Now(), body)
	if st, ev := postClose(t, srv, "o1", body, sig); st != http.StatusOK || ev.Status != mockpay.StatusClosed {
		t.Fatalf("a close signed with the new and the old secret: %d %+v, want CLOSED", st, ev)
	}
}
