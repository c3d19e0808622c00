package account_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/account"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
)

// Local: a freeze is durable (read back after reopening the store), an
// unfreeze too; a bad status is 10001.
func TestLocalDurable(t *testing.T) {
	dir := t.TempDir()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l, err := account.NewLocal(st)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.SetStatus(7, 3); proto.AsError(err).Code != proto.CodeBadRequest {
		t.Fatalf("bad status: %v", err)
	}
	for _, u := range []int64{7, 8} {
		if err := l.SetStatus(u, account.StatusFrozen); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.SetStatus(8, account.StatusNormal); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err = account.NewLocal(st)
	if err != nil {
		t.Fatal(err)
	}
	for u, want := range map[int64]bool{7: true, 8: false, 9: false} {
		if f, err := l.Frozen(u); err != nil || f != want {
			t.Fatalf("user %d frozen %v (%v), want %v", u, f, err, want)
		}
	}
}

// Shared: a freeze through one node's client is seen by another node's
// (whose client-side cache already held the old status), and so is the
// unfreeze.
func TestSharedSeenByOtherNode(t *testing.T) {
	srv := redistest.Start(t)
	client := func() rueidis.Client {
		c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	a, b := &account.Shared{Client: client()}, &account.Shared{Client: client()}
	if err := a.SetStatus(5, account.StatusFrozen); err == nil || proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("a change while the shared wallet is not ready: %v, want 50000 (retry)", err)
	}
	walletReady(t, a.Client)
	if f, err := b.Frozen(5); err != nil || f {
		t.Fatalf("initially frozen %v %v", f, err)
	}
	wait := func(want bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			f, err := b.Frozen(5)
			if err == nil && f == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("other node sees frozen=%v (%v), want %v", f, err, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err := a.SetStatus(5, account.StatusFrozen); err != nil {
		t.Fatal(err)
	}
	wait(true)
	if err := a.SetStatus(5, account.StatusNormal); err != nil {
		t.Fatal(err)
	}
	wait(false)
}

// Shared: each change is also on the disk of the node that made it, as
// at×10+status with the time above the last change's (so the latest is the
// largest, whichever node made it), and Contribute hands every one to a
// rebuild as a "seq" op (keep the largest). A value "2" from before changes
// carried their time reads as frozen.
func TestSharedChangesOnDiskLatestLargest(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	walletReady(t, rdb)
	open := func() *account.Shared {
		st, err := persist.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = st.Close() })
		return &account.Shared{Client: rdb, Store: st}
	}
	a, b := open(), open()
	for _, step := range []struct {
		via    *account.Shared
		user   int64
		status int
	}{{a, 1, account.StatusFrozen}, {b, 1, account.StatusNormal}, {a, 2, account.StatusNormal}, {b, 2, account.StatusFrozen}} {
		if err := step.via.SetStatus(step.user, step.status); err != nil {
			t.Fatal(err)
		}
	}
	ops := map[string]int64{} // key -> the largest contributed value, as contrib.lua's seq keeps it
	for _, s := range []*account.Shared{a, b} {
		if err := s.Contribute(time.Time{}, func(op ...string) error {
			v, err := strconv.ParseInt(op[2], 10, 64)
			if op[0] != "seq" || len(op) != 3 || err != nil {
				t.Fatalf("contributed %q", op)
			}
			ops[op[1]] = max(ops[op[1]], v)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	for user, want := range map[int64]int{1: account.StatusNormal, 2: account.StatusFrozen} {
		v, ok := ops[account.SharedKey(user)]
		if !ok || int(v%10) != want {
			t.Fatalf("user %d: contributed %d (%v), want the latest change, status %d", user, v, ok, want)
		}
		cur, err := rdb.Do(context.Background(), rdb.B().Get().Key(account.SharedKey(user)).Build()).AsInt64()
		if err != nil || cur != v {
			t.Fatalf("user %d: Redis holds %d (%v), the disks' largest %d", user, cur, err, v)
		}
	}
	if err := rdb.Do(context.Background(), rdb.B().Set().Key(account.SharedKey(3)).Value("2").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if f, err := a.Frozen(3); err != nil || !f {
		t.Fatalf("a frozen user of the old format: frozen=%v %v", f, err)
	}
}

// Backfill copies to the node's disk the statuses Redis holds that its disk
// lacks — a freeze made before changes were kept on disk ("2"), or through
// another node — so that a later Redis data loss gets them back from this
// disk too; a newer change on the disk is kept. A node back in local mode
// reads the shared mode's rows by their status (an unfreeze is not a
// freeze).
func TestSharedBackfillAndLocalReadsSharedRows(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	ctx := context.Background()
	walletReady(t, rdb)
	dir := t.TempDir()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := &account.Shared{Client: rdb, Store: st}
	if err := rdb.Do(ctx, rdb.B().Set().Key(account.SharedKey(11)).Value("2").Build()).Error(); err != nil { // an old freeze
		t.Fatal(err)
	}
	if err := s.SetStatus(12, account.StatusFrozen); err != nil {
		t.Fatal(err)
	}
	if err := s.SetStatus(12, account.StatusNormal); err != nil { // on the disk: the unfreeze
		t.Fatal(err)
	}
	if err := rdb.Do(ctx, rdb.B().Set().Key(account.SharedKey(12)).Value("2").Build()).Error(); err != nil { // Redis older than the disk
		t.Fatal(err)
	}
	if n, err := s.Backfill(ctx); err != nil || n != 1 {
		t.Fatalf("backfill: %d %v, want 1 copied (user 11)", n, err)
	}
	got := map[string]string{}
	if err := s.Contribute(time.Time{}, func(op ...string) error { got[op[1]] = op[2]; return nil }); err != nil {
		t.Fatal(err)
	}
	if got[account.SharedKey(11)] != "2" {
		t.Fatalf("contributed %q for the old freeze, want \"2\"", got[account.SharedKey(11)])
	}
	if v, _ := strconv.ParseInt(got[account.SharedKey(12)], 10, 64); v%10 != account.StatusNormal {
		t.Fatalf("contributed %q for user 12, want the disk's newer unfreeze", got[account.SharedKey(12)])
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err := account.NewLocal(st)
	if err != nil {
		t.Fatal(err)
	}
	for user, want := range map[int64]bool{11: true, 12: false} {
		if f, err := l.Frozen(user); err != nil || f != want {
			t.Fatalf("local mode reading user %d: frozen=%v %v, want %v", user, f, err, want)
		}
	}
}

// walletReady marks the shared wallet's generation ready in Redis, as a
// wallet does once built: status changes are refused before.
func walletReady(t *testing.T, rdb rueidis.Client) {
	t.Helper()
	if err := rdb.Do(context.Background(), rdb.B().Hset().Key(persist.SharedMetaKey).FieldValue().FieldValue("state", "ready").Build()).Error(); err != nil {
		t.Fatal(err)
	}
}

// Shared: after Redis lost its data, a frozen user is not read as normal
// while the nodes put the statuses back (the shared state not ready): the
// read answers "retry" (50000) until the freeze is back or the state is
// ready; a user never frozen reads normal again once it is.
func TestSharedFreezeNotForgottenWhileRebuilt(t *testing.T) {
	srv := redistest.Start(t)
	client := func() rueidis.Client {
		c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	a, b := &account.Shared{Client: client(), Store: st}, &account.Shared{Client: client()}
	walletReady(t, a.Client)
	if err := a.SetStatus(5, account.StatusFrozen); err != nil {
		t.Fatal(err)
	}
	for _, u := range []int64{5, 6} { // b's cache holds both
		if _, err := b.Frozen(u); err != nil {
			t.Fatal(err)
		}
	}
	srv.Restart() // empty: no status keys, no shared state
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := b.Frozen(5)
		if err == nil && !f {
			t.Fatal("the frozen user read as normal while Redis had lost the statuses")
		}
		if err != nil {
			if proto.AsError(err).Code != proto.CodeInternal {
				t.Fatalf("while rebuilt: %v, want 50000 (retry)", err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the freeze still answered from the cache 5 s after Redis lost it")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := b.Frozen(6); err == nil || proto.AsError(err).Code != proto.CodeInternal {
		t.Fatalf("a user never frozen, while rebuilt: %v, want 50000 (retry)", err)
	}
	// The rebuild: a's disk gives the freeze back, then the state is ready.
	rdb := srv.Client(t)
	if err := rdb.Do(context.Background(), rdb.B().Hset().Key(persist.SharedMetaKey).FieldValue().FieldValue("state", "rebuilding").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if err := a.Contribute(time.Time{}, func(op ...string) error {
		return rdb.Do(context.Background(), rdb.B().Set().Key(op[1]).Value(op[2]).Build()).Error()
	}); err != nil {
		t.Fatal(err)
	}
	// (b's cached "absent" goes with Redis's invalidation, a moment later.)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		f, err := b.Frozen(5)
		if err == nil && f {
			break
		}
		if err == nil || time.Now().After(deadline) {
			t.Fatalf("the freeze put back, state still rebuilding: frozen=%v %v", f, err)
		}
	}
	walletReady(t, rdb)
	for u, want := range map[int64]bool{5: true, 6: false} {
		deadline := time.Now().Add(5 * time.Second)
		for {
			f, err := b.Frozen(u)
			if err == nil && f == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("user %d once ready: frozen=%v %v, want %v", u, f, err, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// Redis went back to an older state without losing a wallet op (a quiet
// moment: nothing is rebuilt): a freeze made since is gone from it, and the
// user could send and receive again until the next loss. Mend puts back
// every change on the node's disk that Redis holds an older one for (or
// none) — and never lowers a later change made through another node.
func TestSharedMendPutsBackAFreezeRedisLost(t *testing.T) {
	srv := redistest.Start(t)
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	s := &account.Shared{Client: c, Store: st}
	walletReady(t, c)
	ctx := context.Background()
	for _, u := range []int64{9, 10, 11} {
		if err := s.SetStatus(u, account.StatusFrozen); err != nil {
			t.Fatal(err)
		}
	}
	older, err := c.Do(ctx, c.B().Get().Key(account.SharedKey(10)).Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetStatus(10, account.StatusNormal); err != nil {
		t.Fatal(err)
	}
	// The rollback: 9's freeze lost, 10 back at its freeze (its later
	// unfreeze lost), 11 unfrozen later through another node (no disk).
	other := &account.Shared{Client: c}
	if err := other.SetStatus(11, account.StatusNormal); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []rueidis.Completed{
		c.B().Del().Key(account.SharedKey(9)).Build(),
		c.B().Set().Key(account.SharedKey(10)).Value(older).Build(),
	} {
		if err := c.Do(ctx, cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	// Read through the client-side cache: Redis's invalidation of a change
	// arrives on its own, a moment later.
	frozenSoon := func(u int64, want bool, when string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			f, err := s.Frozen(u)
			if err == nil && f == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("user %d frozen %v (%v) %s, want %v", u, f, err, when, want)
			}
		}
	}
	frozenSoon(9, false, "after the rollback")
	n, err := s.Mend(ctx)
	if err != nil || n != 2 {
		t.Fatalf("mend: %d put back, %v; want 2", n, err)
	}
	for u, want := range map[int64]bool{9: true, 10: false, 11: false} {
		frozenSoon(u, want, "after the mend")
	}
	if n, err := s.Mend(ctx); err != nil || n != 0 {
		t.Fatalf("a second mend: %d, %v; want nothing", n, err)
	}
}
