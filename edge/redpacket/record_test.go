package redpacket

import (
	"strconv"
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// ClaimsOnDisk lists every grant whose rain may still run at since (the
// grant's time plus the longest rain, give or take an hour), with its code
// and user, and nothing else on the disk.
func TestClaimsOnDisk(t *testing.T) {
	st, err := persist.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	since := time.UnixMilli(10 * 3_600_000)
	put := func(code string, idx int32, user int64, at time.Time) {
		b, _ := proto.Marshal(grant{User: user, Amount: 1, At: at.UnixMilli()})
		if err := st.Put(grantKey(code, idx), b); err != nil {
			t.Fatal(err)
		}
	}
	put("AAA", 0, 1, since.Add(-time.Minute))
	put("AAA", 1, 2, since.Add(-time.Hour))                    // the rain may have run until since-50min: within the hour
	put("BBB", 7, 3, since.Add(-2*time.Hour))                  // ended an hour and 50 minutes before
	put("CCC", 300, 4, since.Add(-70*time.Minute+time.Second)) // the hour's edge, inside
	if err := st.Put(rainKey("AAA"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	err = ClaimsOnDisk(st, 10*time.Minute, since, func(code string, user int64, until int64) error {
		got[code+":"+strconv.FormatInt(user, 10)] = until
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{
		"AAA:1": since.Add(9 * time.Minute).UnixMilli(),
		"AAA:2": since.Add(-50 * time.Minute).UnixMilli(),
		"CCC:4": since.Add(-60*time.Minute + time.Second).UnixMilli(),
	}
	if len(got) != len(want) {
		t.Fatalf("claims %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("claims %v, want %v", got, want)
		}
	}
}
