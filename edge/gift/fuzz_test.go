package gift

import (
	"strings"
	"testing"

	"github.com/liveedge/liveedge/gateway/proto"
)

// FuzzGiftFrame drives a gift frame through what the gateway runs on it:
// the envelope, the typed d, the shape check. Never a panic; a refusal is
// a 10001 whose message names no Go type or decoder offset; an accepted
// request is within the bounds Validate promises.
func FuzzGiftFrame(f *testing.F) {
	for _, s := range []string{
		`{"t":"gift","id":1,"d":{"room_id":7,"gift_id":24,"receiver_id":2,"count":1,"req_id":"r"}}`,
		`{"t":"gift","id":2,"d":{"room_id":7,"gift_id":24,"receiver_id":2,"count":1e3,"req_id":"r"}}`,
		`{"t":"gift","id":3,"d":{"room_id":"7","gift_id":-1,"receiver_id":2,"count":100,"req_id":""}}`,
		`{"t":"gift","id":4,"d":{"room_id":7,"gift_id":24,"receiver_id":2,"count":99,"req_id":"r","pk":"yes"}}`,
		`{"t":"gift","id":5,"d":null}`,
		`{"t":"gift","id":6,"d":{"room_id":9223372036854775808}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := proto.DecodeClientFrame(b)
		if err != nil {
			return
		}
		var r Req
		if err = fr.DecodeData(&r); err == nil {
			err = r.Validate()
		}
		if err != nil {
			if err.Code != proto.CodeBadRequest {
				t.Fatalf("%q: code %d, want 10001", b, err.Code)
			}
			for _, leak := range []string{"gift.Req", "int64", "sonic", "offset", "json:"} {
				if strings.Contains(err.Msg, leak) {
					t.Fatalf("%q: message %q shows the decoder's %q", b, err.Msg, leak)
				}
			}
			return
		}
		if r.RoomID <= 0 || r.GiftID <= 0 || r.ReceiverID <= 0 || r.Count < 1 || r.Count > MaxCount || r.ReqID == "" || len(r.ReqID) > MaxReqIDLen {
			t.Fatalf("%q: accepted out of bounds: %+v", b, r)
		}
	})
}
