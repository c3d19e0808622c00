package account_test

import (
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
