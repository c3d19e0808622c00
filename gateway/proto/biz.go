package proto

// Push biz codes (PROTOCOL.md §3). 5559 and 5562 are LiveEdge extensions.
const (
	BizChat         = 5555 // room chat message {"from":U,"text":"..."}
	BizGift         = 5556 // gift sent
	BizGiftFailed   = 5557 // gift failed (sender only, ack)
	BizPKProgress   = 5558 // PK progress
	BizRoomClosed   = 5559 // extension: the room was closed by its anchor {"room_id":R,"reason":"..."}
	BizRainStarted  = 5560
	BizRainFinished = 5561
	BizPKInvite     = 5562 // extension: a PK invitation to the invited room's anchor (ack) {"pk_id","rooms","inviter","duration_s","expires_at","status":"invited"}
	BizWalletCredit = 5570
	BizOrderStatus  = 5580
)

// ChatPush is the d of biz 5555.
type ChatPush struct {
	From int64  `json:"from"`
	Text string `json:"text"`
}

// RoomClosedPush is the d of biz 5559.
type RoomClosedPush struct {
	RoomID int64  `json:"room_id"`
	Reason string `json:"reason"`
}
