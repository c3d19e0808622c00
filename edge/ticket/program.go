package ticket

import (
	"slices"
	"unicode/utf8"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Programs: created by an admin, kept in memory (definitions here, seats
// in the Inventory), stored at rec/tprog/<id>.

func (s *Service) addProgram(d ProgramDef) {
	p := &program{def: d, prices: map[int]int64{}, held: map[int64]int{}}
	for _, c := range d.Categories {
		p.prices[c.ID] = c.Price
	}
	s.progMu.Lock()
	s.programs[d.ID] = p
	s.lastProg = max(s.lastProg, d.ID)
	s.progMu.Unlock()
}

func (s *Service) program(id int64) *program {
	s.progMu.RLock()
	defer s.progMu.RUnlock()
	return s.programs[id]
}

// CreateProgram validates d (bounded sizes), stores it durably and serves
// it; it returns the new program id.
func (s *Service) CreateProgram(d ProgramDef) (int64, error) {
	if err := s.validProgram(&d); err != nil {
		return 0, err
	}
	s.createMu.Lock()
	defer s.createMu.Unlock()
	s.progMu.RLock()
	n, last := len(s.programs), s.lastProg
	s.progMu.RUnlock()
	if n >= s.cfg.MaxPrograms {
		return 0, proto.BadRequest("at most %d programs", s.cfg.MaxPrograms)
	}
	d.ID = last + 1
	if s.cfg.NextProgramID != nil {
		id, err := s.cfg.NextProgramID(last)
		if err != nil {
			return 0, err
		}
		d.ID = id
	}
	v, _ := proto.Marshal(d)
	if err := s.store.Put(programKey(d.ID), v); err != nil {
		return 0, err
	}
	if err := s.inv.Add(d); err != nil {
		return 0, err
	}
	s.addProgram(d)
	return d.ID, nil
}

func (s *Service) validProgram(d *ProgramDef) error {
	if d.Name == "" || utf8.RuneCountInString(d.Name) > maxNameLen {
		return proto.BadRequest("name must be 1..%d characters", maxNameLen)
	}
	if len(d.Categories) == 0 || len(d.Categories) > MaxCategories {
		return proto.BadRequest("1..%d categories", MaxCategories)
	}
	if d.PerOrderMax < 1 || d.PerOrderMax > MaxPerOrder {
		return proto.BadRequest("per_order_max must be 1..%d", MaxPerOrder)
	}
	if d.PerUserMax < d.PerOrderMax || d.PerUserMax > MaxPerUser {
		return proto.BadRequest("per_user_max must be per_order_max..%d", MaxPerUser)
	}
	seen := map[int]bool{}
	total := 0
	for _, c := range d.Categories {
		switch {
		case c.ID < 1 || c.ID > 999 || seen[c.ID]:
			return proto.BadRequest("category_id must be 1..999 and unique")
		case c.Name == "" || utf8.RuneCountInString(c.Name) > maxNameLen:
			return proto.BadRequest("category name must be 1..%d characters", maxNameLen)
		case c.Price < 0 || c.Price > maxPrice:
			return proto.BadRequest("price must be 0..%d", maxPrice)
		case c.Rows < 1 || c.Rows > MaxRows || c.Cols < 1 || c.Cols > MaxCols:
			return proto.BadRequest("rows must be 1..%d and cols 1..%d", MaxRows, MaxCols)
		}
		seen[c.ID] = true
		total += c.Rows * c.Cols
	}
	if total > s.cfg.MaxSeats {
		return proto.BadRequest("at most %d seats per program", s.cfg.MaxSeats)
	}
	slices.SortFunc(d.Categories, func(a, b CategoryDef) int { return a.ID - b.ID })
	return nil
}

// ProgramJSON is Program encoded, shared by every read until the program's
// seats change (never write to it).
func (s *Service) ProgramJSON(id int64) ([]byte, error) {
	b, ok := s.inv.ViewJSON(id)
	if !ok {
		return nil, proto.Errorf(proto.CodeNotFound, "program not found")
	}
	return b, nil
}

// Program is GET /programs/{id}, served from memory.
func (s *Service) Program(id int64) (View, error) {
	v, ok := s.inv.View(id)
	if !ok {
		return View{}, proto.Errorf(proto.CodeNotFound, "program not found")
	}
	return v, nil
}
