package pay

import (
	"log/slog"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist"
)

// The confirmed req_id bindings on disk: listed within the window (and an
// hour's slack) of a rebuild's start, pruned a day after it.
func TestReqBindingsOnDiskWindowAndPrune(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.UnixMilli(100 * 3_600_000)
	s := &Service{store: st, cfg: Config{Now: func() time.Time { return now }, Log: slog.Default()}}
	for i, age := range []time.Duration{time.Minute, 25 * time.Hour, 26*time.Hour + time.Minute, 48*time.Hour + time.Minute, 50 * time.Hour} {
		s.markBound(Order{OrderID: strconv.Itoa(i + 1), UserID: 7, ReqID: "r" + strconv.Itoa(i+1), CreatedAt: now.Add(-age).UnixMilli()})
	}
	list := func() []string {
		var got []string
		err := ReqBindingsOnDisk(st, now, func(user int64, req string, id, at int64) error {
			if user != 7 || req != "r"+strconv.FormatInt(id, 10) {
				t.Fatalf("binding %d: user %d req %q", id, user, req)
			}
			got = append(got, req)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := list(); !slices.Equal(got, []string{"r2", "r1"}) { // oldest first
		t.Fatalf("bindings listed %v, want [r2 r1]", got)
	}
	s.pruneBound()
	var left []string
	_ = st.Scan(prefixReqBound, func(k, v []byte) error { left = append(left, string(v)); return nil })
	if len(left) != 4 || slices.ContainsFunc(left, func(v string) bool { return v == `{"user":7,"req_id":"r5"}` }) {
		t.Fatalf("records left after the prune: %v, want the four younger than 49 h", left)
	}
}
