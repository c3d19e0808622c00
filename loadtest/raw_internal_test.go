package loadtest

import (
	"testing"
	"time"
)

// A late sweep keeps each connection's phase: connections due at different
// points of the interval stay apart (no burst of pings every interval after
// the process was starved for a while).
func TestNextPingKeepsPhase(t *testing.T) {
	iv := int64(15 * time.Second)
	late := int64(0) + 4*int64(time.Second) // the sweep ran 4 s late
	a, b := nextPing(0, late, iv), nextPing(int64(3*time.Second), late, iv)
	if a != iv || b != iv+int64(3*time.Second) {
		t.Fatalf("next pings %v, %v: phases not kept", time.Duration(a), time.Duration(b))
	}
	// a whole interval behind: somewhere in the next interval
	now := int64(40 * time.Second)
	for range 100 {
		n := nextPing(0, now, iv)
		if n <= now || n > now+iv {
			t.Fatalf("next ping %v after a sweep at %v", time.Duration(n), time.Duration(now))
		}
	}
}

// scanFrame reads the gateway's frames as laid out by proto, and leaves
// anything else to the JSON decoder.
func TestScanFrame(t *testing.T) {
	for _, tc := range []struct {
		in string
		ok bool
		f  rawFrame
	}{
		{`{"t":"reply","id":2,"code":0,"msg":"ok","d":{"ts":1}}`, true, rawFrame{T: "reply", ID: 2}},
		{`{"t":"reply","id":1,"code":10004,"msg":"room not found","d":{}}`, true, rawFrame{T: "reply", ID: 1, Code: 10004}},
		{`{"t":"push","mid":"m-1","biz":5570,"room":0,"d":{"balance":3},"ack":true}`, true, rawFrame{T: "push", Mid: "m-1", Ack: true}},
		{`{"t":"push","mid":"m-2","biz":5555,"room":7,"off":3,"ep":"e","d":{"text":"x"},"ack":false}`, true, rawFrame{T: "push", Mid: "m-2"}},
		{`{"t":"batch","d":[]}`, false, rawFrame{}},
		{`{"id":2,"t":"reply","code":0}`, false, rawFrame{}},
	} {
		f, ok := scanFrame([]byte(tc.in))
		if ok != tc.ok || (ok && (f.T != tc.f.T || f.ID != tc.f.ID || f.Code != tc.f.Code || f.Mid != tc.f.Mid || f.Ack != tc.f.Ack)) {
			t.Errorf("%s: %+v %v", tc.in, f, ok)
		}
	}
	f, ok := scanFrame([]byte(`{"t":"hello","d":{"user_id":4,"node":"gw-1","heartbeat_s":30,"heartbeat_ms":30000,"session_id":"9"}}`))
	if !ok || f.T != "hello" || f.D.HeartbeatS != 30 || f.D.HeartbeatMS != 30000 {
		t.Fatalf("hello: %+v %v", f, ok)
	}
}
