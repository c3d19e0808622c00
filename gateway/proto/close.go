package proto

// WebSocket close codes the gateway uses. Ranges, as clients should read them:
//
//	1000, 1001       normal / going away (node shutdown): reconnect, with backoff
//	4400..4499       the client did something wrong or fell behind; reconnecting is
//	                 allowed (with backoff) but the cause will repeat if not fixed
//	4500..4599       terminal: do not reconnect with the same credentials
const (
	CloseNormal    = 1000
	CloseGoingAway = 1001 // node shutting down; reconnect elsewhere / later
	CloseTooBig    = 1009 // frame above the hard read cap (ws.max_frame_hard_bytes)
	CloseInternal  = 1011 // the node failed serving a frame (a bug, logged): reconnect, with backoff

	CloseAbuse            = 4400 // repeated bad frames
	CloseHeartbeatTimeout = 4402 // silent for 2 × heartbeat
	CloseSlowConsumer     = 4408 // send queue overflowed: the client could not keep up
	CloseReplaced         = 4409 // (reserved) same session opened elsewhere

	CloseTokenExpired = 4501 // terminal: get a new token first
)

// CloseReason is the short reason text sent with each close code.
func CloseReason(code int) string {
	switch code {
	case CloseNormal:
		return "normal"
	case CloseGoingAway:
		return "going away"
	case CloseTooBig:
		return "frame too big"
	case CloseInternal:
		return "internal error"
	case CloseAbuse:
		return "too many bad frames"
	case CloseHeartbeatTimeout:
		return "heartbeat timeout"
	case CloseSlowConsumer:
		return "slow consumer"
	case CloseReplaced:
		return "replaced"
	case CloseTokenExpired:
		return "token expired"
	}
	return "closed"
}

// Reconnectable reports whether a client should reconnect after this close code.
func Reconnectable(code int) bool { return code < 4500 }
