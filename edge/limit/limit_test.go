package limit

import (
	"testing"
	"time"
)

func TestKeyedBurstThenRate(t *testing.T) {
	now := time.Unix(1000, 0)
	k := New(5, time.Second, 5, func() time.Time { return now })
	for i := 0; i < 5; i++ {
		if !k.Allow(1) {
			t.Fatalf("event %d of burst refused", i)
		}
	}
	if k.Allow(1) {
		t.Fatal("6th event in the same instant allowed")
	}
	if !k.Allow(2) {
		t.Fatal("another key is limited")
	}
	now = now.Add(200 * time.Millisecond)
	if !k.Allow(1) || k.Allow(1) {
		t.Fatal("after one interval exactly one more event is allowed")
	}
}

func TestOneEveryTenSeconds(t *testing.T) {
	now := time.Unix(1000, 0)
	k := New(1, 10*time.Second, 1, func() time.Time { return now })
	if !k.Allow(7) || k.Allow(7) {
		t.Fatal("want one, then refused")
	}
	now = now.Add(9 * time.Second)
	if k.Allow(7) {
		t.Fatal("allowed before 10 s")
	}
	now = now.Add(time.Second)
	if !k.Allow(7) {
		t.Fatal("refused after 10 s")
	}
}

func TestNilAllows(t *testing.T) {
	var k *Keyed = New(0, time.Second, 1, nil)
	if !k.Allow(1) {
		t.Fatal("nil limiter must allow")
	}
}
