// Package router owns who is where: room membership, the user → session index,
// and delivery of pushes to sessions. Router is the seam; Local is the
// in-process implementation of a single node (a NATS + Redis one for many
// nodes implements the same interface).
//
// Concurrency promises: all methods are safe for concurrent use; pushes to one
// room are delivered in publish order; a push is encoded once and the frame is
// shared by every receiver; no method blocks on a session (Session.Send only
// queues, and a session that cannot keep up closes itself).
package router
