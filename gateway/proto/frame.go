package proto

import (
	"encoding/json"
	"errors"
	"reflect"
	"strconv"
	"unicode/utf8"

	"github.com/bytedance/sonic"
)

// Frame types (the "t" field).
const (
	TypeHello = "hello"
	TypeReply = "reply"
	TypePush  = "push"
	TypeBatch = "batch" // extension: several server frames in one text frame (opt-in, ?batch=1)

	TypePing  = "ping"
	TypeJoin  = "join"
	TypeLeave = "leave"
	TypeChat  = "chat"
	TypeAck   = "ack"
	TypeGift  = "gift"
	TypeGrab  = "grab"
	// TypeRefresh (extension) hands an open connection a new token before
	// the one it was opened with expires (RefreshReq).
	TypeRefresh = "refresh"
)

// Limits of client frames.
const (
	MaxFrameBytes = 64 << 10 // larger text frames get a 10001 reply
	MaxChatRunes  = 500
	MaxAckMids    = 1024
)

var jsonAPI = sonic.ConfigStd

// Marshal encodes v as JSON (sonic, standard-library compatible output).
func Marshal(v any) ([]byte, error) { return jsonAPI.Marshal(v) }

// Unmarshal decodes JSON into v (sonic).
func Unmarshal(b []byte, v any) error { return jsonAPI.Unmarshal(b, v) }

// ClientFrame is one client → server frame: {"t":TYPE,"id":N,"d":{...}}.
// D aliases the input buffer: use it before the buffer is reused.
type ClientFrame struct {
	T  string                 `json:"t"`
	ID int64                  `json:"id"`
	D  sonic.NoCopyRawMessage `json:"d"`
}

// Errors of frames that are not frames of the protocol at all: binary,
// oversized, not JSON, or without `t` (docs/protocol.md, "Bad input"). Only
// these count towards ws.abuse_limit (IsMalformed); every other 10001 — a
// frame with a `t` and a missing, mistyped or out-of-range field, or of an
// unknown type — is answered and nothing more.
var (
	ErrFrameTooLarge = BadRequest("frame larger than %d bytes", MaxFrameBytes)
	ErrNotJSONObject = BadRequest("frame is not a JSON object")
	ErrBadJSON       = BadRequest("bad JSON")
	ErrBinaryFrame   = BadRequest("binary frames are not supported")
	ErrMissingType   = BadRequest("missing field t")
)

// IsMalformed reports whether e is the error of a frame that is binary,
// oversized, not parsable as JSON or without `t` (as opposed to a
// validation error).
func IsMalformed(e *Error) bool {
	return e == ErrFrameTooLarge || e == ErrNotJSONObject || e == ErrBadJSON || e == ErrBinaryFrame || e == ErrMissingType
}

// DecodeClientFrame parses and validates the envelope of a client frame.
// Every failure is an *Error with CodeBadRequest (IsMalformed tells a frame
// that is not JSON from a field of the wrong type); it never panics (fuzzed).
// When the envelope parsed far enough to carry an id, the id is returned with
// the error so the reply can echo it.
func DecodeClientFrame(b []byte) (ClientFrame, *Error) {
	var f ClientFrame
	if len(b) > MaxFrameBytes {
		return f, ErrFrameTooLarge
	}
	if i := firstNonSpace(b); i == len(b) || b[i] != '{' {
		// Not an object, leading spaces or not ("  1" counts as malformed
		// for the abuse limit as "1" does).
		return f, ErrNotJSONObject
	}
	if err := jsonAPI.Unmarshal(b, &f); err != nil {
		f.D = nil
		if !json.Valid(b) {
			return f, ErrBadJSON
		}
		var shadow ClientFrame
		e := fieldError(b, &shadow, "frame")
		if e == nil {
			return f, ErrBadJSON // sonic refused what encoding/json takes
		}
		f.ID = max(shadow.ID, 0) // decoded past the mistyped field: echo it
		return f, e
	}
	if f.T == "" {
		return f, ErrMissingType
	}
	if f.ID < 0 {
		return f, BadRequest("id must be >= 0")
	}
	return f, nil
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// firstNonSpace is the index of b's first byte that is not JSON whitespace.
func firstNonSpace(b []byte) int {
	i := 0
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// ValidText reports whether s is text a client may send for others to see:
// valid UTF-8 without control characters (C0 but tab, CR and LF; DEL; C1)
// — a NUL or an escape sequence broadcast to a room reaches every viewer's
// display.
func ValidText(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r < 0x20 && r != '\t' && r != '\n' && r != '\r' || r >= 0x7f && r <= 0x9f {
			return false
		}
	}
	return true
}

// DecodeData parses the frame's d into v; an absent d is an error for types
// that need one. A field of the wrong type is named with the type it must
// have ("room_id: must be an integer"); the decoder's own words never reach
// the client.
func (f *ClientFrame) DecodeData(v any) *Error {
	if len(f.D) == 0 || string(f.D) == "null" {
		return BadRequest("missing field d")
	}
	if err := jsonAPI.Unmarshal(f.D, v); err != nil {
		if e := fieldError(f.D, v, "d"); e != nil {
			return e
		}
		return BadRequest("d: must be an object")
	}
	return nil
}

// fieldError names the field of b that does not fit v, found by decoding b
// again with encoding/json (error path only: sonic's errors carry positions,
// not field names). top names b itself when b as a whole has the wrong type.
// It returns nil when that decode does not fail on a type.
func fieldError(b []byte, v any, top string) *Error {
	var te *json.UnmarshalTypeError
	if err := json.Unmarshal(b, v); !errors.As(err, &te) {
		if err != nil && top == "d" {
			return BadRequest("d: must be an object")
		}
		return nil
	}
	field := te.Field
	if field == "" {
		field = top
	}
	if len(field) > 64 {
		field = field[:64]
	}
	return BadRequest("%s: must be %s", field, kindOf(te.Type))
}

// kindOf describes a Go type as the JSON value it decodes from.
func kindOf(t reflect.Type) string {
	if t == nil {
		return "of another type"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return "of another type"
}

// RoomReq is the d of join and leave. Since (join only) is the client's
// position in the room: the pushes after it are replayed if still kept.
type RoomReq struct {
	RoomID int64     `json:"room_id"`
	Since  *Position `json:"since,omitempty"`
}

// Position is a place in a room's push sequence: offset Off (1, 2, 3, … per
// room; 0 = before the first) within epoch Ep (changes when the room's
// history was lost and numbering restarted).
type Position struct {
	Off int64  `json:"off"`
	Ep  string `json:"ep"`
}

// MaxEpochBytes bounds the epoch a client may send back.
const MaxEpochBytes = 64

// Validate checks the fields.
func (r *RoomReq) Validate() *Error {
	if r.RoomID <= 0 {
		return BadRequest("missing or bad field room_id")
	}
	if r.Since != nil {
		if r.Since.Off < 0 {
			return BadRequest("since.off: must be >= 0")
		}
		if len(r.Since.Ep) > MaxEpochBytes {
			return BadRequest("since.ep: longer than %d bytes", MaxEpochBytes)
		}
	}
	return nil
}

// ChatReq is the d of chat. ReqID (extension, optional) makes a retry post
// once: the same (user, req_id) within minutes answers the first mid.
type ChatReq struct {
	RoomID int64  `json:"room_id"`
	Text   string `json:"text"`
	ReqID  string `json:"req_id,omitempty"`
}

// MaxChatReqID is the longest chat req_id, in bytes.
const MaxChatReqID = 64

// Validate checks the fields.
func (r *ChatReq) Validate() *Error {
	if r.RoomID <= 0 {
		return BadRequest("missing or bad field room_id")
	}
	if r.Text == "" {
		return BadRequest("missing field text")
	}
	if !utf8.ValidString(r.Text) {
		return BadRequest("text is not valid UTF-8")
	}
	if !ValidText(r.Text) {
		return BadRequest("text has control characters")
	}
	if utf8.RuneCountInString(r.Text) > MaxChatRunes {
		return BadRequest("text longer than %d characters", MaxChatRunes)
	}
	if len(r.ReqID) > MaxChatReqID {
		return BadRequest("req_id longer than %d bytes", MaxChatReqID)
	}
	return nil
}

// AckReq is the d of ack.
type AckReq struct {
	Mids []string `json:"mids"`
}

// Validate checks the fields.
func (r *AckReq) Validate() *Error {
	if len(r.Mids) == 0 {
		return BadRequest("missing field mids")
	}
	if len(r.Mids) > MaxAckMids {
		return BadRequest("more than %d mids", MaxAckMids)
	}
	return nil
}

// MaxTokenLen bounds a token in a refresh request.
const MaxTokenLen = 4096

// RefreshReq is the d of refresh (extension): a new token for the open
// connection, the same user's.
type RefreshReq struct {
	Token string `json:"token"`
}

// Validate checks the fields.
func (r *RefreshReq) Validate() *Error {
	if r.Token == "" || len(r.Token) > MaxTokenLen {
		return BadRequest("token must be 1..%d bytes", MaxTokenLen)
	}
	return nil
}

// RefreshReply is the d of a refresh's reply: how long the connection's
// token now has left.
type RefreshReply struct {
	ExpiresInMS int64 `json:"expires_in_ms"`
}

// Push is one server push before encoding. Data is the JSON of d.
type Push struct {
	Mid  string
	Biz  int
	Room int64
	Data []byte
	Ack  bool
	// Off and Ep are the room push's position (set by the router; 0 / ""
	// for pushes to a user).
	Off int64
	Ep  string
}

// AppendPush appends the push frame
// {"t":"push","mid":"..","biz":B,"room":R,"off":N,"ep":"E","d":{..},"ack":bool}
// to dst ("off" and "ep" only when Off > 0). Mid and Ep must be JSON-safe
// (the gateway's ids are [0-9a-z._-]).
func AppendPush(dst []byte, p *Push) []byte {
	dst = append(dst, `{"t":"push","mid":"`...)
	dst = append(dst, p.Mid...)
	dst = append(dst, `","biz":`...)
	dst = strconv.AppendInt(dst, int64(p.Biz), 10)
	dst = append(dst, `,"room":`...)
	dst = strconv.AppendInt(dst, p.Room, 10)
	if p.Off > 0 {
		dst = append(dst, `,"off":`...)
		dst = strconv.AppendInt(dst, p.Off, 10)
		dst = append(dst, `,"ep":"`...)
		dst = append(dst, p.Ep...)
		dst = append(dst, '"')
	}
	dst = append(dst, `,"d":`...)
	if len(p.Data) == 0 {
		dst = append(dst, "{}"...)
	} else {
		dst = append(dst, p.Data...)
	}
	dst = append(dst, `,"ack":`...)
	dst = strconv.AppendBool(dst, p.Ack)
	return append(dst, '}')
}

// JSONAppender is a value that encodes itself as JSON, byte for byte as
// Marshal would, without reflection (the per-gift replies and pushes).
type JSONAppender interface {
	AppendJSON(dst []byte) []byte
}

// EncodeReply encodes {"t":"reply","id":N,"code":C,"msg":"..","d":{..}}.
// d may be nil ({}), raw JSON ([]byte), a JSONAppender or any value sonic
// can encode.
func EncodeReply(id int64, code int, msg string, d any) []byte {
	var (
		data []byte
		app  JSONAppender
	)
	switch v := d.(type) {
	case nil:
		data = []byte("{}")
	case []byte:
		data = v
	case JSONAppender:
		app = v
	default:
		b, err := jsonAPI.Marshal(v)
		if err != nil {
			code, msg, b = CodeInternal, "internal error", []byte("{}")
		}
		data = b
	}
	if msg == "" {
		msg = "ok"
	}
	dst := make([]byte, 0, 64+len(msg)+len(data))
	dst = append(dst, `{"t":"reply","id":`...)
	dst = strconv.AppendInt(dst, id, 10)
	dst = append(dst, `,"code":`...)
	dst = strconv.AppendInt(dst, int64(code), 10)
	dst = append(dst, `,"msg":`...)
	dst = AppendString(dst, msg)
	dst = append(dst, `,"d":`...)
	if app != nil {
		dst = app.AppendJSON(dst)
	} else {
		dst = append(dst, data...)
	}
	return append(dst, '}')
}

// EncodeErrorReply encodes a reply carrying e.
func EncodeErrorReply(id int64, e *Error) []byte { return EncodeReply(id, e.Code, e.Msg, nil) }

// AppendString appends s as a JSON string exactly as Marshal encodes it:
// printable ASCII other than " \ < > & is copied as is; anything else takes
// sonic's encoder (escapes, HTML-safe, invalid UTF-8 replaced).
func AppendString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			b, err := jsonAPI.Marshal(s)
			if err != nil {
				return append(dst, `""`...)
			}
			return append(dst, b...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}

// Hello is the d of the hello frame.
type Hello struct {
	UserID      int64  `json:"user_id"`
	Node        string `json:"node"`
	HeartbeatS  int    `json:"heartbeat_s"`
	HeartbeatMS int64  `json:"heartbeat_ms,omitempty"` // extension: exact heartbeat (tests use sub-second ones)
	Batch       bool   `json:"batch,omitempty"`        // extension: server may send "batch" frames
	SessionID   string `json:"session_id,omitempty"`
	// ExpiresInMS (extension) is how long the connection's token has left
	// when the hello is made (just before it is written): at its end the
	// node closes the connection 4501 unless a refresh request has handed
	// it a later token.
	ExpiresInMS int64 `json:"expires_in_ms,omitempty"`
}

// EncodeHello encodes {"t":"hello","d":{...}}.
func EncodeHello(h Hello) []byte {
	b, _ := jsonAPI.Marshal(struct {
		T string `json:"t"`
		D Hello  `json:"d"`
	}{TypeHello, h})
	return b
}

// AppendBatch appends {"t":"batch","d":[f1,f2,...]} built from already encoded
// server frames.
func AppendBatch(dst []byte, frames [][]byte) []byte {
	dst = append(dst, `{"t":"batch","d":[`...)
	for i, f := range frames {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, f...)
	}
	return append(dst, "]}"...)
}

// ServerFrame is the client-side view of any server frame (used by the SDK and
// tests). For a batch, Frames holds the inner frames.
type ServerFrame struct {
	T      string                 `json:"t"`
	ID     int64                  `json:"id,omitempty"`
	Code   int                    `json:"code,omitempty"`
	Msg    string                 `json:"msg,omitempty"`
	Mid    string                 `json:"mid,omitempty"`
	Biz    int                    `json:"biz,omitempty"`
	Room   int64                  `json:"room,omitempty"`
	Off    int64                  `json:"off,omitempty"`
	Ep     string                 `json:"ep,omitempty"`
	Ack    bool                   `json:"ack,omitempty"`
	D      sonic.NoCopyRawMessage `json:"d,omitempty"`
	Frames []ServerFrame          `json:"-"`
}

// DecodeServerFrame parses a server frame, expanding batches into Frames.
// Raw fields alias b.
func DecodeServerFrame(b []byte) (ServerFrame, error) {
	var f ServerFrame
	if err := jsonAPI.Unmarshal(b, &f); err != nil {
		return f, err
	}
	if f.T == TypeBatch {
		var inner []ServerFrame
		if err := jsonAPI.Unmarshal(f.D, &inner); err != nil {
			return f, err
		}
		f.Frames = inner
	}
	return f, nil
}
