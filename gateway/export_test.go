package gateway

// ConnUsers is the number of users holding a connection slot (the per-user
// count map's size), for tests that check the map stays bounded.
func (s *Server) ConnUsers() int { return s.users.size() }
