package gateway

// ConnUsers is the number of users holding a connection slot (the per-user
// count map's size), for tests that check the map stays bounded.
func (s *Server) ConnUsers() int { return s.users.size() }

// WriterTook reports whether user has a connection whose writer holds a
// batch (or a direct write's rest) with nothing queued behind it: blocked on
// a client that stopped reading.
func (s *Server) WriterTook(user int64) bool {
	for _, c := range s.snapshot() {
		if c.ident.UserID != user {
			continue
		}
		c.mu.Lock()
		took := c.writing && len(c.queue) == 0 && c.closeCode == 0
		c.mu.Unlock()
		if took {
			return true
		}
	}
	return false
}
