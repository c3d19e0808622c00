package router

import (
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
// Either way the push arrives at least once; the SDKs drop a second copy by
// mid (a holder too slow to answer gets it twice).

const (
	// handoffWait is how long a hand-off waits for a holder's answer.
	handoffWait = 2 * time.Second
	// maxHandoffs bounds the hand-offs waiting for an answer; past it a push
	// is kept in the offline list and hinted at once.
	maxHandoffs = 65536
)

type handoffs struct {
	mu      sync.Mutex
	prefix  string // reply subjects: prefix + token
	sub     *nats.Subscription
	next    uint64
	pending map[uint64]handoff
}

type handoff struct {
	user int64
	msg  Msg
	at   time.Time
}

// startHandoffs subscribes to this node's reply subjects.
func (c *Cluster) startHandoffs() error {
	h := &c.handoffs
	h.prefix = c.nc.NewRespInbox() + "."
	h.pending = map[uint64]handoff{}
	sub, err := c.nc.Subscribe(h.prefix+"*", c.handoffAnswered)
	if err != nil {
		return err
	}
	h.sub = sub
	return nil
}

// handOff sends m to the user's sessions on the other nodes, answered.
func (c *Cluster) handOff(user int64, m Msg) {
	h := &c.handoffs
	h.mu.Lock()
	if len(h.pending) >= maxHandoffs {
		h.mu.Unlock()
		c.stats.handoffsKept.Add(1)
		c.keepForHolder(user, m)
		return
	}
	h.next++
	tok := h.next
	h.pending[tok] = handoff{user: user, msg: m, at: time.Now()}
	h.mu.Unlock()
	if err := c.nc.PublishRequest(userSubject(user), h.prefix+strconv.FormatUint(tok, 10), appendUserPush(nil, m)); err != nil {
		c.log.Warn("user push not handed off", "user", user, "err", err)
		if ho, ok := c.takeHandoff(tok); ok {
			c.stats.handoffsKept.Add(1)
			c.keepForHolder(ho.user, ho.msg)
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
		c.stats.handoffsKept.Add(1)
		c.keepForHolder(ho.user, ho.msg)
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

// sweepHandoffs keeps the hand-offs nobody answered in time.
func (c *Cluster) sweepHandoffs() {
	h := &c.handoffs
	cut := time.Now().Add(-handoffWait)
	var late []handoff
	h.mu.Lock()
	for tok, ho := range h.pending {
		if ho.at.Before(cut) {
			late = append(late, ho)
			delete(h.pending, tok)
		}
	}
	h.mu.Unlock()
	for _, ho := range late {
		c.stats.handoffsKept.Add(1)
		c.keepForHolder(ho.user, ho.msg)
	}
}

// keepForHolder keeps m in the user's offline list (this node's box if Redis
// does not take it) and hints the holders to drain the list.
func (c *Cluster) keepForHolder(user int64, m Msg) {
	if !c.storeOffline(user, m) {
		c.local.keepHere(user, []Msg{m})
		return
	}
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
// while this node was away).
func (c *Cluster) drainAfterReconnect() {
	if err := c.nc.FlushTimeout(c.cfg.CallTimeout); err != nil {
		c.log.Warn("offline lists not drained after the reconnect", "err", err)
		return
	}
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
	for _, u := range users {
		work <- u
	}
	close(work)
	wg.Wait()
}
