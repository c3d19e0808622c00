package redistest

import "testing"

// The proxy's faults look at whole commands: commandEnd frames RESP arrays
// (however they are split over reads) and inline lines.
func TestCommandEnd(t *testing.T) {
	set := "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nv\r\nxy\r\n" // a value holding CRLF
	for _, c := range []struct {
		in   string
		want int
	}{
		{"", -1},
		{"*3\r\n$3\r\nSET\r\n", -1},
		{set[:len(set)-1], -1},
		{set, len(set)},
		{set + "*1\r\n$4\r\nPING\r\n", len(set)},
		{"PING\r\n*1\r\n", 6},
		{"PIN", -1},
		{"*x\r\nrest", 4},
		{"*0\r\n", 4},
	} {
		if got := commandEnd([]byte(c.in)); got != c.want {
			t.Errorf("commandEnd(%q) = %d, want %d", c.in, got, c.want)
		}
	}
}
