package gateway_test

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/gateway/proto"
)

// decoderWords are what a decoder's own error text is made of; none may
// reach a client.
var decoderWords = []string{"Mismatch", "mismatch", "index", "sonic", "json:", "unmarshal", "Unmarshal",
	"int64", "Go value", "reflect", "struct"}

func noDecoderWords(t *testing.T, what, msg string) {
	t.Helper()
	for _, w := range decoderWords {
		if strings.Contains(msg, w) {
			t.Errorf("%s: message %q contains decoder internals (%q)", what, msg, w)
		}
	}
}

// A field of the wrong type is answered 10001 with a message that names the
// field and the type it must have, and nothing of the decoder's own words.
func TestWrongFieldTypesNamed(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	room := strconv.FormatInt(nodetest.OpenRoom(t, n, 1, 0), 10)
	r := dial(t, n, 100, nodetest.RawOptions{})
	cases := []struct {
		frame string
		id    int64
		field string
		kind  string
	}{
		{`{"t":"join","id":1,"d":{"room_id":"seven"}}`, 1, "room_id", "integer"},
		{`{"t":"leave","id":2,"d":{"room_id":true}}`, 2, "room_id", "integer"},
		{`{"t":"chat","id":3,"d":{"room_id":` + room + `,"text":5}}`, 3, "text", "string"},
		{`{"t":"gift","id":4,"d":{"room_id":` + room + `,"gift_id":24,"receiver_id":1,"count":"1","req_id":"a"}}`, 4, "count", "integer"},
		{`{"t":"gift","id":5,"d":{"room_id":` + room + `,"gift_id":24,"receiver_id":1,"count":1,"req_id":7}}`, 5, "req_id", "string"},
		{`{"t":"gift","id":6,"d":{"room_id":` + room + `,"gift_id":[24],"receiver_id":1,"count":1,"req_id":"b"}}`, 6, "gift_id", "integer"},
		{`{"t":"gift","id":7,"d":{"room_id":` + room + `,"gift_id":24,"receiver_id":1.5,"count":1,"req_id":"c"}}`, 7, "receiver_id", "integer"},
		{`{"t":"ack","id":8,"d":{"mids":"x"}}`, 8, "mids", "array"},
		{`{"t":"join","id":9,"d":"room"}`, 9, "d", "object"},
		{`{"t":"ping","id":"ten","d":{}}`, 0, "id", "integer"},
		{`{"t":5,"id":11,"d":{}}`, 11, "t", "string"},
	}
	for _, tc := range cases {
		f := request(t, r, tc.id, tc.frame)
		if f.Code != proto.CodeBadRequest {
			t.Fatalf("%s: code %d msg %q, want 10001", tc.frame, f.Code, f.Msg)
		}
		if !strings.HasPrefix(f.Msg, tc.field+":") || !strings.Contains(f.Msg, tc.kind) {
			t.Errorf("%s: message %q, want it to name %s and %s", tc.frame, f.Msg, tc.field, tc.kind)
		}
		noDecoderWords(t, tc.frame, f.Msg)
	}
}

// Ordinary mistakes are not abuse: 50 well-formed but invalid frames get 50
// error replies and the connection lives; frames that are not JSON still
// close it with 4400 once over ws.abuse_limit.
func TestValidationErrorsAreNotAbuse(t *testing.T) {
	cfg := nodetest.Config(t)
	cfg.WS.AbuseLimit = 10
	n := nodetest.Start(t, cfg)
	room := strconv.FormatInt(nodetest.OpenRoom(t, n, 1, 0), 10)
	r := dial(t, n, 100, nodetest.RawOptions{})
	invalid := []string{
		`{"t":"gift","id":%d,"d":{"room_id":` + room + `,"gift_id":24,"receiver_id":1,"count":100,"req_id":"x"}}`, // out of range
		`{"t":"dance","id":%d,"d":{}}`,                                   // unknown type
		`{"t":"join","id":%d,"d":{}}`,                                    // missing field
		`{"t":"join","id":%d}`,                                           // missing d
		`{"t":"chat","id":%d,"d":{"room_id":"` + room + `","text":"x"}}`, // wrong type
	}
	for i := 1; i <= 50; i++ {
		frame := fmt.Sprintf(invalid[i%len(invalid)], i)
		if f := request(t, r, int64(i), frame); f.Code != proto.CodeBadRequest {
			t.Fatalf("invalid frame %d (%s): code %d msg %q, want 10001", i, frame, f.Code, f.Msg)
		}
	}
	if f := request(t, r, 51, `{"t":"ping","id":51,"d":{}}`); f.Code != 0 {
		t.Fatalf("ping after 50 invalid frames: %+v", f)
	}
	select {
	case <-r.Closed():
		t.Fatalf("closed (%d) after validation errors", r.CloseCode())
	default:
	}

	// 11 unparsable frames (limit 10): 10 answered, then 4400.
	for i := 0; i < 11; i++ {
		if err := r.Send(`{not json`); err != nil {
			break
		}
	}
	select {
	case <-r.Closed():
	case <-time.After(5 * time.Second):
		t.Fatal("not closed after 11 unparsable frames")
	}
	if c := r.CloseCode(); c != proto.CloseAbuse {
		t.Fatalf("close code %d, want 4400", c)
	}
}
