package ticket

import (
	"slices"
	"sync"
	"sync/atomic"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Inventory holds the seats of every program and reserves them atomically.
// It is the seam a cluster version plugs in behind (docs/tickets.md): one
// Redis Lua script per category key (the key of a category stays in one
// Redis Cluster slot, so a script sees and changes it atomically), or the
// program's owner node answering for it. The node's Service never touches
// seats any other way.
//
// A seat is owned by the order that locked it; Release and Sell act only on
// seats locked by the order they name, so repeating either changes nothing.
type Inventory interface {
	// Add makes p's seats, all free.
	Add(p ProgramDef) error
	// Reserve locks, for order, either want.Seats or want.Count adjacent
	// free seats of one row of want.Category: all or none (40003).
	Reserve(program, order int64, want Want) ([]Seat, error)
	// Release frees the seats locked by order; it returns how many it freed.
	Release(program, order int64, seats []Seat) int
	// Sell moves the seats locked by order to sold; it returns how many it
	// moved (seats already sold by order are not counted).
	Sell(program, order int64, seats []Seat) int
	// Restore marks seats as locked or sold by order (start-up rebuild).
	Restore(program, order int64, seats []Seat, status uint8) error
	// View is the program's current state.
	View(program int64) (View, bool)
	// ViewJSON is View as JSON, built once per change of the program (a
	// read costs no encoding: a view of 20,000 seats is ~1.3 MB). The
	// bytes are shared: never written to.
	ViewJSON(program int64) ([]byte, bool)
}

// Want is what an order asks Reserve for: Seats, or Count adjacent seats
// in one row of Category.
type Want struct {
	Seats    []Seat
	Category int
	Count    int
}

// View is GET /programs/{id}.
type View struct {
	ProgramID   int64          `json:"program_id"`
	Name        string         `json:"name"`
	PerOrderMax int            `json:"per_order_max"`
	PerUserMax  int            `json:"per_user_max"`
	Categories  []CategoryView `json:"categories"`
	Seats       []SeatView     `json:"seats"`
}

// CategoryView is one category of a View: remaining = free seats; locked
// and sold complete the count (free + locked + sold = rows × cols).
type CategoryView struct {
	ID        int    `json:"category_id"`
	Name      string `json:"name"`
	Price     int64  `json:"price"`
	Rows      int    `json:"rows"`
	Cols      int    `json:"cols"`
	Remaining int    `json:"remaining"`
	Locked    int    `json:"locked"`
	Sold      int    `json:"sold"`
}

// SeatView is one seat of a View.
type SeatView struct {
	SeatID     string `json:"seat_id"`
	CategoryID int    `json:"category_id"`
	Row        int    `json:"row"`
	Col        int    `json:"col"`
	Status     uint8  `json:"status"`
}

// memInventory is the single-node Inventory: seats in memory, one mutex
// per category (sharded by category, no program-wide or global lock). An
// order that spans categories locks them in ascending category id, the one
// lock order, so two such orders never deadlock. No lock is held across
// I/O: Reserve only changes memory; the caller makes the order durable
// after it.
type memInventory struct {
	mu       sync.RWMutex // guards programs (the map, not the seats)
	programs map[int64]*memProgram
}

var _ Inventory = (*memInventory)(nil)

type memProgram struct {
	def  ProgramDef
	cats map[int]*memCategory
	ids  []int // category ids, ascending

	// version counts seat changes of the program; View rebuilds its
	// snapshot only when it moved, one caller at a time (the others wait
	// for that snapshot: no stampede of rebuilds on a hot program).
	version  atomic.Uint64
	viewMu   sync.Mutex
	view     *View
	viewJSON []byte // view encoded, made by the first ViewJSON after a rebuild
	viewVer  uint64
}

// memCategory is one category's seat grid.
//
// Invariants (under mu): free + locked + sold = rows × cols; status[i] is
// SeatFree iff owner[i] == 0; rowFree[r] = number of free seats of row r.
type memCategory struct {
	def     CategoryDef
	version *atomic.Uint64 // the program's

	mu                 sync.Mutex
	status             []uint8 // row-major, (row−1)·cols + col−1
	owner              []int64 // order holding the seat (0 = free)
	rowFree            []int
	free, locked, sold int
}

func newMemInventory() *memInventory { return &memInventory{programs: map[int64]*memProgram{}} }

func (m *memInventory) Add(p ProgramDef) error {
	mp := &memProgram{def: p, cats: map[int]*memCategory{}}
	for _, c := range p.Categories {
		n := c.Rows * c.Cols
		mc := &memCategory{def: c, version: &mp.version, status: make([]uint8, n), owner: make([]int64, n), rowFree: make([]int, c.Rows), free: n}
		for i := range mc.status {
			mc.status[i] = SeatFree
		}
		for r := range mc.rowFree {
			mc.rowFree[r] = c.Cols
		}
		mp.cats[c.ID] = mc
		mp.ids = append(mp.ids, c.ID)
	}
	slices.Sort(mp.ids)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.programs[p.ID] = mp
	return nil
}

func (m *memInventory) program(id int64) *memProgram {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.programs[id]
}

// index is s's index in its category, or −1 when no such seat exists.
func (c *memCategory) index(s Seat) int {
	if s.Row < 1 || s.Row > c.def.Rows || s.Col < 1 || s.Col > c.def.Cols {
		return -1
	}
	return (s.Row-1)*c.def.Cols + s.Col - 1
}

func (c *memCategory) set(i int, st uint8, order int64) {
	old := c.status[i]
	switch old {
	case SeatFree:
		c.free--
		c.rowFree[i/c.def.Cols]--
	case SeatLocked:
		c.locked--
	case SeatSold:
		c.sold--
	}
	switch st {
	case SeatFree:
		c.free++
		c.rowFree[i/c.def.Cols]++
		order = 0
	case SeatLocked:
		c.locked++
	case SeatSold:
		c.sold++
	}
	c.status[i], c.owner[i] = st, order
	c.version.Add(1)
}

// seatGroup is the seats (grid indexes) of one category of an order.
type seatGroup struct {
	cat int
	idx []int
}

// groups splits seats by category, in ascending category id; an unknown
// category or seat is a bad request. No map: an order has at most
// MaxPerOrder seats in at most MaxCategories categories, and most have one.
func (p *memProgram) groups(seats []Seat) ([]seatGroup, error) {
	gs := make([]seatGroup, 0, 1)
	for _, s := range seats {
		c := p.cats[s.Cat]
		if c == nil {
			return nil, proto.BadRequest("no seat %s in this program", s)
		}
		i := c.index(s)
		if i < 0 {
			return nil, proto.BadRequest("no seat %s in this program", s)
		}
		k := 0
		for k < len(gs) && gs[k].cat != s.Cat {
			k++
		}
		if k == len(gs) {
			gs = append(gs, seatGroup{cat: s.Cat, idx: make([]int, 0, len(seats))})
		}
		gs[k].idx = append(gs[k].idx, i)
	}
	slices.SortFunc(gs, func(a, b seatGroup) int { return a.cat - b.cat })
	return gs, nil
}

func (m *memInventory) Reserve(program, order int64, want Want) ([]Seat, error) {
	p := m.program(program)
	if p == nil {
		return nil, proto.Errorf(proto.CodeNotFound, "program not found")
	}
	if len(want.Seats) == 0 {
		return p.reserveAdjacent(order, want.Category, want.Count)
	}
	gs, err := p.groups(want.Seats)
	if err != nil {
		return nil, err
	}
	// Lock order: ascending category id.
	for _, g := range gs {
		p.cats[g.cat].mu.Lock()
	}
	defer func() {
		for _, g := range gs {
			p.cats[g.cat].mu.Unlock()
		}
	}()
	for _, g := range gs {
		c := p.cats[g.cat]
		for _, i := range g.idx {
			if c.status[i] != SeatFree {
				return nil, proto.Errorf(proto.CodeSoldOut, "seat %d-%d-%d is taken", g.cat, i/c.def.Cols+1, i%c.def.Cols+1)
			}
		}
	}
	for _, g := range gs {
		c := p.cats[g.cat]
		for _, i := range g.idx {
			c.set(i, SeatLocked, order)
		}
	}
	return want.Seats, nil
}

func (p *memProgram) reserveAdjacent(order int64, cat, count int) ([]Seat, error) {
	c := p.cats[cat]
	if c == nil {
		return nil, proto.BadRequest("no category %d in this program", cat)
	}
	if count < 1 || count > c.def.Cols {
		return nil, proto.Errorf(proto.CodeSoldOut, "no %d adjacent seats in one row of category %d", count, cat)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for r := 0; r < c.def.Rows; r++ {
		if c.rowFree[r] < count {
			continue
		}
		run := 0
		base := r * c.def.Cols
		for col := 0; col < c.def.Cols; col++ {
			if c.status[base+col] != SeatFree {
				run = 0
				continue
			}
			if run++; run == count {
				seats := make([]Seat, 0, count)
				for k := col - count + 1; k <= col; k++ {
					c.set(base+k, SeatLocked, order)
					seats = append(seats, Seat{cat, r + 1, k + 1})
				}
				return seats, nil
			}
		}
	}
	return nil, proto.Errorf(proto.CodeSoldOut, "no %d adjacent free seats in one row of category %d", count, cat)
}

// move changes the seats held by order from `from` to `to`; it returns how
// many it changed.
func (m *memInventory) move(program, order int64, seats []Seat, from, to uint8) int {
	p := m.program(program)
	if p == nil {
		return 0
	}
	gs, err := p.groups(seats)
	if err != nil {
		return 0
	}
	n := 0
	for _, g := range gs { // one category at a time: nothing else to keep consistent across them
		c := p.cats[g.cat]
		c.mu.Lock()
		for _, i := range g.idx {
			if c.owner[i] == order && c.status[i] == from {
				c.set(i, to, order)
				n++
			}
		}
		c.mu.Unlock()
	}
	return n
}

func (m *memInventory) Release(program, order int64, seats []Seat) int {
	return m.move(program, order, seats, SeatLocked, SeatFree)
}

func (m *memInventory) Sell(program, order int64, seats []Seat) int {
	return m.move(program, order, seats, SeatLocked, SeatSold)
}

func (m *memInventory) Restore(program, order int64, seats []Seat, status uint8) error {
	p := m.program(program)
	if p == nil {
		return proto.Errorf(proto.CodeNotFound, "program %d not found", program)
	}
	gs, err := p.groups(seats)
	if err != nil {
		return err
	}
	for _, g := range gs {
		c := p.cats[g.cat]
		c.mu.Lock()
		for _, i := range g.idx {
			if c.status[i] != SeatFree && c.owner[i] != order {
				c.mu.Unlock()
				return proto.Errorf(proto.CodeInternal, "seat %d-%d-%d restored for order %d is held by order %d", g.cat, i/c.def.Cols+1, i%c.def.Cols+1, order, c.owner[i])
			}
			c.set(i, status, order)
		}
		c.mu.Unlock()
	}
	return nil
}

// View returns the program's snapshot: cached while no seat changed, else
// rebuilt by one caller while concurrent callers wait for it — and take it
// if it was begun after they arrived (it shows every change made before
// their call), so that under a steady stream of orders a crowd of viewers
// costs one rebuild per build time, not one each. The slices of a View are
// shared between callers: read-only.
func (m *memInventory) View(program int64) (View, bool) {
	p := m.program(program)
	if p == nil {
		return View{}, false
	}
	arrived := p.version.Load()
	p.viewMu.Lock()
	defer p.viewMu.Unlock()
	return *p.current(arrived), true
}

// ViewJSON implements Inventory.
func (m *memInventory) ViewJSON(program int64) ([]byte, bool) {
	p := m.program(program)
	if p == nil {
		return nil, false
	}
	arrived := p.version.Load()
	p.viewMu.Lock()
	defer p.viewMu.Unlock()
	v := p.current(arrived)
	if p.viewJSON == nil {
		b, err := proto.Marshal(v)
		if err != nil {
			return nil, false // a View always encodes
		}
		p.viewJSON = b
	}
	return p.viewJSON, true
}

// current is the program's view, rebuilt if seats changed since it was
// built, as of arrived: the version when the caller came — callers that
// waited for a rebuild begun after they came take it (viewMu held).
func (p *memProgram) current(arrived uint64) *View {
	if p.view != nil && p.viewVer >= arrived {
		return p.view
	}
	ver := p.version.Load() // before the build: a change during it makes the next call rebuild
	v := p.build()
	p.view, p.viewJSON, p.viewVer = &v, nil, ver
	return p.view
}

// build copies the program's state, one category lock at a time, held only
// to copy the category's counts and statuses (orders wait for no more).
func (p *memProgram) build() View {
	total := 0
	for _, c := range p.cats {
		total += len(c.status)
	}
	v := View{ProgramID: p.def.ID, Name: p.def.Name, PerOrderMax: p.def.PerOrderMax, PerUserMax: p.def.PerUserMax,
		Seats: make([]SeatView, 0, total)}
	status := make([]uint8, 0, total)
	for _, id := range p.ids {
		c := p.cats[id]
		c.mu.Lock()
		v.Categories = append(v.Categories, CategoryView{ID: id, Name: c.def.Name, Price: c.def.Price,
			Rows: c.def.Rows, Cols: c.def.Cols, Remaining: c.free, Locked: c.locked, Sold: c.sold})
		status = append(status[:0], c.status...)
		c.mu.Unlock()
		for i, st := range status {
			r, col := i/c.def.Cols+1, i%c.def.Cols+1
			v.Seats = append(v.Seats, SeatView{SeatID: Seat{id, r, col}.String(), CategoryID: id, Row: r, Col: col, Status: st})
		}
	}
	return v
}

// price is the price of seat s (0 when unknown).
func (m *memInventory) price(program int64, s Seat) int64 {
	if p := m.program(program); p != nil {
		if c := p.cats[s.Cat]; c != nil {
			return c.def.Price
		}
	}
	return 0
}
