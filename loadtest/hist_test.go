package loadtest

import (
	"testing"
	"time"
)

func TestHistBuckets(t *testing.T) {
	for v := int64(0); v < 1<<20; v += 1 + v/7 {
		b := bucketOf(v)
		if hi := bucketHigh(b); hi < v || (b > 0 && bucketHigh(b-1) >= v) {
			t.Fatalf("v=%d bucket %d high %d prev high %d", v, b, hi, bucketHigh(b-1))
		}
	}
	var h Hist
	for i := 1; i <= 1000; i++ {
		h.Record(time.Duration(i) * time.Millisecond)
	}
	if p50 := h.Quantile(0.5); p50 < 495 || p50 > 510 {
		t.Fatalf("p50 = %v ms", p50)
	}
	if p99 := h.Quantile(0.99); p99 < 985 || p99 > 1000 {
		t.Fatalf("p99 = %v ms", p99)
	}
	if m := h.Quantile(1); m != 1000 {
		t.Fatalf("max = %v ms", m)
	}
	var g Hist
	g.Merge(h.Buckets(), h.MaxUS())
	if g.Count() != 1000 || g.Quantile(0.5) != h.Quantile(0.5) {
		t.Fatalf("merge: %d %v", g.Count(), g.Quantile(0.5))
	}
}

func TestCheckLoopback(t *testing.T) {
	for _, u := range []string{"ws://127.0.0.1:8081/ws", "http://localhost:8080", "ws://[::1]:1/ws", "http://127.0.0.3:80"} {
		if err := CheckLoopback(u); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
	for _, u := range []string{"ws://10.0.0.1:8081/ws", "http://example.com", "ws://0.0.0.0:1/ws", "http:///x"} {
		if err := CheckLoopback(u); err == nil {
			t.Errorf("%s accepted", u)
		}
	}
}

func TestCPUTime(t *testing.T) {
	a, err := CPUTime(0)
	if err != nil {
		t.Fatal(err)
	}
	// burn CPU until the counter moves by 50 ms (5 s of wall time at most:
	// the machine may be busy)
	for x, end := 0, time.Now().Add(5*time.Second); time.Now().Before(end); x++ {
		if x%100_000 == 0 {
			if b, err := CPUTime(0); err != nil || b >= a+50*time.Millisecond {
				return
			}
		}
	}
	b, err := CPUTime(0)
	t.Fatalf("CPU time %v → %v after 5 s of spinning (%v)", a, b, err)
}
