package loadtest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/clientsdk"
	"github.com/liveedge/liveedge/gateway/proto"
)

// The money scenarios: a gift storm (every connection sends gifts to the
// room's anchor) and a red-packet grab storm (the anchor makes a rain through
// the HTTP API, every connection grabs). Both measure request → reply
// latency and check, through the HTTP API after the run, that the coins
// moved exactly as the replies said.

// DefaultGiftID is the gift the gift scenario sends: 爱心气泡, price 1 in the
// seed catalogue (the classic combo gift).
const DefaultGiftID = 24

// MaxGiftRate is the node's default gift limit per user per second
// (limits.gift_per_second); an offered rate above it per sender is refused
// by the node (10429), so Normalize refuses it unless NoGiftLimit.
const MaxGiftRate = 20

// money is the state of a gift or grab run.
type money struct {
	price     int64 // gift: price of GiftID
	receiver  int64 // gift: the anchor of the room
	anchorTok string
	recv0     int64 // gift: the receiver's `received` before the run
	bal0      int64 // grab: the anchor's balance after its credit, before prepare

	requests, replies, refused, ambiguous atomic.Int64
	missed                                atomic.Int64 // gift: slots due before the end, never sent (behind 32 in flight)
	spent                                 atomic.Int64 // gift: coins the replies say were debited
	granted                               atomic.Int64 // grab: Σ amounts told to grabbers
	users                                 int64        // gift: Σ senders' debits; grab: Σ grabbers' balances (after the run)
	codesMu                               sync.Mutex
	codes                                 map[int]int64

	phase time.Duration // grab: from start to the last grabber done
	code  string        // grab: the rain
	rain  *rainView     // grab: the rain after it finished
	note  string        // conservation: what was compared
	ok    *bool         // conservation held
	mu    sync.Mutex    // note, ok
}

func (m *money) refuse(code int) {
	m.refused.Add(1)
	m.codesMu.Lock()
	if m.codes == nil {
		m.codes = map[int]int64{}
	}
	m.codes[code]++
	m.codesMu.Unlock()
}

// envelope is the HTTP API's {"code","msg","data"}.
type envelope[T any] struct {
	Code int    `json:"code"`
	Msg  string `json:"msg"`
	Data T      `json:"data"`
}

func call[T any](ctx context.Context, hc *http.Client, method, url, token, body string) (T, error) {
	var out envelope[T]
	var err error
	if method == "GET" {
		err = getJSON(ctx, hc, url, token, &out)
	} else {
		err = postJSON(ctx, hc, url, token, body, &out)
	}
	if err != nil {
		return out.Data, err
	}
	if out.Code != 0 {
		return out.Data, fmt.Errorf("%s %s: code %d %s", method, url, out.Code, out.Msg)
	}
	return out.Data, nil
}

// DevCredit credits user amount coins through /api/v1/dev/credit (idempotent by reqID).
func DevCredit(ctx context.Context, hc *http.Client, base string, user, amount int64, reqID string) error {
	_, err := call[struct{}](ctx, hc, "POST", base+"/api/v1/dev/credit", "",
		fmt.Sprintf(`{"user_id":%d,"amount":%d,"req_id":%q}`, user, amount, reqID))
	return err
}

type wallet struct {
	Balance  int64 `json:"balance"`
	Received int64 `json:"received"`
}

// Wallet reads the token's user's wallet through GET /api/v1/wallet.
func getWallet(ctx context.Context, hc *http.Client, base, token string) (wallet, error) {
	return call[wallet](ctx, hc, "GET", base+"/api/v1/wallet", token, "")
}

// --- gift storm ---

// prepareGift finds the gift's price and the receiver, and reads the
// receiver's `received` before the run.
func (r *run) prepareGift(ctx context.Context) error {
	base := r.cfg.HTTP[0]
	gifts, err := call[struct {
		Gifts []struct {
			ID    int64 `json:"gift_id"`
			Price int64 `json:"price"`
		} `json:"gifts"`
	}](ctx, r.http, "GET", base+"/api/v1/gifts", "", "")
	if err != nil {
		return err
	}
	for _, g := range gifts.Gifts {
		if g.ID == r.cfg.GiftID {
			r.m.price = g.Price
		}
	}
	if r.m.price <= 0 {
		return fmt.Errorf("loadtest: gift %d is not in the catalogue", r.cfg.GiftID)
	}
	if r.m.anchorTok, err = DevToken(ctx, r.http, base, r.cfg.Anchor, "anchor"); err != nil {
		return err
	}
	room, err := call[struct {
		Anchor int64 `json:"anchor_id"`
	}](ctx, r.http, "GET", base+"/api/v1/rooms/"+strconv.FormatInt(r.room, 10), r.m.anchorTok, "")
	if err != nil {
		return err
	}
	r.m.receiver = room.Anchor
	if room.Anchor != r.cfg.Anchor { // -room of another anchor: read that anchor's wallet
		if r.m.anchorTok, err = DevToken(ctx, r.http, base, room.Anchor, "anchor"); err != nil {
			return err
		}
	}
	w, err := getWallet(ctx, r.http, base, r.m.anchorTok)
	r.m.recv0 = w.Received
	return err
}

// giftCredit is what each sender is credited before it connects: enough
// for twice its share of the offered gifts (closed loop: a large amount).
func (r *run) giftCredit() int64 {
	if r.cfg.Rate <= 0 {
		return 100_000_000
	}
	per := r.cfg.Rate / float64(r.cfg.Conns) * (r.cfg.Duration.Seconds() + 1)
	return int64(2*per+100) * r.m.price
}

// gift runs the storm until ctx ends: open loop at Rate gifts/s in all (each
// gift timed from its scheduled send time, so a slow reply delays nothing
// and is charged in full), or closed loop (Rate 0: one gift in flight per
// sender, the next when it is answered).
func (r *run) gift(ctx context.Context, senders []*lconn) {
	var wg sync.WaitGroup
	n := len(senders)
	warm := time.Now().Add(r.cfg.Warmup) // gifts scheduled before this are not timed
	for i, s := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r.cfg.Rate <= 0 {
				for seq := int64(1); ctx.Err() == nil; seq++ {
					at := time.Now()
					r.sendGift(s, seq, at, at.After(warm))
				}
				return
			}
			every := time.Duration(float64(time.Second) * float64(n) / r.cfg.Rate)
			next := time.Now().Add(every * time.Duration(i) / time.Duration(n)) // spread the phases
			inflight := make(chan struct{}, 32)                                 // gifts.max_inflight
			var gw sync.WaitGroup
			for seq := int64(1); ; seq++ {
				select {
				case <-ctx.Done():
					// Slots already due, never sent (the sender's 32 in
					// flight held them): a stall at the end would go
					// unmeasured — counted.
					if late := time.Since(next); late > 0 && every > 0 {
						r.m.missed.Add(int64(late/every) + 1)
					}
					gw.Wait()
					return
				case <-time.After(time.Until(next)):
				}
				at := next
				next = next.Add(every)
				select {
				case inflight <- struct{}{}:
				case <-ctx.Done():
					if every > 0 {
						r.m.missed.Add(int64(time.Since(at)/every) + 1) // this slot and those due behind it
					}
					gw.Wait()
					return
				}
				gw.Add(1)
				go func() {
					defer gw.Done()
					r.sendGift(s, seq, at, at.After(warm))
					<-inflight
				}()
			}
		}()
	}
	wg.Wait()
}

// sendGift sends one gift and waits for its reply (10 s at most: a gift
// that was sent is never abandoned when the run ends); timed unless it was
// scheduled during the warm-up.
func (r *run) sendGift(s *lconn, seq int64, at time.Time, timed bool) {
	r.m.requests.Add(1)
	rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := s.c.Gift(rctx, clientsdk.GiftReq{RoomID: r.room, GiftID: r.cfg.GiftID, ReceiverID: r.m.receiver, Count: 1,
		ReqID: "lg-" + strconv.FormatInt(s.user, 10) + "-" + strconv.FormatInt(seq, 10)})
	var pe *proto.Error
	if timed {
		// Every outcome is charged its time, a timeout its 10 s: left out,
		// a node that stalls some gifts past the timeout would show a p99
		// of the ones it answered.
		r.lat.Record(time.Since(at))
	}
	switch {
	case err == nil:
		r.m.replies.Add(1)
		r.m.spent.Add(r.m.price)
	case errors.As(err, &pe) && pe.Code == proto.CodeConflict:
		r.m.ambiguous.Add(1) // 10409 for a req_id sent once: its own debit in doubt
	case errors.As(err, &pe):
		r.m.refuse(pe.Code)
	default:
		r.m.ambiguous.Add(1) // sent (or not), outcome unknown: timeout, disconnect
		r.fail(fmt.Errorf("gift: %w", err))
	}
}

// checkGift compares, through the HTTP API, every sender's balance with its
// credit minus the gifts it was told succeeded, and the receiver's
// `received` with the sum.
func (r *run) checkGift(ctx context.Context, senders []*lconn) {
	base := r.cfg.HTTP[0]
	credit := r.giftCredit()
	var spent atomic.Int64
	var bad atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, s := range senders {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			w, err := getWallet(ctx, r.http, base, s.token)
			if err != nil {
				bad.Add(1)
				r.fail(fmt.Errorf("wallet of %d: %w", s.user, err))
				return
			}
			spent.Add(credit - w.Balance)
		}()
	}
	wg.Wait()
	w, err := getWallet(ctx, r.http, base, r.m.anchorTok)
	if err != nil || bad.Load() > 0 {
		r.fail(fmt.Errorf("conservation not checked: %v", err))
		return
	}
	got, told, amb := spent.Load(), r.m.spent.Load(), r.m.ambiguous.Load()*r.m.price
	r.m.users = got
	if r.cfg.MoneyShare { // the receiver gets the gifts of every process: checked by the parent
		ok := got >= told && got <= told+amb
		r.m.ok, r.m.note = &ok, fmt.Sprintf("this process's senders debited %d coins, replies said %d (+ up to %d in unanswered gifts)", got, told, amb)
		if !ok {
			r.fail(errors.New("gift conservation broken: " + r.m.note))
		}
		return
	}
	recv := w.Received - r.m.recv0
	ok := got >= told && got <= told+amb && recv == got
	r.m.ok, r.m.note = &ok, fmt.Sprintf("senders debited %d coins, replies said %d (+ up to %d in unanswered gifts), receiver's received +%d", got, told, amb, recv)
	if !ok {
		r.fail(errors.New("gift conservation broken: " + r.m.note))
	}
}

// --- red-packet grab storm ---

type rainView struct {
	Code          string `json:"code"`
	State         string `json:"state"`
	TotalAmount   int64  `json:"total_amount"`
	TotalCount    int64  `json:"total_count"`
	GrantedCount  int64  `json:"granted_count"`
	GrantedAmount int64  `json:"granted_amount"`
	Refunded      int64  `json:"refunded"`
	EndsAt        int64  `json:"ends_at"`
}

// prepareGrab credits the anchor the rain's total and reads its balance.
func (r *run) prepareGrab(ctx context.Context) error {
	base := r.cfg.HTTP[0]
	var err error
	if r.m.anchorTok, err = DevToken(ctx, r.http, base, r.cfg.Anchor, "anchor"); err != nil {
		return err
	}
	if r.cfg.MoneyShare { // the parent credited the anchor and made the rain
		r.m.code = r.cfg.RainCode
		return nil
	}
	if err := DevCredit(ctx, r.http, base, r.cfg.Anchor, r.cfg.RainTotal, fmt.Sprintf("lg-rain-%d-%d", r.cfg.UserBase, r.room)); err != nil {
		return err
	}
	w, err := getWallet(ctx, r.http, base, r.m.anchorTok)
	r.m.bal0 = w.Balance
	return err
}

// grab makes the rain (create, prepare, start through the HTTP API) and has
// every connection grab at once; a grabber stops at its packet, at "already
// grabbed" or "none left", and waits out 10429 (redpacket.grab_interval).
// Then it waits for the rain to finish (the rest refunded) and checks Σ = T.
func (r *run) grab(ctx context.Context, grabbers []*lconn) {
	base := r.cfg.HTTP[0]
	secs := r.rainSeconds()
	if !r.cfg.MoneyShare { // a share grabs from the parent's rain, started by the parent
		err := r.makeRain(ctx)
		if err == nil {
			err = r.startRain(ctx)
		}
		if err != nil {
			r.fail(fmt.Errorf("rain: %w", err))
			return
		}
	}
	code := r.m.code
	r.logf("rain %s: %d coins in %d packets for %d s, %d grabbers", code, r.cfg.RainTotal, r.cfg.RainCount, secs, len(grabbers))
	t0 := time.Now()
	gctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, g := range grabbers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.grabOne(gctx, g, code)
		}()
	}
	wg.Wait()
	r.m.phase = time.Since(t0)
	// the rain finishes at ends_at (the rest refunded): wait for it
	if v, err := r.finishedRain(ctx, base, time.Duration(secs)*time.Second+15*time.Second); err != nil {
		r.fail(err)
	} else {
		r.m.rain = v
	}
}

func (r *run) rainSeconds() int64 {
	return max(int64(r.cfg.Duration.Round(time.Second)/time.Second), 1)
}

// makeRain creates and prepares the rain (the anchor is debited T).
func (r *run) makeRain(ctx context.Context) error {
	base := r.cfg.HTTP[0]
	rain, err := call[rainView](ctx, r.http, "POST", base+"/api/v1/rooms/"+strconv.FormatInt(r.room, 10)+"/redpackets", r.m.anchorTok,
		fmt.Sprintf(`{"total_amount":%d,"total_count":%d,"duration_s":%d}`, r.cfg.RainTotal, r.cfg.RainCount, r.rainSeconds()))
	if err != nil {
		return err
	}
	r.m.code = rain.Code
	_, err = call[rainView](ctx, r.http, "POST", base+"/api/v1/redpackets/"+rain.Code+"/prepare", r.m.anchorTok, "{}")
	return err
}

func (r *run) startRain(ctx context.Context) error {
	_, err := call[rainView](ctx, r.http, "POST", r.cfg.HTTP[0]+"/api/v1/redpackets/"+r.m.code+"/start", r.m.anchorTok, "{}")
	return err
}

// finishedRain polls the rain until it is FINISHED (within wait).
func (r *run) finishedRain(ctx context.Context, base string, wait time.Duration) (*rainView, error) {
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		v, err := call[rainView](ctx, r.http, "GET", base+"/api/v1/redpackets/"+r.m.code, r.m.anchorTok, "")
		if err == nil && v.State == "FINISHED" {
			return &v, nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return nil, fmt.Errorf("rain %s did not finish in time", r.m.code)
}

func (r *run) grabOne(ctx context.Context, g *lconn, code string) {
	for ctx.Err() == nil {
		r.m.requests.Add(1)
		t0 := time.Now()
		res, err := g.c.Grab(ctx, code)
		var pe *proto.Error
		switch {
		case err == nil:
			r.lat.Record(time.Since(t0))
			r.m.replies.Add(1)
			r.m.granted.Add(res.Amount)
			g.granted = res.Amount
			return
		case errors.As(err, &pe):
			r.lat.Record(time.Since(t0))
			r.m.refuse(pe.Code)
			switch pe.Code {
			case 30002, 30003: // already got one; none left or over
				return
			case 10429: // redpacket.grab_interval
				sleepCtx(ctx, 500*time.Millisecond)
			default:
				sleepCtx(ctx, 100*time.Millisecond)
			}
		default:
			if ctx.Err() != nil {
				return
			}
			r.m.ambiguous.Add(1) // a grant may have happened: the wallet check shows it
			r.fail(fmt.Errorf("grab: %w", err))
			sleepCtx(ctx, 100*time.Millisecond)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// checkGrab: the rain's granted count and amount are what the grabbers were
// told, granted + refunded = T, every grabber's balance is its packet, and
// the anchor got the rest back.
func (r *run) checkGrab(ctx context.Context, grabbers []*lconn) {
	v := r.m.rain
	if v == nil {
		return
	}
	base := r.cfg.HTTP[0]
	var sum, bad atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, g := range grabbers {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			w, err := getWallet(ctx, r.http, base, g.token)
			if err != nil {
				bad.Add(1)
				r.fail(fmt.Errorf("wallet of %d: %w", g.user, err))
				return
			}
			sum.Add(w.Balance)
			if w.Balance != g.granted && r.m.ambiguous.Load() == 0 {
				bad.Add(1)
				r.fail(fmt.Errorf("grabber %d: balance %d, told %d", g.user, w.Balance, g.granted))
			}
		}()
	}
	wg.Wait()
	r.m.users = sum.Load()
	told := r.m.granted.Load()
	if r.cfg.MoneyShare { // the rain's totals and the anchor: checked by the parent over every process
		ok := bad.Load() == 0
		r.m.ok = &ok
		r.m.note = fmt.Sprintf("rain %s: this process's %d grabbers were told %d packets / %d coins, their balances Σ %d",
			v.Code, len(grabbers), r.m.replies.Load(), told, sum.Load())
		if !ok {
			r.fail(errors.New("grab conservation broken: " + r.m.note))
		}
		return
	}
	aw, err := getWallet(ctx, r.http, base, r.m.anchorTok)
	if err != nil {
		r.fail(fmt.Errorf("anchor wallet: %w", err))
		return
	}
	ok := bad.Load() == 0 && v.GrantedAmount+v.Refunded == v.TotalAmount && v.TotalAmount == r.cfg.RainTotal &&
		sum.Load() == v.GrantedAmount && aw.Balance == r.m.bal0-v.TotalAmount+v.Refunded &&
		(r.m.ambiguous.Load() > 0 || (v.GrantedAmount == told && v.GrantedCount == r.m.replies.Load()))
	r.m.ok = &ok
	r.m.note = fmt.Sprintf("rain %s: granted %d packets / %d coins (grabbers told %d / %d, their balances Σ %d) + refunded %d = %d of T %d; anchor %d → %d",
		v.Code, v.GrantedCount, v.GrantedAmount, r.m.replies.Load(), told, sum.Load(), v.Refunded, v.GrantedAmount+v.Refunded, v.TotalAmount, r.m.bal0, aw.Balance)
	if !ok {
		r.fail(errors.New("grab conservation broken: " + r.m.note))
	}
}

// fillMoney copies the money figures into res.
func (r *run) fillMoney(res *Result) {
	m := &r.m
	res.Requests, res.Replies, res.Refused = m.requests.Load(), m.replies.Load(), m.refused.Load()
	m.codesMu.Lock()
	if len(m.codes) > 0 {
		res.RefusedCodes = map[int]int64{}
		for c, n := range m.codes {
			res.RefusedCodes[c] = n
		}
	}
	m.codesMu.Unlock()
	secs := res.RunSeconds
	if r.cfg.Scenario == Grab {
		secs = m.phase.Seconds() // the storm, not the wait for the rain's end
	}
	if secs > 0 {
		res.RepliesPerSec = float64(res.Replies) / secs
	}
	if r.cfg.Scenario == Gift || r.cfg.Scenario == Grab {
		res.StormSeconds, res.Ambiguous, res.UsersCoins = secs, m.ambiguous.Load(), m.users
		res.MissedSlots = m.missed.Load()
	}
	if r.cfg.Scenario == Gift {
		res.OfferedRate, res.WarmupSeconds = r.cfg.Rate, r.cfg.Warmup.Seconds()
	}
	if r.cfg.Scenario == Grab {
		res.Packets, res.TotalAmount, res.GrantedAmount = int64(r.cfg.RainCount), r.cfg.RainTotal, m.granted.Load()
	}
	res.Conserved, res.ConservationNote = m.ok, m.note
}
