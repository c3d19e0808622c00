package loadtest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"time"
)

// Delivery accounting. A viewer is expected to receive exactly the chats the
// room numbered after the position it joined at (a join without since starts
// at the reply's "off"; PROTOCOL §3), except those a re-join told it were no
// longer kept ("recovered":false: the client re-syncs from the HTTP API).
// Everything else the publishers had numbered is "not expected" for that
// viewer: published before it joined, or skipped by a resync. A chat that is
// expected and has not reached the viewer by the end of the drain is lost.
//
// Which chats the room numbered, and at which offsets, the publishers learn
// from their own pushes: every publisher is a member of the room, and a
// chat's text names its publisher and sequence number ("lg <ns> <pub>.<seq>").
// With -procs the first process has the publishers; it writes the offsets to
// a file (Config.PublishedFile) that the other processes wait for.

// offBits is a growable set of room offsets (one bit each).
type offBits struct {
	base int64 // offset of bit 0 of words[0]; a multiple of 64
	w    []uint64
}

func (b *offBits) add(off int64) {
	if off <= 0 {
		return
	}
	if b.w == nil {
		b.base = off &^ 63
	}
	if off < b.base {
		nb := off &^ 63
		words := int((b.base - nb) / 64)
		b.w = append(make([]uint64, words, words+len(b.w)), b.w...)
		b.base = nb
	}
	i := int((off - b.base) / 64)
	for i >= len(b.w) {
		b.w = append(b.w, 0)
	}
	b.w[i] |= 1 << uint((off-b.base)%64)
}

func (b *offBits) has(off int64) bool {
	if off < b.base || b.w == nil {
		return false
	}
	i := int((off - b.base) / 64)
	return i < len(b.w) && b.w[i]&(1<<uint((off-b.base)%64)) != 0
}

// viewerAcct is one viewer's part of the accounting (under its lconn's mu).
type viewerAcct struct {
	joined   bool
	joinOff  int64 // the position the viewer joined at: chats after it are expected
	joinEp   string
	firstOff int64      // the first room push seen (it may precede the join reply)
	got      offBits    // chat offsets received (each once)
	skipped  [][2]int64 // (from, to]: offsets a re-join said were no longer kept
	closedAt time.Time
}

func (a *viewerAcct) join(off int64, ep string) {
	a.joined, a.joinOff, a.joinEp = true, off, ep
	if a.firstOff > 0 && a.firstOff-1 < a.joinOff {
		a.joinOff = a.firstOff - 1 // a push that overtook the reply is counted too
	}
}

// expects says whether the viewer should receive the chat at off (in the
// epoch ep of the published record), and why not when it should not.
func (a *viewerAcct) expects(ep string, off int64) (ok bool, beforeJoin bool) {
	if !a.joined || a.joinEp != ep || off <= a.joinOff {
		return false, true
	}
	for _, s := range a.skipped {
		if off > s[0] && off <= s[1] {
			return false, false
		}
	}
	return true, false
}

// Published is the record of what the publishers had numbered: the room's
// epoch and the offsets of their chats (sorted). Sent counts chats answered
// OK; Unplaced those answered OK that never came back to a publisher as a
// push, so their offset is unknown (an error of the run).
type Published struct {
	Ep       string  `json:"ep"`
	Offsets  []int64 `json:"offsets"`
	Sent     int64   `json:"sent"`
	Unplaced int64   `json:"unplaced"`
	Epochs   int     `json:"epochs"` // epochs the publishers saw (> 1: only the first is accounted)
}

// chatKey names one chat: publisher index and sequence number.
type chatKey struct {
	pub int
	seq int64
}

// parseChat reads "lg <unix ns> <pub>.<seq> " out of a chat push's d.
func parseChat(d []byte) (ts int64, k chatKey, ok bool) {
	const key = `"text":"lg `
	i := bytes.Index(d, []byte(key))
	if i < 0 {
		return 0, k, false
	}
	rest := d[i+len(key):]
	f := bytes.SplitN(rest, []byte(" "), 3)
	if len(f) < 2 {
		return 0, k, false
	}
	ts, err := strconv.ParseInt(string(f[0]), 10, 64)
	if err != nil {
		return 0, k, false
	}
	p, s, found := bytes.Cut(f[1], []byte("."))
	if !found {
		return ts, k, true // a chat from an older loadgen: timed, not placed
	}
	if j := bytes.IndexFunc(s, func(c rune) bool { return c < '0' || c > '9' }); j >= 0 {
		s = s[:j] // the closing quote of an unpadded text
	}
	pub, err1 := strconv.Atoi(string(p))
	seq, err2 := strconv.ParseInt(string(s), 10, 64)
	if err1 != nil || err2 != nil {
		return ts, k, true
	}
	return ts, chatKey{pub, seq}, true
}

// notePlaced records that the chat k was numbered (ep, off): seen by a publisher.
func (r *run) notePlaced(k chatKey, ep string, off int64) {
	r.pubMu.Lock()
	defer r.pubMu.Unlock()
	if r.placed == nil {
		r.placed = make(map[chatKey]int64)
	}
	if r.pubEp == "" {
		r.pubEp = ep
	}
	if ep != r.pubEp {
		if !slices.Contains(r.otherEps, ep) {
			r.otherEps = append(r.otherEps, ep)
		}
		return
	}
	r.placed[k] = off
}

// noteSent records that the chat k was answered OK.
func (r *run) noteSent(k chatKey) {
	r.pubMu.Lock()
	r.answered = append(r.answered, k)
	r.pubMu.Unlock()
}

// published returns the record so far and how many chats answered OK are not
// placed yet.
func (r *run) published() (Published, int64) {
	r.pubMu.Lock()
	defer r.pubMu.Unlock()
	p := Published{Ep: r.pubEp, Sent: int64(len(r.answered)), Epochs: 1 + len(r.otherEps)}
	for _, k := range r.answered {
		if _, ok := r.placed[k]; !ok {
			p.Unplaced++
		}
	}
	// every chat the room numbered counts, also one whose reply was lost
	for _, off := range r.placed {
		p.Offsets = append(p.Offsets, off)
	}
	slices.Sort(p.Offsets)
	if r.pubEp == "" {
		p.Epochs = 0
	}
	return p, p.Unplaced
}

func writePublished(path string, p Published) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readPublished(path string) (Published, bool) {
	var p Published
	b, err := os.ReadFile(path)
	if err != nil || json.Unmarshal(b, &p) != nil {
		return p, false
	}
	return p, true
}

// acctTotals is the outcome of the accounting over some viewers.
type acctTotals struct {
	expected, delivered, lost, beforeJoin, resynced int64
	lostViewers                                     int64
	samples                                         []string
}

// account compares every viewer's deliveries with the published record.
func account(p Published, viewers []*lconn) acctTotals {
	var t acctTotals
	for _, lc := range viewers {
		lc.mu.Lock()
		var lost, first int64
		for _, off := range p.Offsets {
			ok, before := lc.acct.expects(p.Ep, off)
			switch {
			case ok:
				t.expected++
				if lc.acct.got.has(off) {
					t.delivered++
				} else {
					lost++
					if first == 0 {
						first = off
					}
				}
			case before:
				t.beforeJoin++
			default:
				t.resynced++
			}
		}
		if lost > 0 {
			t.lost += lost
			t.lostViewers++
			if len(t.samples) < 3 {
				t.samples = append(t.samples, fmt.Sprintf("user %d lost %d chats from offset %d (joined at %d, last offset seen %d)",
					lc.user, lost, first, lc.acct.joinOff, lc.off))
			}
		}
		lc.mu.Unlock()
	}
	return t
}

// complete says whether every viewer has every chat it expects in p.
func complete(p Published, viewers []*lconn) bool {
	for _, lc := range viewers {
		lc.mu.Lock()
		for _, off := range p.Offsets {
			if ok, _ := lc.acct.expects(p.Ep, off); ok && !lc.acct.got.has(off) {
				lc.mu.Unlock()
				return false
			}
		}
		lc.mu.Unlock()
	}
	return true
}

// writeTrace writes one JSON line per connection and per chat sent.
func (r *run) writeTrace(conns []*lconn) error {
	f, err := os.Create(r.cfg.Trace)
	if err != nil {
		return err
	}
	defer f.Close()
	enc := json.NewEncoder(f)
	type connLine struct {
		User     int64      `json:"user"`
		Viewer   bool       `json:"viewer"`
		Joined   bool       `json:"joined"`
		JoinOff  int64      `json:"join_off"`
		JoinEp   string     `json:"join_ep"`
		FirstOff int64      `json:"first_off"`
		LastOff  int64      `json:"last_off"`
		Got      [][2]int64 `json:"got"` // ranges [a, b] of chat offsets received
		Skipped  [][2]int64 `json:"skipped,omitempty"`
		ClosedMS int64      `json:"closed_ms"`
		Nodes    []string   `json:"nodes"`
	}
	for _, lc := range conns {
		if lc == nil {
			continue
		}
		lc.mu.Lock()
		l := connLine{User: lc.user, Viewer: lc.viewer, Joined: lc.acct.joined, JoinOff: lc.acct.joinOff, JoinEp: lc.acct.joinEp,
			FirstOff: lc.acct.firstOff, LastOff: lc.off, Skipped: lc.acct.skipped, ClosedMS: lc.acct.closedAt.UnixMilli(), Nodes: lc.nodes}
		b := &lc.acct.got
		for i, w := range b.w {
			for j := range 64 {
				if w&(1<<uint(j)) == 0 {
					continue
				}
				off := b.base + int64(i*64+j)
				if n := len(l.Got); n > 0 && l.Got[n-1][1] == off-1 {
					l.Got[n-1][1] = off
				} else {
					l.Got = append(l.Got, [2]int64{off, off})
				}
			}
		}
		lc.mu.Unlock()
		if err := enc.Encode(l); err != nil {
			return err
		}
	}
	r.pubMu.Lock()
	defer r.pubMu.Unlock()
	for _, cl := range r.pubLog {
		line := struct {
			chatLog
			Off int64 `json:"off"`
		}{cl, r.placed[chatKey{cl.Pub, cl.Seq}]}
		if err := enc.Encode(line); err != nil {
			return err
		}
	}
	return nil
}

// loadPublished sets r.pubRec once what was published is known. The
// publishing process knows it when every chat answered OK has come back to
// its publisher — or, with force, as it stands (the rest counted Unplaced) —
// and writes it to PublishedFile for the other processes, which read it
// from there.
func (r *run) loadPublished(force bool) {
	if !r.cfg.NoPublish {
		p, unplaced := r.published()
		if unplaced > 0 && !force {
			return
		}
		r.pubRec = &p
		if r.cfg.PublishedFile != "" {
			if err := writePublished(r.cfg.PublishedFile, p); err != nil {
				r.fail(fmt.Errorf("write what was published: %w", err))
			}
		}
		return
	}
	if r.cfg.PublishedFile == "" {
		return
	}
	if p, ok := readPublished(r.cfg.PublishedFile); ok {
		r.pubRec = &p
	}
}

// account fills the delivery accounting of res from r.pubRec.
func (r *run) account(res *Result, viewers []*lconn) {
	p := r.pubRec
	if p == nil {
		r.fail(errors.New("what the publishers published is unknown (no record from the publishing process): deliveries not accounted"))
		return
	}
	if !r.cfg.NoPublish { // reported once, by the publishing process
		if p.Unplaced > 0 {
			r.fail(fmt.Errorf("%d chats answered OK never came back to their publisher as a push: their offsets are unknown, not accounted", p.Unplaced))
		}
		if p.Epochs > 1 {
			r.fail(fmt.Errorf("the room's epoch changed while publishing: only the chats of epoch %q are accounted", p.Ep))
		}
	}
	t := account(*p, viewers)
	res.Published = int64(len(p.Offsets))
	res.Expected, res.Missing, res.LostViewers, res.LostSamples = t.expected, t.lost, t.lostViewers, t.samples
	res.NotExpectedBeforeJoin, res.NotExpectedResync = t.beforeJoin, t.resynced
	res.NotExpected = t.beforeJoin + t.resynced
}
