// Package router owns who is where: room membership, the user → session index,
// and delivery of pushes to sessions. Router is the seam; Local is the
// in-process implementation of a single node, Cluster the one of a node of
// many (Local for its own sessions, NATS between nodes, Redis for room offsets,
// history and presence; docs/cluster.md).
//
// Room pushes carry their room's offset and epoch: Local numbers them itself;
// in a cluster a per-room sequencer numbers each batch with one Lua script in
// Redis and every node delivers them in offset order, filling gaps from the
// shared history. JoinAt replays what a re-joining client missed.
//
// Concurrency promises: all methods are safe for concurrent use; pushes to one
// room are delivered in offset order on every node; a push is encoded once and
// the frame is shared by every receiver; no method blocks on a session
// (Session.Send only queues, and a session that cannot keep up closes itself).
// Cluster's JoinAt, Online and UserInRoom may wait for one Redis round trip;
// PublishRoom never does (PublishRoomWait does, for a chat's "sent").
//
// Lock order: Cluster.mu → croom.mu → room.fanMu → shard.mu → room.mu.
package router
