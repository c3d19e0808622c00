package proto

import (
	"strings"
	"testing"
)

// decodeAll runs the whole client-frame path the gateway runs: envelope, then
// the typed d of every known type, then validation.
func decodeAll(b []byte) *Error {
	f, err := DecodeClientFrame(b)
	if err != nil {
		return err
	}
	var v interface{ Validate() *Error }
	switch f.T {
	case TypeJoin, TypeLeave:
		v = &RoomReq{}
	case TypeChat:
		v = &ChatReq{}
	case TypeAck:
		v = &AckReq{}
	case TypeGrab:
		v = &GrabReq{}
	case TypeRefresh:
		v = &RefreshReq{}
	case TypePing:
		return nil
	default:
		return BadRequest("unknown type")
	}
	if err := f.DecodeData(v); err != nil {
		return err
	}
	return v.Validate()
}

func TestDecodeClientFrame(t *testing.T) {
	cases := []struct {
		in   string
		code int
	}{
		{`{"t":"ping","id":1,"d":{}}`, 0},
		{`{"t":"join","id":2,"d":{"room_id":7}}`, 0},
		{`{"t":"chat","id":3,"d":{"room_id":7,"text":"hi"}}`, 0},
		{`{"t":"ack","d":{"mids":["a"]}}`, 0},
		{`{"t":"join","id":2,"d":{}}`, CodeBadRequest},              // missing field
		{`{"t":"join","id":2}`, CodeBadRequest},                     // missing d
		{`{"t":"join","id":2,"d":{"room_id":"x"}}`, CodeBadRequest}, // wrong type
		{`{"t":"chat","id":3,"d":{"room_id":7,"text":""}}`, CodeBadRequest},
		{`{"t":"chat","id":3,"d":{"room_id":7,"text":"` + strings.Repeat("字", 501) + `"}}`, CodeBadRequest},
		{`{"t":"refresh","id":5,"d":{"token":"a.b.c"}}`, 0},
		{`{"t":"refresh","id":5,"d":{"token":""}}`, CodeBadRequest},
		{`{"t":"refresh","id":5,"d":{"token":"` + strings.Repeat("a", MaxTokenLen+1) + `"}}`, CodeBadRequest},
		{`{"t":"refresh","id":5,"d":{"token":7}}`, CodeBadRequest},
		{`{"t":"nope","id":4,"d":{}}`, CodeBadRequest},
		{`{"id":4}`, CodeBadRequest},
		{`not json`, CodeBadRequest},
		{`[1,2]`, CodeBadRequest},
		{``, CodeBadRequest},
		{`{"t":"ping","id":-1}`, CodeBadRequest},
		{`{"t":"ping","id":1.5}`, CodeBadRequest},
		{`{"t":"ack","d":{"mids":[]}}`, CodeBadRequest},
		{`{"t":"chat","d":{"room_id":1,"text":"` + strings.Repeat("a", MaxFrameBytes) + `"}}`, CodeBadRequest},
	}
	for _, c := range cases {
		err := decodeAll([]byte(c.in))
		got := 0
		if err != nil {
			got = err.Code
		}
		if got != c.code {
			t.Errorf("%.60q: code %d, want %d (%v)", c.in, got, c.code, err)
		}
	}
}

func TestDecodeKeepsIDOnBadData(t *testing.T) {
	f, err := DecodeClientFrame([]byte(`{"t":"join","id":77,"d":{"room_id":"x"}}`))
	if err != nil || f.ID != 77 {
		t.Fatalf("envelope: %v id %d", err, f.ID)
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	p := Push{Mid: "gw-1.x.1", Biz: BizChat, Room: 9, Data: []byte(`{"from":1,"text":"a\"b"}`), Ack: true}
	b := AppendPush(nil, &p)
	f, err := DecodeServerFrame(b)
	if err != nil || f.T != TypePush || f.Mid != p.Mid || f.Biz != BizChat || f.Room != 9 || !f.Ack {
		t.Fatalf("push round trip: %+v %v (%s)", f, err, b)
	}
	batch := AppendBatch(nil, [][]byte{b, EncodeReply(3, 0, "ok", map[string]int{"x": 1})})
	f, err = DecodeServerFrame(batch)
	if err != nil || f.T != TypeBatch || len(f.Frames) != 2 || f.Frames[1].T != TypeReply || f.Frames[1].ID != 3 {
		t.Fatalf("batch round trip: %+v %v", f, err)
	}
	r, err := DecodeServerFrame(EncodeErrorReply(5, BadRequest("bad \"x\"")))
	if err != nil || r.Code != CodeBadRequest || r.Msg != `bad "x"` || r.ID != 5 {
		t.Fatalf("error reply: %+v %v", r, err)
	}
}

// Frames that are not JSON are malformed (they count as abuse); a
// well-formed frame with a mistyped field is a validation error that names
// the field.
func TestMalformedVersusInvalid(t *testing.T) {
	// Not an object, with leading whitespace too (it escaped the abuse
	// limit: answered "frame: must be an object", not counted).
	for _, in := range []string{`{not json`, `garbage`, `{"t":"ping","id":1,"d":{}`, "", ` 1`, ` []`, "\n\"x\"", "   "} {
		if _, err := DecodeClientFrame([]byte(in)); err == nil || !IsMalformed(err) {
			t.Errorf("%q: %v, want a malformed-frame error", in, err)
		}
	}
	if _, err := DecodeClientFrame(make([]byte, MaxFrameBytes+1)); !IsMalformed(err) {
		t.Errorf("oversized: %v", err)
	}
	f, err := DecodeClientFrame([]byte(`{"t":"ping","id":"x","d":{}}`))
	if err == nil || IsMalformed(err) || err.Msg != "id: must be an integer" {
		t.Errorf("mistyped id: %v", err)
	}
	f, err = DecodeClientFrame([]byte(`{"t":"join","id":3,"d":{"room_id":"x"}}`))
	if err != nil {
		t.Fatal(err)
	}
	var r RoomReq
	if e := f.DecodeData(&r); e == nil || IsMalformed(e) || e.Msg != "room_id: must be an integer" {
		t.Errorf("mistyped room_id: %v", e)
	}
}

// Chat text that others see has no control characters (a NUL, an escape
// sequence, C1): 10001; tabs, newlines and any other text pass.
func TestChatTextWithoutControlCharacters(t *testing.T) {
	for _, text := range []string{"a\u0000b", "\u001b[2J", "x\u007f", "\u0085"} {
		r := ChatReq{RoomID: 7, Text: text}
		if e := r.Validate(); e == nil || e.Code != CodeBadRequest {
			t.Errorf("%q: %v, want 10001", text, e)
		}
	}
	for _, text := range []string{"hi", "line 1\nline 2\tend", "crlf\r\n", "你好 👋", "مرحبا", "e\u0301", "👩‍👩‍👧"} {
		r := ChatReq{RoomID: 7, Text: text}
		if e := r.Validate(); e != nil {
			t.Errorf("%q: %v", text, e)
		}
	}
}
