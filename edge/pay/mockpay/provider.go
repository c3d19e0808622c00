// Package mockpay is a payment provider for tests and demos that behaves like
// a real one: a user "pays" an order, then the provider delivers signed
// notifies to the merchant's webhook with Alipay's retry rhythm (compressed by
// Factor) until it answers "success", answers an active status query
// (signed the same way) and closes an unpaid order at the merchant's signed
// request (as Alipay's trade.close, WeChat Pay's closeorder): a closed order
// can no longer be paid, and closing a paid one answers its payment. Faults
// can be injected: duplicate deliveries, reordering, bad signatures, delays,
// lost notifies and hanging queries and closes.
//
// It is used by cmd/mockpay and by LiveEdge's payment tests.
package mockpay

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math/big"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
)

// AlipaySchedule is the gap before each notify attempt (8 attempts in ~25 h).
var AlipaySchedule = []time.Duration{0, 4 * time.Minute, 10 * time.Minute, 10 * time.Minute,
	time.Hour, 2 * time.Hour, 6 * time.Hour, 15 * time.Hour}

// Config configures a Provider. Zero values: no faults, real rhythm.
type Config struct {
	Secret     string        // signs notifies, query and close answers; checks the merchant's close requests
	Factor     float64       // schedule multiplier (0.001 turns 4 min into 240 ms); 0 = 1
	Duplicates int           // extra copies of every delivery, sent concurrently
	BadSigs    int           // the first N attempts of each payment carry a wrong signature
	Delay      time.Duration // wait before the first attempt
	Reorder    bool          // random extra delay (0..Factor×4 min) per attempt, so payments overtake each other
	Lost       bool          // never deliver notifies (only the active query tells)
	Client     *http.Client
	// Now is the provider's clock (signatures, paid_at): a test's injected
	// clock, so that the merchant verifies what it signs. nil = time.Now.
	Now func() time.Time
}

// Provider is the mock provider.
type Provider struct {
	cfg Config

	mu       sync.Mutex
	payments map[string]*payment
	closed   map[string]bool // orders closed unpaid (CloseOrder): never paid
	hang     map[string]bool // orders whose active query and close never answer

	Attempts  atomic.Int64 // HTTP deliveries made (copies included)
	Delivered atomic.Int64 // payments whose notify was acknowledged
	hanging   atomic.Int64 // active queries held by HangQuery now
	wg        sync.WaitGroup
	stop      chan struct{}
}

type payment struct {
	ev        pay.Event
	notifyURL string
	done      bool
}

// New returns a provider.
func New(cfg Config) *Provider {
	if cfg.Factor <= 0 {
		cfg.Factor = 1
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: 5 * time.Second}
	}
	return &Provider{cfg: cfg, payments: map[string]*payment{}, closed: map[string]bool{}, hang: map[string]bool{}, stop: make(chan struct{})}
}

// HangQuery makes the active query and the close of order hang (until the
// caller gives up or the provider closes), as an unresponsive provider does.
func (p *Provider) HangQuery(orderID string) {
	p.mu.Lock()
	p.hang[orderID] = true
	p.mu.Unlock()
}

// Hanging counts the active queries hanging now.
func (p *Provider) Hanging() int64 { return p.hanging.Load() }

// Close stops deliveries and waits for them.
func (p *Provider) Close() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	p.wg.Wait()
}

func randomID() string {
	var b [10]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ErrOrderClosed is TryPay's refusal of an order the merchant closed
// (CloseOrder): it can no longer be paid.
var ErrOrderClosed = errors.New("mockpay: order closed by the merchant: it can no longer be paid")

// StatusClosed is the status the provider answers for an order closed
// unpaid (a close, or a query of a closed order).
const StatusClosed = "CLOSED"

// Pay records a payment of amount for order and starts notifying notifyURL.
// status is "SUCCESS" (default) or "FAILED". Paying an order paid already is
// a no-op (its payment is returned); after a declined attempt (FAILED) the
// user may try again, as with a real provider: a new attempt, a new event.
// An order the merchant closed is refused (TryPay): the event returned then
// has status CLOSED and no event id — nothing was paid.
func (p *Provider) Pay(orderID string, amount int64, notifyURL, status string) pay.Event {
	ev, err := p.TryPay(orderID, amount, notifyURL, status)
	if err != nil {
		return pay.Event{OrderID: orderID, Status: StatusClosed}
	}
	return ev
}

// TryPay is Pay, with ErrOrderClosed for an order the merchant closed
// (CloseOrder): nothing is paid, nothing notified.
func (p *Provider) TryPay(orderID string, amount int64, notifyURL, status string) (pay.Event, error) {
	if status == "" {
		status = "SUCCESS"
	}
	p.mu.Lock()
	if p.closed[orderID] {
		p.mu.Unlock()
		return pay.Event{}, ErrOrderClosed
	}
	if old, ok := p.payments[orderID]; ok && old.ev.Status != "FAILED" {
		p.mu.Unlock()
		return old.ev, nil
	}
	pm := &payment{ev: pay.Event{EventID: "evt_" + randomID(), TxnID: pay.TxnID("txn_" + randomID()), OrderID: orderID, Amount: amount, Status: status,
		PaidAt: p.cfg.Now().UnixMilli()}, notifyURL: notifyURL}
	p.payments[orderID] = pm
	p.mu.Unlock()
	if !p.cfg.Lost && notifyURL != "" {
		p.wg.Add(1)
		go p.deliver(pm)
	}
	return pm.ev, nil
}

// CloseOrder closes order at the merchant's request, as a real provider's
// close call (Alipay trade.close, WeChat Pay closeorder): an order not paid
// (never paid, or only declined attempts) is closed for good — every later
// payment of it is refused — and CLOSED is answered; a paid one is not
// closed, its payment is answered (paid = true). Idempotent: closing again
// answers the same.
func (p *Provider) CloseOrder(orderID string) (ev pay.Event, paid bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pm, ok := p.payments[orderID]; ok && pm.ev.Status == "SUCCESS" {
		return pm.ev, true
	}
	p.closed[orderID] = true
	return pay.Event{OrderID: orderID, Status: StatusClosed}, false
}

// Paid returns order's successful payment, if the provider has one.
func (p *Provider) Paid(orderID string) (pay.Event, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pm, ok := p.payments[orderID]; ok && pm.ev.Status == "SUCCESS" {
		return pm.ev, true
	}
	return pay.Event{}, false
}

// CloseReq is the body of the merchant's POST /close?order_id=, signed in
// pay.SignatureHeader by pay.SignRequest with the shared secret — never
// as an answer or a notify is, so that a signed answer (anyone may query
// an order) replayed here does not verify. Its op must be "close", no
// other field is taken, and the URL's order_id must be the body's (only
// the body is signed).
type CloseReq struct {
	Op      string `json:"op"`
	OrderID string `json:"order_id"`
}

// Sign signs body as the provider does (for tests that forge deliveries).
func (p *Provider) Sign(body []byte) string { return pay.Sign(p.cfg.Secret, p.cfg.Now(), body) }

func (p *Provider) scaled(d time.Duration) time.Duration {
	return time.Duration(float64(d) * p.cfg.Factor)
}

func (p *Provider) deliver(pm *payment) {
	defer p.wg.Done()
	body, _ := proto.Marshal(pm.ev)
	wait := p.cfg.Delay
	for attempt, gap := range AlipaySchedule {
		wait += p.scaled(gap)
		if p.cfg.Reorder {
			n, _ := rand.Int(rand.Reader, big.NewInt(int64(p.scaled(4*time.Minute))+1))
			wait += time.Duration(n.Int64())
		}
		select {
		case <-p.stop:
			return
		case <-time.After(wait):
		}
		wait = 0
		sig := pay.Sign(p.cfg.Secret, p.cfg.Now(), body)
		if attempt < p.cfg.BadSigs {
			sig = pay.Sign(p.cfg.Secret+"-wrong", p.cfg.Now(), body)
		}
		var acked atomic.Bool
		var wg sync.WaitGroup
		for c := 0; c <= p.cfg.Duplicates; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if p.post(pm.notifyURL, sig, body) {
					acked.Store(true)
				}
			}()
		}
		wg.Wait()
		if acked.Load() {
			p.mu.Lock()
			pm.done = true
			p.mu.Unlock()
			p.Delivered.Add(1)
			return
		}
	}
}

// post delivers one notify; true when the merchant answered 200 "success".
func (p *Provider) post(url, sig string, body []byte) bool {
	p.Attempts.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return false
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(pay.SignatureHeader, sig)
	resp, err := p.cfg.Client.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	return resp.StatusCode == http.StatusOK && string(bytes.TrimSpace(b)) == "success"
}

// hangIfAsked holds a query or close of a HangQuery order until the caller
// gives up or the provider closes; false: the order does not hang.
func (p *Provider) hangIfAsked(r *http.Request, id string) bool {
	p.mu.Lock()
	hang := p.hang[id]
	p.mu.Unlock()
	if !hang {
		return false
	}
	p.hanging.Add(1)
	defer p.hanging.Add(-1)
	select {
	case <-r.Context().Done():
	case <-p.stop:
	}
	return true
}

// answer writes v as a signed answer (as a notify is signed).
func (p *Provider) answer(w http.ResponseWriter, v any) {
	b, _ := proto.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set(pay.SignatureHeader, pay.Sign(p.cfg.Secret, p.cfg.Now(), b))
	_, _ = w.Write(b)
}

// Handler serves the provider's HTTP API:
//
//	POST /pay?order_id=&amount=&notify_url=[&status=FAILED]   the user pays (409 for an order the merchant closed)
//	GET  /query?order_id=                                     active query (signed answer; hangs for HangQuery orders)
//	POST /close?order_id= {"order_id":…} signed by the merchant   close an unpaid order (signed answer: CLOSED, or the
//	                                                          payment of a paid one; 401 unsigned; hangs for HangQuery orders)
//	GET  /stats                                               attempts / delivered
func (p *Provider) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/pay", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		amount, err := strconv.ParseInt(q.Get("amount"), 10, 64)
		if err != nil || q.Get("order_id") == "" {
			http.Error(w, "order_id and amount required", http.StatusBadRequest)
			return
		}
		ev, err := p.TryPay(q.Get("order_id"), amount, q.Get("notify_url"), q.Get("status"))
		if err != nil {
			http.Error(w, "order closed: the merchant closed this order, it can no longer be paid", http.StatusConflict)
			return
		}
		b, _ := proto.Marshal(ev)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(b)
	})
	mux.HandleFunc("/query", func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("order_id")
		if p.hangIfAsked(r, id) {
			return
		}
		p.mu.Lock()
		pm, ok := p.payments[id]
		var ev pay.Event
		switch {
		case ok && (pm.ev.Status == "SUCCESS" || !p.closed[id]):
			ev = pm.ev
		case p.closed[id]:
			ev = pay.Event{OrderID: id, Status: StatusClosed}
		default:
			ev = pay.Event{OrderID: id, Status: "WAITING"}
		}
		p.mu.Unlock()
		p.answer(w, ev)
	})
	mux.HandleFunc("/close", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST required", http.StatusMethodNotAllowed)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 4<<10))
		if err != nil {
			http.Error(w, "body not read", http.StatusBadRequest)
			return
		}
		// The merchant's request is signed as a request (never as an
		// answer): nobody else may close an order (its buyer could no
		// longer pay it).
		if err := pay.VerifyRequest(r.Header.Get(pay.SignatureHeader), body, []string{p.cfg.Secret}, p.cfg.Now(), pay.DefaultTolerance); err != nil {
			http.Error(w, err.Error(), http.StatusUnauthorized)
			return
		}
		var req CloseReq
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil || req.Op != "close" || req.OrderID == "" || req.OrderID != r.URL.Query().Get("order_id") {
			http.Error(w, `op "close" and order_id required (no other field), the order_id the same in the URL and the signed body`, http.StatusBadRequest)
			return
		}
		if p.hangIfAsked(r, req.OrderID) {
			return
		}
		ev, _ := p.CloseOrder(req.OrderID)
		p.answer(w, ev)
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		b, _ := proto.Marshal(map[string]int64{"attempts": p.Attempts.Load(), "delivered": p.Delivered.Load()})
		_, _ = w.Write(b)
	})
	return mux
}
