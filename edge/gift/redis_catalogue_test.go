package gift

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/liveedge/liveedge/gateway/proto"
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
	open := func() *persist.Store { return mirrorStore(t) }
	cat, err := NewCatalogue(RedisCatalogue{Client: rs.Client(t), Mirror: open()})
	if err != nil {
		t.Fatal(err)
	}
	g, ok := cat.Get(24)
	if !ok {
		t.Fatal("seeded catalogue has no gift 24")
	}
	if _, err := cat.Update(g.ID, func(g *Gift) error { g.Price, g.Status = 777, StatusDisabled; return nil }); err != nil {
		t.Fatal(err)
	}
	custom := Gift{ID: 9001, Name: "comet", Price: 4242, Status: StatusEnabled}
	if _, err := cat.Create(custom); err != nil {
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

// Two admins' writes through two nodes never undo each other: node 2, whose
// copy of the catalogue has not seen node 1's price change yet, disables
// the gift — the price stays node 1's (before, node 2 wrote its stale row
// back whole: the gift charged the old price again). A gift created through
// both nodes at once is created once; the second is 10409.
func TestCatalogueWritesThroughTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	node := func() *Catalogue { return redisCatalogueNode(t, rs) }
	n1, n2 := node(), node() // neither reloads: node 2's copy lags node 1's writes
	if _, err := n1.Update(25, func(g *Gift) error { g.Price = 5000; return nil }); err != nil {
		t.Fatal(err)
	}
	if stale, _ := n2.Get(25); stale.Price != 500 {
		t.Fatalf("node 2's copy: %+v, want the old price (not reloaded)", stale)
	}
	got, err := n2.Update(25, func(g *Gift) error { g.Status = StatusDisabled; return nil })
	if err != nil || got.Price != 5000 || got.Status != StatusDisabled {
		t.Fatalf("node 2's update: %+v %v, want price 5000 disabled", got, err)
	}
	if err := n1.Reload(); err != nil {
		t.Fatal(err)
	}
	if g, _ := n1.Get(25); g.Price != 5000 || g.Status != StatusDisabled {
		t.Fatalf("gift 25 in the store: %+v, want both changes", g)
	}
	if _, err := n1.Create(Gift{ID: 99, Name: "a", Price: 1, Status: StatusEnabled}); err != nil {
		t.Fatal(err)
	}
	_, err = n2.Create(Gift{ID: 99, Name: "b", Price: 2, Status: StatusEnabled})
	if pe, ok := err.(*proto.Error); !ok || pe.Code != proto.CodeConflict {
		t.Fatalf("second create of gift 99 through node 2: %v, want 10409", err)
	}
	if err := n2.Reload(); err != nil {
		t.Fatal(err)
	}
	if g, _ := n2.Get(99); g.Name != "a" {
		t.Fatalf("gift 99: %+v, want node 1's", g)
	}
	if _, err := n2.Update(12345, func(*Gift) error { return nil }); err != proto.ErrNotFound {
		t.Fatalf("update of an unknown gift: %v", err)
	}
}

// Concurrent price changes through two nodes, each a read-modify-write of
// the stored gift (+1): every one that succeeded is in the final price —
// none undone by another — and the ones that lost every round are 10409.
func TestCatalogueConcurrentUpdatesThroughTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	node := func() *Catalogue { return redisCatalogueNode(t, rs) }
	nodes := []*Catalogue{node(), node()}
	const writers = 24
	var ok, conflict atomic.Int64
	var wg sync.WaitGroup
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := nodes[i%2].Update(25, func(g *Gift) error { g.Price++; return nil })
			switch pe, _ := err.(*proto.Error); {
			case err == nil:
				ok.Add(1)
			case pe != nil && pe.Code == proto.CodeConflict:
				conflict.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	g, _, found, err := nodes[0].store.Get(25)
	if err != nil || !found {
		t.Fatal(found, err)
	}
	if g.Price != 500+ok.Load() || ok.Load()+conflict.Load() != writers || ok.Load() == 0 {
		t.Fatalf("price %d after %d successful +1s (%d conflicts), want %d", g.Price, ok.Load(), conflict.Load(), 500+ok.Load())
	}
}

// redisCatalogueNode is one node's catalogue on the shared Redis rs, with a
// Pebble mirror of its own.
func redisCatalogueNode(t *testing.T, rs *redistest.Server) *Catalogue {
	t.Helper()
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	cat, err := NewCatalogue(RedisCatalogue{Client: rs.Client(t), Mirror: st})
	if err != nil {
		t.Fatal(err)
	}
	return cat
}

// A Redis that lost the catalogue, where a write lands before any node
// reloads — a new node (no mirror) seeding the defaults, an admin creating
// a gift — still gets every gift's latest version back from the nodes'
// mirrors at their next load: the admins' gifts and prices, not the seeded
// defaults; and so after a rollback to an older snapshot (the hash not
// empty, a row older than a mirror's). Before, only an empty hash was
// restored: the defaults' prices came back on every node and in every
// mirror, the admins' gifts were gone (20002), and a disabled gift was on
// sale again.
func TestSharedCatalogueMergedBackAfterAWriteIntoTheEmptiedHash(t *testing.T) {
	rs := redistest.Start(t)
	open := func() *persist.Store { return mirrorStore(t) }
	a, err := NewCatalogue(RedisCatalogue{Client: rs.Client(t), Mirror: open()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Update(24, func(g *Gift) error { g.Price = 777; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Update(25, func(g *Gift) error { g.Status = StatusDisabled; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(Gift{ID: 9001, Name: "comet", Price: 4242, Status: StatusEnabled}); err != nil {
		t.Fatal(err)
	}
	if err := a.Reload(); err != nil { // the mirror holds what Redis holds
		t.Fatal(err)
	}
	rdb := rs.Client(t)
	if err := rdb.Do(context.Background(), rdb.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	// Before a reloads: a new node seeds the defaults, an admin creates one.
	c, err := NewCatalogue(RedisCatalogue{Client: rs.Client(t), Mirror: open()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Create(Gift{ID: 9002, Name: "star", Price: 5, Status: StatusEnabled}); err != nil {
		t.Fatal(err)
	}
	check := func(who string, cat *Catalogue) {
		t.Helper()
		if err := cat.Reload(); err != nil {
			t.Fatal(err)
		}
		if g, ok := cat.Get(24); !ok || g.Price != 777 {
			t.Fatalf("%s: gift 24 %+v %v, want the admin's price 777", who, g, ok)
		}
		if g, ok := cat.Get(25); !ok || g.Status != StatusDisabled {
			t.Fatalf("%s: gift 25 %+v %v, want disabled", who, g, ok)
		}
		for id, price := range map[int64]int64{9001: 4242, 9002: 5} {
			if g, ok := cat.Get(id); !ok || g.Price != price {
				t.Fatalf("%s: gift %d %+v %v", who, id, g, ok)
			}
		}
	}
	check("the node with the mirror", a)
	check("the new node", c)
	// A rollback: gift 24's row an older version than the mirrors'.
	old := Seed[0]
	for _, g := range Seed {
		if g.ID == 24 {
			old = g
		}
	}
	raw, _ := proto.Marshal(old)
	if err := rdb.Do(context.Background(), rdb.B().Hset().Key(RedisCatalogueKey).FieldValue().FieldValue("24", string(raw)).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	check("after a rollback, the node with the mirror", a)
	check("after a rollback, the new node", c)
}

// During a rolling upgrade a node from before versions writes rows without
// one: a merge keeps such a row (it may be the latest write) and the mirror
// takes it — before, the newer node's older copy (with a version) was
// written back over it and the admin's latest price reverted.
func TestCatalogueRowWithoutAVersionIsKept(t *testing.T) {
	rs := redistest.Start(t)
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	a, err := NewCatalogue(RedisCatalogue{Client: rs.Client(t), Mirror: st})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Update(24, func(g *Gift) error { g.Price = 100; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	g, _ := a.Get(24)
	old := g
	old.Price, old.V = 200, 0 // an old node's write: no "v"
	raw, _ := proto.Marshal(old)
	rdb := rs.Client(t)
	if err := rdb.Do(context.Background(), rdb.B().Hset().Key(RedisCatalogueKey).FieldValue().FieldValue("24", string(raw)).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := a.Reload(); err != nil {
			t.Fatal(err)
		}
		if g, _ := a.Get(24); g.Price != 200 {
			t.Fatalf("gift 24 price %d after the old node's write, want 200", g.Price)
		}
	}
}

// mirrorStore is a node's Pebble for its catalogue mirror, closed at the end.
func mirrorStore(t *testing.T) *persist.Store {
	t.Helper()
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}
