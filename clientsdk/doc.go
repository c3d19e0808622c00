// Package clientsdk is the Go client of LiveEdge's WebSocket API
// (shared/PROTOCOL.md §3). It speaks the wire format of gateway/proto and
// defines no frame type of its own.
//
// # What it owns
//
//   - One WebSocket connection at a time to the gateway (github.com/lxzan/gws),
//     opened with ?token=TOKEN and, unless Config.NoBatch, ?batch=1 so the
//     server may coalesce replies and pushes into "batch" frames.
//   - Keeping that connection alive: heartbeat pings (Config.HeartbeatInterval,
//     by default half the hello's heartbeat_s), and reconnecting with
//     exponential backoff and full jitter after any disconnect whose close
//     code is reconnectable (proto.Reconnectable: below 4500) or after a
//     network error. A terminal close code (>= 4500), or an HTTP 401 on
//     reconnect with a static Token, stops the client for good (Closed fires);
//     with a Config.TokenFunc, 4501 (token expired) is not terminal: the client
//     reconnects with a new token from TokenFunc.
//   - The set of joined rooms: rooms joined with Join are re-joined after every
//     reconnect, before the client reports StateConnected and before queued
//     requests are sent. A room whose re-join is refused by the server (for
//     example 10004, the room was closed meanwhile) is dropped from the set and
//     reported with StateRoomDropped.
//   - Request/reply matching: ids are allocated atomically and replies are
//     matched by id. A request in flight when its connection drops fails with
//     ErrDisconnected; it is never resent, because requests need not be
//     idempotent. A request issued while reconnecting waits for the connection,
//     bounded by its context or Config.RequestTimeout.
//   - Push handling: every push with "ack":true is acknowledged (the acks of
//     one received frame, a batch included, go out as one ack frame), and
//     pushes are de-duplicated by mid across reconnects within a bounded window
//     (Config.DedupWindow mids). A duplicate is acknowledged again, since the
//     server may have missed the first ack, but is not delivered again.
//
// # Concurrency
//
// All methods of *Client are safe for concurrent use.
//
// OnPush and OnState are called from one goroutine, one call at a time, in
// arrival order (a state event is ordered with the pushes around it); OnPush
// is never called twice for one mid within the de-duplication window. Pushes
// reach that goroutine through a bounded queue (Config.EventBuffer). When the
// callbacks are slower than the server and the queue fills up, the connection's
// reader blocks: nothing more is read, acks stop, and the gateway's bounded
// send queue for this connection fills in turn, so the gateway will close the
// connection with 4408 (slow consumer) and the client will reconnect. Keep the
// callbacks fast, or hand work off to your own goroutines. In particular a
// callback that waits for a reply (Request, Join, ...) while the queue is full
// waits in vain, since the reply sits behind the blocked reader: it ends with
// its timeout.
//
// Callbacks may call any method of the Client, including Close. Close stops
// reconnecting, closes the connection with 1000 and waits until every goroutine
// of the client has returned, except that it does not wait for a callback that
// is running at that moment (so that Close can be called from a callback); no
// callback starts after Close has returned. Memory is bounded: the event queue,
// the de-duplication window and the pending-request table (one entry per
// request in flight) are the only collections.
package clientsdk
