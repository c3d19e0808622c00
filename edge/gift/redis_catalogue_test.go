package gift

import (
	"context"
	"testing"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
)

// A Redis that lost the shared catalogue (restarted without persistence)
// gets it back from a node's mirror at the next reload, the admins' changes
// included — before, the catalogue reloaded empty (every gift 20002) until a
// node restarted and seeded the defaults, losing the changes. A node whose
// disk has no mirror yet (just started on the shared store) reads what the
// others put back.
func TestSharedCatalogueComesBackFromTheMirror(t *testing.T) {
	rs := redistest.Start(t)
	open := func() *persist.Store {
		st, err := persist.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = st.Close() })
		return st
	}
	cat, err := NewCatalogue(RedisCatalogue{Client: rs.Client(t), Mirror: open()})
	if err != nil {
		t.Fatal(err)
	}
	g, ok := cat.Get(24)
	if !ok {
		t.Fatal("seeded catalogue has no gift 24")
	}
	g.Price, g.Status = 777, StatusDisabled
	if err := cat.Update(g); err != nil {
		t.Fatal(err)
	}
	custom := Gift{ID: 9001, Name: "comet", Price: 4242, Status: StatusEnabled}
	if err := cat.Create(custom); err != nil {
		t.Fatal(err)
	}
	rdb := rs.Client(t)
	if err := rdb.Do(context.Background(), rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if err := cat.Reload(); err != nil {
		t.Fatal(err)
	}
	if got, ok := cat.Get(24); !ok || got.Price != 777 || got.Status != StatusDisabled {
		t.Fatalf("gift 24 after Redis lost the catalogue: %+v %v, want the admin's change", got, ok)
	}
	if got, ok := cat.Get(9001); !ok || got.Price != 4242 {
		t.Fatalf("gift 9001 after Redis lost the catalogue: %+v %v", got, ok)
	}
	other, err := NewCatalogue(RedisCatalogue{Client: rs.Client(t), Mirror: open()})
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := other.Get(9001); !ok || got.Price != 4242 {
		t.Fatalf("another node reading the catalogue put back: %+v %v", got, ok)
	}
}
