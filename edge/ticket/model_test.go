package ticket

import "testing"

// ParseSeat accepts exactly the ids Seat.String makes: whatever it accepts
// prints back to the same string, with positive parts.
func FuzzParseSeat(f *testing.F) {
	for _, s := range []string{"1-1-1", "12-3-40", "0-1-1", "01-1-1", "-1-1-1", "1-1", "1-1-1-1", "+1-1-1", "1--1",
		"9999999999999999999-1-1", "1-1-1 ", "１-1-1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		seat, ok := ParseSeat(s)
		if !ok {
			return
		}
		if seat.Cat <= 0 || seat.Row <= 0 || seat.Col <= 0 || seat.String() != s {
			t.Fatalf("ParseSeat(%q) = %+v, prints %q", s, seat, seat.String())
		}
	})
}
