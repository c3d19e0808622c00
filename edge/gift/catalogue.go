// Package gift owns the gift catalogue and sending gifts: validation, the
// exactly-once debit through a persist.Wallet, effect pushes to the room
// (merged into combos by a per-room queue) and the reliable notices to the
// receiver (biz 5556) and, on failure, to the sender (biz 5557).
package gift

import (
	"bytes"
	"errors"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Gift status.
const (
	StatusDisabled = 0
	StatusEnabled  = 1
)

// Gift is one catalogue row.
type Gift struct {
	ID          int64  `json:"gift_id"`
	Name        string `json:"name"`
	Price       int64  `json:"price"`
	Status      int    `json:"status"`
	CoverImgURL string `json:"cover_img_url"`
	SvgaURL     string `json:"svga_url"`
	// V orders a gift's versions (a Redis that lost the catalogue merges
	// the nodes' copies back, the highest winning): an admin's write is
	// its time in ms, above the version it replaced; the seeded defaults
	// are SeedVersion, below any write; rows from before versions read 0.
	V int64 `json:"v,omitempty"`
}

// SeedVersion is the version of the seeded defaults: every admin's write,
// and every row from before versions (0), is newer.
const SeedVersion = -1

// Validate checks an admin-supplied row.
func (g *Gift) Validate() *proto.Error {
	switch {
	case g.ID <= 0:
		return proto.BadRequest("gift_id must be > 0")
	case g.Name == "" || len(g.Name) > 64:
		return proto.BadRequest("name must be 1..64 bytes")
	case g.Price <= 0 || g.Price > 1_000_000:
		return proto.BadRequest("price must be 1..1000000")
	case g.Status != StatusEnabled && g.Status != StatusDisabled:
		return proto.BadRequest("status must be 0 or 1")
	case len(g.CoverImgURL) > 512 || len(g.SvgaURL) > 512:
		return proto.BadRequest("urls must be <= 512 bytes")
	}
	return nil
}

// Seed is the catalogue a new node starts with (SPEC §2).
var Seed = []Gift{
	{ID: 22, Name: "天使少女", Price: 90},
	{ID: 23, Name: "皇冠", Price: 20},
	{ID: 24, Name: "爱心气泡", Price: 1},
	{ID: 25, Name: "保时捷", Price: 500},
	{ID: 27, Name: "飞天火箭", Price: 45},
	{ID: 28, Name: "万圣节", Price: 45},
	{ID: 29, Name: "神灯仙女", Price: 20},
}

func init() {
	for i := range Seed {
		g := &Seed[i]
		g.Status = StatusEnabled
		g.V = SeedVersion
		id := strconv.FormatInt(g.ID, 10)
		g.CoverImgURL = "https://static.liveedge.example/gifts/" + id + ".png"
		g.SvgaURL = "https://static.liveedge.example/gifts/" + id + ".svga"
	}
}

var prefixGiftCat = append(append([]byte{}, persist.PrefixRec...), "giftcat/"...)

// CatalogueStore is where the catalogue lives durably: the node's Pebble in
// single-node mode, Redis in shared mode.
type CatalogueStore interface {
	LoadAll() ([]Gift, error)
	// Get returns gift id as stored now (never a cached copy) and its
	// stored bytes.
	Get(id int64) (g Gift, raw []byte, found bool, err error)
	// Swap stores g if gift g.ID is stored as raw (nil: absent), and
	// reports whether it did: a compare-and-set, so that two admins'
	// writes through two nodes never undo each other.
	Swap(raw []byte, g Gift) (bool, error)
}

// maxUpdateTries bounds Update's compare-and-set rounds against writers on
// other nodes.
const maxUpdateTries = 8

// Catalogue serves the gift list from memory (an immutable snapshot swapped
// atomically); writes go to the store and then replace the snapshot. Reload
// re-reads the store (called when another node announces a change). mu is
// held across the store I/O on purpose: admin writes and reloads are rare,
// and serializing them keeps a later snapshot from being replaced by an
// older one; readers never take it.
type Catalogue struct {
	store CatalogueStore
	snap  atomic.Pointer[map[int64]Gift]
	mu    sync.Mutex // serializes writers and reloads
	// OnChange, if set, is called after a local write (to tell other nodes).
	OnChange func()
}

// NewCatalogue loads the catalogue, seeding an empty store.
func NewCatalogue(store CatalogueStore) (*Catalogue, error) {
	c := &Catalogue{store: store}
	all, err := store.LoadAll()
	if err != nil {
		return nil, err
	}
	if len(all) == 0 {
		for _, g := range Seed {
			// Only where absent: a node seeding concurrently with an
			// admin's first write elsewhere does not undo it.
			if _, err := store.Swap(nil, g); err != nil {
				return nil, err
			}
		}
	}
	return c, c.Reload()
}

// Reload re-reads the store into memory.
func (c *Catalogue) Reload() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	all, err := c.store.LoadAll()
	if err != nil {
		return err
	}
	m := make(map[int64]Gift, len(all))
	for _, g := range all {
		m[g.ID] = g
	}
	c.snap.Store(&m)
	return nil
}

// Get returns gift id.
func (c *Catalogue) Get(id int64) (Gift, bool) {
	g, ok := (*c.snap.Load())[id]
	return g, ok
}

// List returns every gift (enabled ones only unless all), by id.
func (c *Catalogue) List(all bool) []Gift {
	m := *c.snap.Load()
	out := make([]Gift, 0, len(m))
	for _, g := range m {
		if all || g.Status == StatusEnabled {
			out = append(out, g)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Create adds g (10409 if the id exists in the store, whichever node wrote
// it) and returns it as stored (its version).
func (c *Catalogue) Create(g Gift) (Gift, error) {
	if err := g.Validate(); err != nil {
		return Gift{}, err
	}
	g.V = max(1, time.Now().UnixMilli())
	c.mu.Lock()
	done, err := c.store.Swap(nil, g)
	if err == nil && !done {
		err = proto.Errorf(proto.CodeConflict, "gift %d exists", g.ID)
	}
	if err != nil {
		c.mu.Unlock()
		return Gift{}, err
	}
	c.putLocked(g)
	c.mu.Unlock()
	c.changed()
	return g, nil
}

// Update changes gift id by patch, applied to the gift as stored now (not
// this node's snapshot, which may lag another node's write), and stores the
// result only if nobody changed the gift meanwhile (else it reads and
// patches again): 10004 if unknown, patch's error, or 10409 after
// maxUpdateTries lost races. It returns the gift written.
func (c *Catalogue) Update(id int64, patch func(*Gift) error) (Gift, error) {
	c.mu.Lock()
	for range maxUpdateTries {
		g, raw, found, err := c.store.Get(id)
		if err != nil {
			c.mu.Unlock()
			return Gift{}, err
		}
		if !found {
			c.mu.Unlock()
			return Gift{}, proto.ErrNotFound
		}
		was := g.V
		if err := patch(&g); err != nil {
			c.mu.Unlock()
			return Gift{}, err
		}
		g.ID, g.V = id, max(was+1, time.Now().UnixMilli())
		if err := g.Validate(); err != nil {
			c.mu.Unlock()
			return Gift{}, err
		}
		done, err := c.store.Swap(raw, g)
		if err != nil {
			c.mu.Unlock()
			return Gift{}, err
		}
		if done {
			c.putLocked(g)
			c.mu.Unlock()
			c.changed()
			return g, nil
		}
	}
	c.mu.Unlock()
	return Gift{}, proto.Errorf(proto.CodeConflict, "gift %d is being changed concurrently, retry", id)
}

// putLocked puts g into the snapshot (c.mu held).
func (c *Catalogue) putLocked(g Gift) {
	old := *c.snap.Load()
	m := make(map[int64]Gift, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	m[g.ID] = g
	c.snap.Store(&m)
}

func (c *Catalogue) changed() {
	if c.OnChange != nil {
		c.OnChange()
	}
}

// PebbleCatalogue stores the catalogue in the node's Pebble.
type PebbleCatalogue struct{ Store *persist.Store }

// LoadAll implements CatalogueStore.
func (p PebbleCatalogue) LoadAll() ([]Gift, error) {
	var out []Gift
	err := p.Store.Scan(prefixGiftCat, func(_, v []byte) error {
		var g Gift
		if err := proto.Unmarshal(v, &g); err != nil {
			return err
		}
		out = append(out, g)
		return nil
	})
	return out, err
}

// Get implements CatalogueStore.
func (p PebbleCatalogue) Get(id int64) (Gift, []byte, bool, error) {
	v, err := p.Store.Get(persist.Key(prefixGiftCat, uint64(id)))
	return storedGift(v, errors.Is(err, persist.ErrNotFound), err)
}

// storedGift is a store's Get answer from its read of raw (absent: no such
// gift; err: the read's other error).
func storedGift(raw []byte, absent bool, err error) (Gift, []byte, bool, error) {
	if absent {
		return Gift{}, nil, false, nil
	}
	if err != nil {
		return Gift{}, nil, false, err
	}
	var g Gift
	if err := proto.Unmarshal(raw, &g); err != nil {
		return Gift{}, nil, false, err
	}
	return g, raw, true, nil
}

// Swap implements CatalogueStore. The node's own store: its writers are
// serialized by Catalogue.mu, so a read and a write are a compare-and-set.
func (p PebbleCatalogue) Swap(raw []byte, g Gift) (bool, error) {
	_, cur, found, err := p.Get(g.ID)
	if err != nil || found != (raw != nil) || !bytes.Equal(cur, raw) {
		return false, err
	}
	v, err := proto.Marshal(g)
	if err != nil {
		return false, err
	}
	return true, p.Store.Put(persist.Key(prefixGiftCat, uint64(g.ID)), v)
}
