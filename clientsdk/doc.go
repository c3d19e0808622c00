// Package clientsdk is the Go client of LiveEdge's WebSocket API
// (shared/PROTOCOL.md §3). It speaks the wire format of gateway/proto and
// defines no frame type of its own.
//
// # What it owns
//
//   - One WebSocket connection at a time to the gateway (github.com/lxzan/gws),
//     opened with the token in an Authorization header (never in the URL)
//     and, unless Config.NoBatch, ?batch=1 so the
//     server may coalesce replies and pushes into "batch" frames.
//   - Several nodes: Config.URLs lists the nodes of a cluster (Config.URL alone
//     is a list of one). Dial tries them in turn from a random one (from
//     Config.URL with Config.PreferURL); after a
//     disconnect the client tries another URL first, chosen at random, so the
//     clients of a node that died or went away spread over the others (not
//     all onto the next one). Reconnect attempts
//     go in rounds over the list: exponential backoff with full jitter before
//     each round, a short random pause in [ReconnectMin/2, ReconnectMin]
//     between the URLs of a round (see Config.ReconnectMin). A reconnect
//     after a connection that lasted less than 30 s starts one round further
//     up for each such connection in a row (a node that closes every new
//     connection is not hit ten times a second). Client.URL and the URL of
//     StateConnected / StateReconnecting tell which node.
//   - Keeping that connection alive: heartbeat pings (Config.HeartbeatInterval,
//     by default half the hello's heartbeat_ms, else heartbeat_s) when nothing
//     was written or nothing was read for half an interval, and a ping at once
//     after a request timed out: a node that answers nothing is left when a
//     ping goes unanswered for RequestTimeout with nothing read meanwhile,
//     however busy the app is (a node that answers late but keeps replying,
//     under backpressure, is kept); that drop is reported as a connection
//     lost, StateDisconnected 1006 "ping timeout" (as the TypeScript SDK).
//     Reconnecting with exponential backoff and full jitter after any disconnect whose close
//     code is reconnectable (proto.Reconnectable: below 4500) or after a
//     network error. A terminal close code (>= 4500), or an HTTP 401 on
//     reconnect with a static Token, stops the client for good (Closed fires);
//     with a Config.TokenFunc, 4501 (token expired) is not terminal: the client
//     reconnects with a new token from TokenFunc.
//   - Token refresh: with a Config.TokenFunc, shortly before the connection's
//     token ends (the hello's expires_in_ms) the client asks TokenFunc for a
//     new one (TokenReason TokenRefresh) and hands it to the node in a refresh
//     request: the connection, its rooms and its requests in flight go on. A
//     failed refresh is tried again at half the time left while at least
//     2 s are left; after that the node closes 4501 and the client
//     reconnects as above.
//   - The set of joined rooms: rooms joined with Join are re-joined after every
//     reconnect, before the client reports StateConnected and before queued
//     requests are sent. A room whose re-join is refused by the server (for
//     example 10004, the room was closed meanwhile) is dropped from the set and
//     reported with StateRoomDropped.
//   - Recovery by offset: room pushes carry the room's position ("off", 1, 2,
//     3, … per room, and the epoch "ep"; Push.Off, Push.Ep), the same on every
//     node. For each joined room the client keeps the last position seen
//     (Client.RoomPosition: the last room push, or the join reply's "off"/"ep"
//     when newer) and re-joins after a reconnect — to the same node or to
//     another one — with "since":{"off","ep"}. When the server still has the
//     pushes after that position it replays them, in order, before any newer
//     one, and the reply says "recovered":true: the app sees nothing but the
//     missed pushes, each once. When it no longer has them ("recovered":false:
//     history too old, or lost and renumbered under a new epoch) the client
//     reports StateRoomResync for the room (with its new position in Off/Ep,
//     and the last one seen before the loss in Since):
//     the app re-syncs the room from the HTTP API; the room stays joined and
//     its pushes after the new position follow. The same is reported when a
//     live connection's room push is not the next one (an offset skipped, or
//     another epoch: pushes the node could not deliver), before that push is
//     delivered, with the position just before it. A room push at or before the
//     room's last position in the same epoch (a replay overlapping what was
//     already delivered) is dropped, whatever its mid (Stats.OffsetDuplicates;
//     acknowledged again if ack:true). Join returns the online count; JoinInfo
//     returns the whole reply, the room's position included.
//   - Request/reply matching: ids are allocated atomically and replies are
//     matched by id. A request in flight when its connection drops fails with
//     ErrDisconnected; it is never resent, because requests need not be
//     idempotent. A request issued while reconnecting waits for the connection,
//     bounded by its context or Config.RequestTimeout. Its context bounds the
//     write of its frame too: given up half-way, the frame is finished in the
//     background (a cut frame would end the connection), so a request that
//     returned with its context's error may still have been executed.
//   - Push handling: every push with "ack":true is acknowledged once OnPush
//     has returned for it (the acks gathered while more events wait go out as
//     one ack frame when the queue is empty, or after the next callback once
//     the oldest has waited 100 ms; those gathered when the client closes go
//     out before its close frame): one still queued when the client
//     closes is never delivered and not acknowledged, so the server hands it
//     on to the user's next connection (as it may one whose OnPush is running
//     when Close is called). Pushes are de-duplicated by mid across reconnects
//     within a bounded window (Config.DedupWindow mids). A duplicate is
//     acknowledged again at once, since the server may have missed the first
//     ack, but is not delivered again — unless its first copy still waits for
//     OnPush: that one's ack covers both.
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
// connection with 4408 (slow consumer) and the client will reconnect (the
// client's own heartbeat does not leave the node meanwhile: an unread ping
// reply is the app's delay, not the node's). Keep the
// callbacks fast, or hand work off to your own goroutines. In particular a
// callback that waits for a reply (Request, Join, ...) while the queue is full
// waits in vain, since the reply sits behind the blocked reader: it ends with
// its timeout.
//
// Callbacks may call any method of the Client, including Close. Close stops
// reconnecting, closes the connection with 1000 and waits until every goroutine
// of the client has returned, except that it does not wait for a callback that
// is running at that moment (so that Close can be called from a callback); no
// callback starts after Close has returned. Called when no callback is
// running, Close returns after the app had StateDisconnected and
// StateClosed; called while one runs (from it, or beside it) it does not
// wait for it, and what is queued behind it is not delivered. It returns within about two
// seconds even when a frame write is stuck (a node that stopped reading): it
// gives the held acks' flush a second and the close frame another, then
// closes the socket without it. Memory is bounded: the event queue,
// the de-duplication window and the pending-request table (one entry per
// request in flight) are the only collections.
package clientsdk
