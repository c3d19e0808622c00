package clientsdk

import (
	"errors"
	"fmt"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Errors returned by the Client. Reply errors are *proto.Error.
var (
	// ErrDisconnected: the connection dropped while the request was in flight
	// (it may or may not have been executed by the server; it is not resent).
	ErrDisconnected = errors.New("clientsdk: disconnected")
	// ErrClosed: the client was closed, by Close or by a terminal close code.
	ErrClosed = errors.New("clientsdk: client closed")
	// ErrUnauthorized: the server refused the WebSocket upgrade with HTTP 401
	// (no or bad token).
	ErrUnauthorized = errors.New("clientsdk: unauthorized (HTTP 401)")
)

// GiftError is a failed Client.Gift: Err, and the req_id the gift was sent
// with — retry with it (see Client.Gift).
type GiftError struct {
	ReqID string
	Err   error
}

func (e *GiftError) Error() string { return fmt.Sprintf("%v (gift req_id %s)", e.Err, e.ReqID) }

func (e *GiftError) Unwrap() error { return e.Err }

// CloseError is the close frame the server sent: its code (gateway/proto
// close.go) and reason.
type CloseError struct {
	Code   int
	Reason string
}

func (e *CloseError) Error() string {
	return fmt.Sprintf("clientsdk: closed by server: %d %s", e.Code, e.Reason)
}

// Push is one server push, as delivered to Config.OnPush. Data is the raw JSON
// of the push's d, copied: it is safe to keep.
type Push struct {
	Mid  string
	Biz  int
	Room int64
	Off  int64  // a room push's offset in its room (0 for pushes to the user)
	Ep   string // the room's epoch (with Off)
	Ack  bool
	Data []byte
}

// State is the kind of a StateEvent.
type State int

// States reported to Config.OnState.
const (
	// StateConnected: connected, hello received, rooms re-joined; requests flow.
	StateConnected State = iota + 1
	// StateDisconnected: the connection dropped (Code, Reason, Err).
	StateDisconnected
	// StateReconnecting: about to wait Delay, then make attempt Attempt; Err is
	// why the previous attempt failed (nil before the first).
	StateReconnecting
	// StateRoomDropped: re-joining Room after a reconnect failed with Err
	// (a *proto.Error, typically 10004); the room left the joined set.
	StateRoomDropped
	// StateClosed: the client stopped for good. Err is nil after Close, else
	// the terminal cause (a *CloseError with a code >= 4500, or ErrUnauthorized).
	StateClosed
	// StateRoomResync: Room was re-joined after a reconnect with since (the
	// last position seen in it), but the server no longer keeps the pushes
	// missed meanwhile (reply "recovered":false): some pushes of Room are lost
	// and the app should re-sync the room from the HTTP API. Off and Ep are
	// the room's position at the re-join; the pushes after it follow. The room
	// stays joined. A re-join that recovered everything reports nothing: the
	// missed pushes are simply delivered, in order, before newer ones. Also
	// reported on a live connection when a room push is not the next one
	// (an offset skipped, or another epoch), before it is delivered; Off and
	// Ep are then the position just before it.
	StateRoomResync
)

func (s State) String() string {
	switch s {
	case StateConnected:
		return "connected"
	case StateDisconnected:
		return "disconnected"
	case StateReconnecting:
		return "reconnecting"
	case StateRoomDropped:
		return "room_dropped"
	case StateClosed:
		return "closed"
	case StateRoomResync:
		return "room_resync"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// StateEvent is one connection state change. Fields not meaningful for State
// are zero.
type StateEvent struct {
	State State
	// Hello is the server's hello (StateConnected).
	Hello proto.Hello
	// Code and Reason are the WebSocket close code and reason (StateDisconnected,
	// StateClosed). 1006 means the connection broke without a close frame.
	Code   int
	Reason string
	// Err is the cause (see the State constants).
	Err error
	// Attempt and Delay describe a reconnect attempt (StateReconnecting);
	// Attempt is also set on StateConnected after a reconnect (0 for Dial).
	Attempt int
	Delay   time.Duration
	// Room is the dropped room (StateRoomDropped) or the room to re-sync
	// (StateRoomResync).
	Room int64
	// URL is the node URL, without its query, of the attempt about to be made
	// (StateReconnecting) or of the new connection (StateConnected).
	URL string
	// Off and Ep are the position to re-read the room's state as of
	// (StateRoomResync): its re-join's, or just before the push that came
	// after the gap on a live connection (the pushes delivered next follow
	// it). Since is the last position seen before the missed pushes (the TS
	// SDK's since; its at is Off/Ep).
	Off   int64
	Ep    string
	Since *proto.Position
}

// JoinResult is the reply to a join (JoinInfo).
type JoinResult struct {
	RoomID int64
	Online int    // members in the whole cluster
	Off    int64  // the room's newest offset at the join (pushes after it follow)
	Ep     string // the room's epoch ("" when the server does not number the room's pushes)
}

// Stats are cumulative counters of a Client.
type Stats struct {
	Reconnects      int64 // successful reconnects (the first connect is not one)
	PushesReceived  int64 // push frames received, duplicates included
	PushesDelivered int64 // pushes queued for OnPush
	Duplicates      int64 // pushes dropped as already seen by mid (acked again if ack:true)
	// OffsetDuplicates counts room pushes dropped because their offset was
	// not after the last one seen in the room in the same epoch (a replay
	// overlapping what was delivered; acked again if ack:true).
	OffsetDuplicates int64
	// NotJoined counts room pushes dropped because their room is not joined
	// here: one the node fanned out before the leave took effect, arriving
	// after Leave (acked if ack:true).
	NotJoined int64
	AcksSent  int64 // mids acknowledged
	Requests  int64 // request frames written (not those whose request gave up while they were being written)
}
