// Package edge is the room business that runs at the edge, in memory, beside
// the connections: living rooms (edge/room), rate limits (edge/limit), and in
// later issues gifts, red packets and orders. Each sub-package owns its state
// behind one lock or one goroutine and states its invariants on the type.
package edge
