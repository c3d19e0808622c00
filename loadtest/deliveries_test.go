package loadtest

import (
	"context"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
)

func TestOffBits(t *testing.T) {
	var b offBits
	for _, off := range []int64{200, 201, 263, 64, 1, 1000} {
		b.add(off)
	}
	b.add(0) // not an offset
	for _, off := range []int64{1, 64, 200, 201, 263, 1000} {
		if !b.has(off) {
			t.Fatalf("offset %d added but not found", off)
		}
	}
	for _, off := range []int64{0, 2, 63, 65, 199, 202, 262, 264, 999, 1001, 5000} {
		if b.has(off) {
			t.Fatalf("offset %d found but never added", off)
		}
	}
}

func TestParseChat(t *testing.T) {
	ts, k, ok := parseChat([]byte(`{"from":1,"text":"` + chatText(3, 41, 100) + `"}`))
	if !ok || k != (chatKey{3, 41}) || time.Since(time.Unix(0, ts)) > time.Second {
		t.Fatalf("parsed %d %+v %v", ts, k, ok)
	}
	// no padding: the sequence number ends at the closing quote
	if _, k, ok := parseChat([]byte(`{"from":1,"text":"lg 123 0.7"}`)); !ok || k != (chatKey{0, 7}) {
		t.Fatalf("unpadded: %+v %v", k, ok)
	}
	if _, _, ok := parseChat([]byte(`{"from":1,"text":"hello"}`)); ok {
		t.Fatal("a chat without a stamp was read as one")
	}
}

// TestAccountClassifies: of what the publishers had numbered, a viewer is
// expected to get what came after its join, minus what a re-join told it was
// no longer kept; what it expected and did not get is lost.
func TestAccountClassifies(t *testing.T) {
	p := Published{Ep: "e", Offsets: []int64{1, 2, 3, 4, 5, 6, 7, 8}, Sent: 8}
	viewer := func(user, joinOff int64, got []int64, skipped ...[2]int64) *lconn {
		lc := &lconn{user: user, viewer: true}
		lc.acct.join(joinOff, "e")
		for _, off := range got {
			lc.acct.got.add(off)
			lc.off = off
		}
		lc.acct.skipped = skipped
		return lc
	}
	all := viewer(1, 0, []int64{1, 2, 3, 4, 5, 6, 7, 8})
	late := viewer(2, 3, []int64{4, 5, 6, 7, 8})                     // joined after 3: 1..3 not expected
	resynced := viewer(3, 0, []int64{1, 2, 6, 7, 8}, [2]int64{2, 5}) // 3..5 no longer kept
	tail := viewer(4, 0, []int64{1, 2, 3, 4, 5, 6})                  // 7, 8 never came: lost, no gap seen
	hole := viewer(5, 0, []int64{1, 2, 3, 5, 6, 7, 8})               // 4 lost
	overtaken := &lconn{user: 6, viewer: true}
	overtaken.acct.firstOff = 5 // a push overtook the join reply …
	overtaken.acct.join(5, "e") // … which said 5: joined at 4 (5 is expected)
	for _, off := range []int64{5, 6, 7, 8} {
		overtaken.acct.got.add(off)
	}
	if !complete(p, []*lconn{all, late, resynced, overtaken}) || complete(p, []*lconn{all, tail}) {
		t.Fatal("complete is wrong")
	}
	got := account(p, []*lconn{all, late, resynced, tail, hole, overtaken})
	want := acctTotals{expected: 8 + 5 + 5 + 8 + 8 + 4, delivered: 8 + 5 + 5 + 6 + 7 + 4, lost: 3, beforeJoin: 3 + 4, resynced: 3, lostViewers: 2}
	got.samples = nil
	if got.expected != want.expected || got.delivered != want.delivered || got.lost != want.lost ||
		got.beforeJoin != want.beforeJoin || got.resynced != want.resynced || got.lostViewers != want.lostViewers {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	// another epoch than the record's is not accounted as expected
	other := &lconn{viewer: true}
	other.acct.join(0, "f")
	if a := account(p, []*lconn{other}); a.expected != 0 || a.lost != 0 {
		t.Fatalf("another epoch: %+v", a)
	}
}

// TestAccountAgainstNode runs the accounting against a real node: viewers
// that were joined from the start get everything; one that joins while the
// chats flow is not expected to get what came before; one that leaves the
// room half-way (the server stops sending, nothing shows as a gap) has lost
// the rest.
func TestAccountAgainstNode(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := Config{Scenario: Fanout, WS: []string{nodetest.WSURL(n)}, HTTP: []string{nodetest.HTTPURL(n)},
		Conns: 5, Rate: 5, PublishedFile: filepath.Join(t.TempDir(), "published.json")}
	if err := cfg.Normalize(); err != nil {
		t.Fatal(err)
	}
	r := &run{cfg: cfg, http: &http.Client{Timeout: 5 * time.Second}}
	room, err := OpenRoom(ctx, r.http, cfg.HTTP[0], 9)
	if err != nil {
		t.Fatal(err)
	}
	r.room = room
	open := func(i int, viewer bool) *lconn {
		lc, err := r.open(ctx, i, viewer)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lc.c.Close() })
		return lc
	}
	pub, v1, v2, leaver := open(0, false), open(1, true), open(2, true), open(3, true)
	say := func(seq int64) {
		if _, err := pub.c.Chat(ctx, room, chatText(0, seq, 60)); err != nil {
			t.Fatal(err)
		}
		r.sent.Add(1)
		r.noteSent(chatKey{0, seq})
	}
	for seq := int64(1); seq <= 3; seq++ {
		say(seq)
	}
	waitFor(t, func() bool { return got(r, leaver, chatKey{0, 3}) })
	if err := leaver.c.Leave(ctx, room); err != nil {
		t.Fatal(err)
	}
	late := open(4, true) // joins after chat 3
	for seq := int64(4); seq <= 6; seq++ {
		say(seq)
	}
	viewers := []*lconn{v1, v2, leaver, late}
	waitFor(t, func() bool {
		r.loadPublished(false)
		return r.pubRec != nil && complete(*r.pubRec, []*lconn{v1, v2, late})
	})
	if complete(*r.pubRec, viewers) {
		t.Fatal("the viewer that left counts as complete")
	}
	if p, ok := readPublished(cfg.PublishedFile); !ok || len(p.Offsets) != 6 || p.Sent != 6 || p.Unplaced != 0 {
		t.Fatalf("the record for the other processes: %+v %v", p, ok)
	}
	var res Result
	r.account(&res, viewers)
	if res.Published != 6 || res.Expected != 6+6+6+3 || res.Missing != 3 || res.LostViewers != 1 ||
		res.NotExpectedBeforeJoin != 3 || res.NotExpectedResync != 0 || res.NotExpected != 3 {
		t.Fatalf("accounting: published %d expected %d lost %d (%d viewers, %v) not expected %d (before join %d, resync %d)",
			res.Published, res.Expected, res.Missing, res.LostViewers, res.LostSamples, res.NotExpected, res.NotExpectedBeforeJoin, res.NotExpectedResync)
	}
	if r.gaps.Load() != 0 || r.dups.Load() != 0 || r.errs.Load() != 0 {
		t.Fatalf("gaps %d duplicates %d errors %d %v", r.gaps.Load(), r.dups.Load(), r.errs.Load(), r.samples)
	}
	// a process without publishers reads the same record from the file
	other := &run{cfg: cfg}
	other.cfg.NoPublish = true
	other.loadPublished(false)
	if other.pubRec == nil || len(other.pubRec.Offsets) != 6 {
		t.Fatalf("read back: %+v", other.pubRec)
	}
}

// got says whether lc has received the chat k (placed by its publisher).
func got(r *run, lc *lconn, k chatKey) bool {
	r.pubMu.Lock()
	off, ok := r.placed[k]
	r.pubMu.Unlock()
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return ok && lc.acct.got.has(off)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatal("timed out")
}
