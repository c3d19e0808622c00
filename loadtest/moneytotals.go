package loadtest

import (
	"context"
	"fmt"
	"net/http"
	"time"
)

// MoneyTotals is the parent's side of a gift or grab run spread over
// processes (loadgen -procs). Each process runs a share (Config.MoneyShare):
// it checks its own users — every sender debited what its replies said
// (within the unanswered gifts), every grabber's balance the packet it was
// told — and reports the sums. What is run-wide is the parent's: before the
// processes start it reads the receiver's `received` (gift), or credits the
// anchor and makes the rain, which it starts at the processes' common start
// time (grab); once every process has finished it checks the totals through
// the HTTP API (Check).
type MoneyTotals struct {
	r       *run
	started bool
}

// NewMoneyTotals prepares a gift or grab run of cfg (normalized: all
// processes' connections, rain and rate) in room.
func NewMoneyTotals(ctx context.Context, cfg Config, room int64) (*MoneyTotals, error) {
	if cfg.Scenario != Gift && cfg.Scenario != Grab {
		return nil, fmt.Errorf("loadtest: no money totals for %s", cfg.Scenario)
	}
	cfg.MoneyShare = false
	r := &run{cfg: cfg, room: room, http: &http.Client{Timeout: 10 * time.Second}}
	mt := &MoneyTotals{r: r}
	if cfg.Scenario == Gift {
		return mt, r.prepareGift(ctx)
	}
	if err := r.prepareGrab(ctx); err != nil {
		return nil, err
	}
	if err := r.makeRain(ctx); err != nil {
		return nil, fmt.Errorf("rain: %w", err)
	}
	return mt, nil
}

// RainCode is the grab run's rain ("" for a gift run).
func (mt *MoneyTotals) RainCode() string { return mt.r.m.code }

// StartRain starts the grab run's rain.
func (mt *MoneyTotals) StartRain(ctx context.Context) error {
	if err := mt.r.startRain(ctx); err != nil {
		return err
	}
	mt.started = true
	return nil
}

// Abandon cancels a rain that was never started (its T back to the anchor),
// when the run failed before its start.
func (mt *MoneyTotals) Abandon(ctx context.Context) error {
	r := mt.r
	if r.cfg.Scenario != Grab || mt.started || r.m.code == "" {
		return nil
	}
	_, err := call[rainView](ctx, r.http, "POST", r.cfg.HTTP[0]+"/api/v1/redpackets/"+r.m.code+"/cancel", r.m.anchorTok, "{}")
	return err
}

// Check sets res.Conserved and res.ConservationNote from res, the merge of
// every process's share. missing is how many processes reported nothing:
// their users' coins are unknown, so the check fails.
func (mt *MoneyTotals) Check(ctx context.Context, res *Result, parts []*Result, missing int) {
	r := mt.r
	ok, note := mt.check(ctx, res, parts, missing)
	res.Conserved, res.ConservationNote = &ok, note
	if r.cfg.Scenario == Gift {
		res.OfferedRate, res.WarmupSeconds = r.cfg.Rate, r.cfg.Warmup.Seconds()
	} else {
		res.Packets, res.TotalAmount = int64(r.cfg.RainCount), r.cfg.RainTotal
	}
}

func (mt *MoneyTotals) check(ctx context.Context, res *Result, parts []*Result, missing int) (bool, string) {
	r := mt.r
	base := r.cfg.HTTP[0]
	shares := true
	for _, p := range parts {
		shares = shares && p.Conserved != nil && *p.Conserved
	}
	prefix := ""
	if missing > 0 {
		prefix = fmt.Sprintf("%d process(es) reported nothing: not checked; ", missing)
	} else if !shares {
		prefix = "a process's own users do not add up (see its error); "
	}
	switch r.cfg.Scenario {
	case Gift:
		w, err := getWallet(ctx, r.http, base, r.m.anchorTok)
		if err != nil {
			return false, fmt.Sprintf("%sthe receiver's wallet: %v", prefix, err)
		}
		got, told, amb := res.UsersCoins, res.Replies*r.m.price, res.Ambiguous*r.m.price
		recv := w.Received - r.m.recv0
		ok := missing == 0 && shares && got >= told && got <= told+amb && recv == got
		return ok, fmt.Sprintf("%sover %d processes: senders debited %d coins, replies said %d (+ up to %d in unanswered gifts), receiver's received +%d",
			prefix, len(parts), got, told, amb, recv)
	default:
		if !mt.started {
			return false, prefix + "the rain was never started"
		}
		v, err := r.finishedRain(ctx, base, time.Duration(r.rainSeconds())*time.Second+15*time.Second)
		if err != nil {
			return false, prefix + err.Error()
		}
		aw, err := getWallet(ctx, r.http, base, r.m.anchorTok)
		if err != nil {
			return false, fmt.Sprintf("%sthe anchor's wallet: %v", prefix, err)
		}
		ok := missing == 0 && shares && v.GrantedAmount+v.Refunded == v.TotalAmount && v.TotalAmount == r.cfg.RainTotal &&
			res.UsersCoins == v.GrantedAmount && aw.Balance == r.m.bal0-v.TotalAmount+v.Refunded &&
			(res.Ambiguous > 0 || (v.GrantedAmount == res.GrantedAmount && v.GrantedCount == res.Replies))
		return ok, fmt.Sprintf("%sover %d processes: rain %s: granted %d packets / %d coins (grabbers told %d / %d, their balances Σ %d) + refunded %d = %d of T %d; anchor %d → %d",
			prefix, len(parts), v.Code, v.GrantedCount, v.GrantedAmount, res.Replies, res.GrantedAmount, res.UsersCoins, v.Refunded, v.GrantedAmount+v.Refunded, v.TotalAmount, r.m.bal0, aw.Balance)
	}
}
