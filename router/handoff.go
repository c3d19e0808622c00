package router

import (
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// Reliable pushes for a user whose sessions are on other nodes are handed
// off, not only published: each travels as a NATS request on the user's
// subject and a holder answers once its sessions took it (or it kept it for
// them). A publish nobody is subscribed to is dropped by NATS: after a NATS
// restart, a node that reconnected first publishes before the holder has
// subscribed again. So a hand-off nobody answers — NATS says "no
// responders", or no answer within handoffWait — is kept in the user's
// shared offline list and a drain hint (an empty message) is published on
// the user's subject: a holder subscribed by then drains the list on the
// hint; one that subscribes later drains it after its reconnect
// (Reconnected: subscriptions first, a flush, then every local user's list).
// The sender drains the list itself when a session of the user registered
// there since the push found none: it drained the list before the push was
// kept, and the hint never reaches it (its own publish, NoEcho).
// The hint is published again every second for hintFor (a NATS cluster: the
// holder's interest may reach the sender's server later, and a holder that
// never lost its connection does not drain on its own). A holder that took
// nothing (the user left it, online elsewhere) does not answer. Either way
// the push arrives at least once; the SDKs drop a second copy by mid (a
// holder too slow to answer gets it twice). Keeping (a Redis call) runs on
// one keeper goroutine, never on the NATS callback or the sweep.
//
// During a rolling upgrade, a node without hand-offs never answers: its
// users' reliable pushes are also kept in their lists (a second copy at
// their next connect), and it counts the hints as bad wire messages.

const (
	// handoffWait is how long a hand-off waits for a holder's answer.
	handoffWait = 2 * time.Second
	// maxHandoffs bounds the hand-offs waiting for an answer, and those
	// waiting to be kept; past it a push is kept in the offline list at once.
	maxHandoffs = 65536
	// hintFor is how long a kept push's user is hinted again.
	hintFor = 10 * time.Second
	// keepOnClose bounds how long Close spends keeping unanswered hand-offs.
	keepOnClose = 5 * time.Second
)

type handoffs struct {
	mu      sync.Mutex
	prefix  string // reply subjects: prefix + token
	sub     *nats.Subscription
	next    uint64
	pending map[uint64]handoff
	keep    chan handoff // unanswered, to the keeper
	// hints are the users to hint again, each until its time (under mu).
	hints map[int64]time.Time
}

type handoff struct {
	user int64
	msg  Msg
	at   time.Time
	regs uint64 // regsOf(user) before no session here took msg (keepAway)
}

// startHandoffs subscribes to this node's reply subjects.
func (c *Cluster) startHandoffs() error {
	h := &c.handoffs
	h.prefix = c.nc.NewRespInbox() + "."
	h.pending = map[uint64]handoff{}
	h.keep = make(chan handoff, maxHandoffs)
	h.hints = map[int64]time.Time{}
	sub, err := c.nc.Subscribe(h.prefix+"*", c.handoffAnswered)
	if err != nil {
		return err
	}
	h.sub = sub
	return nil
}

// handOff sends m to the user's sessions on the other nodes, answered.
// regs: as keepAway's; owed: m is owed from before (userPushMsg).
func (c *Cluster) handOff(user int64, m Msg, regs uint64, owed bool) {
	h := &c.handoffs
	h.mu.Lock()
	if len(h.pending) >= maxHandoffs {
		h.mu.Unlock()
		c.keepLater(handoff{user: user, msg: m, regs: regs})
		return
	}
	h.next++
	tok := h.next
	h.pending[tok] = handoff{user: user, msg: m, at: time.Now(), regs: regs}
	h.mu.Unlock()
	if err := c.nc.PublishMsg(userPushMsg(user, h.prefix+strconv.FormatUint(tok, 10), m, owed)); err != nil {
		c.log.Warn("user push not handed off", "user", user, "err", err)
		if ho, ok := c.takeHandoff(tok); ok {
			c.keepLater(ho)
		}
	}
}

// handoffAnswered is a holder's answer, or NATS's "no responders".
func (c *Cluster) handoffAnswered(m *nats.Msg) {
	tok, err := strconv.ParseUint(strings.TrimPrefix(m.Subject, c.handoffs.prefix), 10, 64)
	if err != nil {
		return
	}
	ho, ok := c.takeHandoff(tok)
	if !ok {
		return // answered already (another holder), or given up
	}
	if len(m.Data) == 0 && m.Header.Get("Status") == "503" { // no responders
		c.keepLater(ho)
	}
}

func (c *Cluster) takeHandoff(tok uint64) (handoff, bool) {
	h := &c.handoffs
	h.mu.Lock()
	defer h.mu.Unlock()
	ho, ok := h.pending[tok]
	delete(h.pending, tok)
	return ho, ok
}

// sweepHandoffs hands the hand-offs nobody answered in time to the keeper,
// and hints again the users of pushes kept lately.
func (c *Cluster) sweepHandoffs() {
	h := &c.handoffs
	now := time.Now()
	cut := now.Add(-handoffWait)
	var late []handoff
	var hint []int64
	h.mu.Lock()
	for tok, ho := range h.pending {
		if ho.at.Before(cut) {
			late = append(late, ho)
			delete(h.pending, tok)
		}
	}
	for u, until := range h.hints {
		if now.After(until) {
			delete(h.hints, u)
		} else {
			hint = append(hint, u)
		}
	}
	h.mu.Unlock()
	for _, ho := range late {
		c.keepLater(ho)
	}
	for _, u := range hint {
		c.hint(u)
	}
}

// keepLater hands ho to the keeper (kept here at once if its queue is full).
func (c *Cluster) keepLater(ho handoff) {
	select {
	case c.handoffs.keep <- ho:
	default:
		c.keepForHolder(ho)
	}
}

// keeper keeps the hand-offs nobody answered, one at a time.
func (c *Cluster) keeper() {
	defer c.wg.Done()
	for {
		select {
		case <-c.stop:
			return
		case ho := <-c.handoffs.keep:
			c.keepForHolder(ho)
		}
	}
}

// keepUnanswered keeps, at Close, the hand-offs still waiting for an answer
// or for the keeper (for at most keepOnClose).
func (c *Cluster) keepUnanswered() {
	h := &c.handoffs
	h.mu.Lock()
	left := make([]handoff, 0, len(h.pending))
	for tok, ho := range h.pending {
		left = append(left, ho)
		delete(h.pending, tok)
	}
	h.mu.Unlock()
	deadline := time.Now().Add(keepOnClose)
	for {
		select {
		case ho := <-h.keep:
			left = append(left, ho)
			continue
		default:
		}
		break
	}
	for i, ho := range left {
		if time.Now().After(deadline) {
			c.log.Warn("unanswered user pushes not kept at close", "pushes", len(left)-i)
			return
		}
		c.keepForHolder(ho)
	}
}

// keepForHolder keeps the push in the user's offline list (this node's box
// if Redis does not take it) and hints the holders to drain the list, now
// and for hintFor — drained here too if a session of the user registered
// here since the push found none (see keepAway).
func (c *Cluster) keepForHolder(ho handoff) {
	c.stats.handoffsKept.Add(1)
	user := ho.user
	if !c.storeOffline(user, ho.msg) {
		c.local.keepHere(user, []Msg{ho.msg})
		return
	}
	if ho.regs != noRedrain && c.regsOf(user) != ho.regs && c.local.userSessions(user) > 0 {
		// Read after the push was stored: a session registering later
		// drains the list itself (Register), one before is drained for
		// here — it drained the list before the push was kept, and the
		// hint below never reaches this node (NoEcho). The list is taken
		// whole by one drain: no second copy.
		c.drainOffline(user)
	}
	c.hintKept(user)
}

// hintKept tells the user's holders to drain the user's offline list, a
// push just stored there: now, and for hintFor after (the hints loop) — a
// session registering meanwhile on a node whose subscription this publish
// misses may have drained the list before the push was stored.
func (c *Cluster) hintKept(user int64) {
	h := &c.handoffs
	h.mu.Lock()
	if len(h.hints) < maxHandoffs {
		h.hints[user] = time.Now().Add(hintFor)
	}
	h.mu.Unlock()
	c.hint(user)
}

// hint tells the user's holders to drain the user's offline list.
func (c *Cluster) hint(user int64) {
	if err := c.nc.Publish(userSubject(user), nil); err != nil {
		c.log.Warn("drain hint not published", "user", user, "err", err)
	}
}

// answerHandoff tells a hand-off's sender that this node took its push.
func answerHandoff(m *nats.Msg) {
	if m.Reply != "" {
		_ = m.Respond(nil)
	}
}

// drainAfterReconnect drains every local user's offline list once the
// subscriptions made again after a reconnect are in place (hand-offs kept
// while this node was away), in the background: one task for the node
// (reconnectDrainLoop), which a reconnect while it runs makes go on rather
// than start another — two drains of every user at once find each other's
// pushes leased and leave each user to a retry of its own (redrain).
func (c *Cluster) drainAfterReconnect() {
	c.redrainMu.Lock()
	defer c.redrainMu.Unlock()
	if c.reconnDraining {
		c.reconnAgain = true
		select {
		case c.reconnKick <- struct{}{}:
		default:
		}
		return
	}
	c.fillMu.Lock()
	defer c.fillMu.Unlock()
	if c.stopping {
		return // closing: its sessions go too (wg.Wait is under way)
	}
	c.reconnDraining, c.reconnAgain = true, false
	c.wg.Add(1)
	go c.reconnectDrainLoop()
}

// reconnectDrainLoop flushes the NATS connection (the subscriptions in
// place) and drains every local user's list (drainUsers). A flush that
// fails (NATS away again, or slow) is retried after redrainFirst, then
// twice as long each time up to redrainMax, each wait up to half as long
// again at random — at once on a reconnect; every list is drained after
// the first attempt whatever its flush (what was kept while this node was
// away is in Redis: they were left undrained until each user's next
// connect before), and again once a flush went through (a push kept before
// the subscription was in place, its hint lost). Before, a failed flush
// left each user to a retry of its own (redrain): with 100k users here,
// 100k goroutines and drain scripts within 125 ms against the shared
// Redis, from every node that lost NATS at once.
func (c *Cluster) reconnectDrainLoop() {
	defer c.wg.Done()
	var t *time.Timer
	defer func() {
		if t != nil {
			t.Stop()
		}
	}()
	wait := redrainFirst
	drained := false // since the last reconnect
	for {
		select {
		case <-c.stop:
			return // closing: its sessions go too
		case <-c.reconnKick: // this attempt is the one asked for
		default:
		}
		c.redrainMu.Lock()
		if c.reconnAgain {
			drained = false // what was kept while NATS was away again
		}
		c.reconnAgain = false
		c.redrainMu.Unlock()
		err := c.nc.FlushTimeout(c.cfg.CallTimeout)
		if err != nil {
			c.log.Warn("NATS flush after a reconnect failed; offline lists drained again once it goes through", "err", err)
		}
		if err == nil || !drained {
			c.drainUsers()
			drained = true
		}
		if err == nil {
			// Done — unless NATS reconnected since this attempt began.
			c.redrainMu.Lock()
			again := c.reconnAgain
			if !again {
				c.reconnDraining = false
			}
			c.redrainMu.Unlock()
			if !again {
				return
			}
			wait = redrainFirst
			continue
		}
		next := wait + rand.N(wait/2)
		wait = min(2*wait, redrainMax)
		if t == nil {
			t = time.NewTimer(next)
		} else {
			t.Reset(next)
		}
		select {
		case <-c.stop:
			return // closing: its sessions go too
		case <-c.reconnKick:
			wait = redrainFirst
		case <-t.C:
		}
	}
}

// drainUsers drains every local user's offline list, 8 at a time: not a
// node's worth of drain scripts (100k users) at once against the shared
// Redis. A drain Redis does not answer is retried for its user
// (drainOffline).
func (c *Cluster) drainUsers() {
	users := c.local.userIDs()
	work := make(chan int64)
	var wg sync.WaitGroup
	for range min(8, len(users)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := range work {
				c.drainOffline(u)
			}
		}()
	}
	defer func() {
		close(work)
		wg.Wait()
	}()
	for _, u := range users {
		select {
		case <-c.stop:
			return // closing: its sessions go too
		case work <- u:
		}
	}
}
