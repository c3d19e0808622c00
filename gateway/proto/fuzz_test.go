package proto

import "testing"

// FuzzDecodeClientFrame feeds arbitrary bytes through the whole client-frame
// decode path. It must never panic, and every failure must be a 10001 reply.
// Seed corpus: testdata/fuzz/FuzzDecodeClientFrame (run by plain go test).
func FuzzDecodeClientFrame(f *testing.F) {
	for _, s := range []string{
		`{"t":"ping","id":1,"d":{}}`,
		`{"t":"join","id":2,"d":{"room_id":7}}`,
		`{"t":"chat","id":3,"d":{"room_id":7,"text":"你好"}}`,
		`{"t":"ack","d":{"mids":["gw-1.a.1","gw-1.a.2"]}}`,
		`{"t":"leave","id":9,"d":{"room_id":1}}`,
		`{"t":"refresh","id":10,"d":{"token":"eyJhbGciOiJIUzI1NiJ9.e30.x"}}`,
		`{"t":"chat","id":3,"d":{"room_id":7,"text":"\ud800"}}`,
		`{"t":"join","id":99999999999999999999,"d":{"room_id":7}}`,
		`{"t":"join","id":1,"d":{"room_id":1e3}}`,
		` {"t":"ping"}`,
		`{"t":"ping","t":"chat"}`,
		"{\"t\":\"chat\",\"d\":{\"room_id\":1,\"text\":\"\xff\xfe\"}}",
		`{"t":`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		err := decodeAll(b)
		if err != nil && err.Code != CodeBadRequest {
			t.Fatalf("code %d for %q", err.Code, b)
		}
		// The reply the gateway would send must itself be valid JSON.
		if err != nil {
			if _, derr := DecodeServerFrame(EncodeErrorReply(0, err)); derr != nil {
				t.Fatalf("error reply is not JSON: %v", derr)
			}
		}
	})
}
