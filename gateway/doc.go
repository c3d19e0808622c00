// Package gateway is a LiveEdge node's edge to the network: the WebSocket
// server (gws) that holds viewers' connections, the Hertz HTTP API, JWT auth,
// metrics, and Node, which assembles storage, NATS, the router and the
// business services and runs them until Shutdown.
//
// Per connection (Conn): one reader (wsReader parses the client's frames and
// runs the handlers, in frame order, on a goroutine that exists only while
// the client sends: after ws.read_park_after without input the socket waits
// in the process's epoll instance with no goroutine and no buffer; a request
// that may wait on Redis, and those behind it, go to the connection's lane,
// a goroutine that serves them in order while the reader answers pings:
// lane.go) and at most one writer goroutine, started when the send queue becomes non-empty
// and gone when it is drained. gws does the handshake and the writes. The queue is bounded in
// bytes (ws.send_queue_bytes); a connection that overflows it is closed with
// 4408 and nothing it was sent delays anyone else. Pushes owed from before
// the connection (the user's offline box, pushes handed on from their other
// connection) wait behind the queue in a backlog bounded in pushes, and the
// writer moves them in as the queue drains (Conn.SendBacklog); live reliable
// user pushes wait behind them, and while the router still drains what the
// user is owed (Conn.DrainStart) behind everything that drain gives. Reliable pushes (ack:true)
// are resent with doubling backoff until acked or ws.resend_max_tries.
//
// Close codes and reply codes each live in one table, in gateway/proto.
//
// Lock order: Server shard mu → nothing; connLane.mu → nothing; Conn.ackMu → Conn.mu (only where a
// backlog frame moves: sendBacklog, moveBacklog, stopAcks), neither held
// across a socket write; the router's locks are never held while a Conn lock
// is taken (router calls Send outside its own locks).
package gateway
