package room

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/router"
)

// On a single node the record of a room closed more than ClosedRecordTTL
// ago is deleted (PruneClosed): GET then answers 10004, as a cluster's
// Redis does; open rooms and rooms closed lately keep theirs, the next
// open never reuses a pruned id, and a restart reads only what is left.
// Before, every room ever opened kept its record for good.
func TestClosedRoomRecordsPruned(t *testing.T) {
	dir := t.TempDir()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	clock := func() time.Time { return now }
	s, err := New(st, router.NewLocal("a", router.LocalConfig{}), Config{Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	old, err := s.Open(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(1, old.ID); err != nil {
		t.Fatal(err)
	}
	now = now.Add(ClosedRecordTTL - time.Hour)
	recent, err := s.Open(2, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(2, recent.ID); err != nil {
		t.Fatal(err)
	}
	open, err := s.Open(3, 0)
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Hour) // old closed more than ClosedRecordTTL ago, recent not
	k, err := s.PruneClosed(now.Add(-ClosedRecordTTL))
	if err != nil || k != 1 {
		t.Fatalf("pruned %d (%v), want 1", k, err)
	}
	if _, err := s.Get(old.ID, 0); err == nil {
		t.Fatalf("room %d closed %v ago still readable", old.ID, ClosedRecordTTL+time.Hour)
	}
	for _, id := range []int64{recent.ID, open.ID} {
		if _, err := s.Get(id, 0); err != nil {
			t.Fatalf("room %d: %v, want its record", id, err)
		}
	}
	if !s.KnownClosed(old.ID) {
		t.Fatal("a pruned room is no longer known closed")
	}
	if k, err := s.PruneClosed(now.Add(-ClosedRecordTTL)); err != nil || k != 0 {
		t.Fatalf("a second pass pruned %d (%v), want 0", k, err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err = persist.Open(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	s, err = New(st, router.NewLocal("a", router.LocalConfig{}), Config{Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	if !s.IsOpen(open.ID) {
		t.Fatalf("room %d not open after the restart", open.ID)
	}
	next, err := s.Open(4, 0)
	if err != nil || next.ID <= open.ID {
		t.Fatalf("the next room after a restart: %+v %v, want an id above %d", next, err, open.ID)
	}
}
