package ticket

import (
	"bytes"
	"strconv"
	"strings"
	"testing"

	"github.com/liveedge/liveedge/persist"
)

// ParseSeat accepts exactly the ids Seat.String makes: whatever it accepts
// prints back to the same string, with positive parts.
func FuzzParseSeat(f *testing.F) {
	for _, s := range []string{"1-1-1", "12-3-40", "0-1-1", "01-1-1", "-1-1-1", "1-1", "1-1-1-1", "+1-1-1", "1--1",
		"9999999999999999999-1-1", "1-1-1 ", "１-1-1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		seat, ok := ParseSeat(s)
		if rs, rok := parseSeatSplit(s); rok != ok || rs != seat {
			t.Fatalf("ParseSeat(%q) = %+v %v, the split-based parser says %+v %v", s, seat, ok, rs, rok)
		}
		if !ok {
			return
		}
		if seat.Cat <= 0 || seat.Row <= 0 || seat.Col <= 0 || seat.String() != s {
			t.Fatalf("ParseSeat(%q) = %+v, prints %q", s, seat, seat.String())
		}
	})
}

// parseSeatSplit is ParseSeat as it was (strings.Split and strconv.Atoi),
// the reference of the allocation-free one.
func parseSeatSplit(id string) (Seat, bool) {
	if len(id) > 24 {
		return Seat{}, false
	}
	parts := strings.Split(id, "-")
	if len(parts) != 3 {
		return Seat{}, false
	}
	var v [3]int
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n <= 0 || p[0] == '+' || p[0] == '0' {
			return Seat{}, false
		}
		v[i] = n
	}
	return Seat{v[0], v[1], v[2]}, true
}

// orderReqKey is built in one allocation but must stay the key stored
// before (persist.Key of the user, then the req_id): idempotency records
// written by an older node are found.
func TestOrderReqKeyUnchanged(t *testing.T) {
	for _, r := range []struct {
		user int64
		req  string
	}{{1, "a"}, {1 << 40, "req-123"}, {7, ""}} {
		want := append(persist.Key(prefixOrderReq, uint64(r.user)), r.req...)
		if got := orderReqKey(r.user, r.req); !bytes.Equal(got, want) {
			t.Fatalf("orderReqKey(%d, %q) = %x, want %x", r.user, r.req, got, want)
		}
	}
}
