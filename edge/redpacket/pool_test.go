package redpacket

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist/redistest"
)

// Both pools hand out every loaded packet exactly once under concurrent
// pops, then report empty; Load replaces, Drop forgets.
func TestPools(t *testing.T) {
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{redistest.Start(t).Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	for name, p := range map[string]Pool{"memory": NewMemoryPool(), "redis-list": &RedisListPool{Client: rdb}} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			const n = 1000
			left := make([]Packet, n)
			for i := range left {
				left[i] = Packet{Index: int32(i), Amount: int64(i + 1)}
			}
			if err := p.Load(ctx, "old", left[:10]); err != nil {
				t.Fatal(err)
			}
			if err := p.Load(ctx, "c", left[:3]); err != nil {
				t.Fatal(err)
			}
			if err := p.Load(ctx, "c", left); err != nil { // replaces
				t.Fatal(err)
			}
			if k, err := p.Len(ctx, "c"); err != nil || k != n {
				t.Fatalf("Len %d %v", k, err)
			}
			var mu sync.Mutex
			seen := map[int32]int64{}
			var wg sync.WaitGroup
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						pk, ok, err := p.Pop(ctx, "c")
						if err != nil {
							t.Error(err)
							return
						}
						if !ok {
							return
						}
						mu.Lock()
						if _, dup := seen[pk.Index]; dup {
							t.Errorf("index %d popped twice", pk.Index)
						}
						seen[pk.Index] = pk.Amount
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			if len(seen) != n {
				t.Fatalf("popped %d of %d", len(seen), n)
			}
			for i, a := range seen {
				if a != int64(i+1) {
					t.Fatalf("index %d amount %d", i, a)
				}
			}
			if err := p.Drop(ctx, "old"); err != nil {
				t.Fatal(err)
			}
			if _, ok, err := p.Pop(ctx, "old"); ok || err != nil {
				t.Fatalf("pop after drop: %v %v", ok, err)
			}
			// Push: a packet put back is popped again, also into a pool its
			// last pop emptied; after Drop it is not (nor the list made anew).
			back := Packet{Index: 7, Amount: 8}
			if err := p.Push(ctx, "c", back); err != nil {
				t.Fatal(err)
			}
			if k, err := p.Len(ctx, "c"); err != nil || k != 1 {
				t.Fatalf("Len after a push into the emptied pool: %d %v", k, err)
			}
			if pk, ok, err := p.Pop(ctx, "c"); !ok || err != nil || pk != back {
				t.Fatalf("pop after push: %+v %v %v", pk, ok, err)
			}
			if err := p.Drop(ctx, "c"); err != nil {
				t.Fatal(err)
			}
			if err := p.Push(ctx, "c", back); err != nil {
				t.Fatal(err)
			}
			if k, err := p.Len(ctx, "c"); err != nil || k != 0 {
				t.Fatalf("Len after a push into a dropped pool: %d %v", k, err)
			}
			// Loaded again, the code takes pushes again.
			if err := p.Load(ctx, "c", left[:2]); err != nil {
				t.Fatal(err)
			}
			if err := p.Push(ctx, "c", back); err != nil {
				t.Fatal(err)
			}
			if k, err := p.Len(ctx, "c"); err != nil || k != 3 {
				t.Fatalf("Len after load and push: %d %v", k, err)
			}
		})
	}
}

func TestCodesAndRecords(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		c := newCode()
		if !wellFormed(c) || seen[c] {
			t.Fatalf("code %q (dup %v)", c, seen[c])
		}
		seen[c] = true
	}
	for _, bad := range []string{"", "short", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "aaaaaaaaaaaaaaaaaaaaaaaaa1", "aaaaaaaaaaaaaaaaaaaaaaaaaaa"} {
		if wellFormed(bad) {
			t.Fatalf("%q accepted", bad)
		}
	}
	split := []int64{1, 127, 128, 1 << 40, 5}
	got, err := decodeSplit(encodeSplit(split), len(split))
	if err != nil || len(got) != len(split) {
		t.Fatal(got, err)
	}
	for i := range split {
		if got[i] != split[i] {
			t.Fatal(got)
		}
	}
	if _, err := decodeSplit(encodeSplit(split), 4); err == nil {
		t.Fatal("wrong count accepted")
	}
	if _, err := decodeSplit([]byte{0x80}, 1); err == nil {
		t.Fatal("truncated split accepted")
	}
	for _, s := range []string{"", "1", "x:1", "1:0", "-1:5", "1:x"} {
		if _, err := decodePacket(s); err == nil {
			t.Fatalf("element %q accepted", s)
		}
	}
}

// A Redis list pool with a TTL expires a list nothing dropped (its rain's
// settlement never ran: a crash, a failed Drop, a rolled-back Redis), and a
// put-back into a list its last pop emptied has the TTL again; without a
// TTL a list stays.
func TestRedisListPoolTTL(t *testing.T) {
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{redistest.Start(t).Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	ctx := context.Background()
	pttl := func(code string) int64 {
		t.Helper()
		n, err := rdb.Do(ctx, rdb.B().Pttl().Key(redisListKey(code)).Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	p := &RedisListPool{Client: rdb, TTL: time.Hour}
	if err := p.Load(ctx, "ttl", []Packet{{Index: 0, Amount: 5}}); err != nil {
		t.Fatal(err)
	}
	if ms := pttl("ttl"); ms <= 0 || ms > time.Hour.Milliseconds() {
		t.Fatalf("loaded list's PTTL %d ms, want within an hour", ms)
	}
	pk, ok, err := p.Pop(ctx, "ttl")
	if err != nil || !ok {
		t.Fatalf("pop: %v %v", ok, err)
	}
	if err := p.Push(ctx, "ttl", pk); err != nil {
		t.Fatal(err)
	}
	if ms := pttl("ttl"); ms <= 0 || ms > time.Hour.Milliseconds() {
		t.Fatalf("list a put-back made again: PTTL %d ms, want within an hour", ms)
	}
	short := &RedisListPool{Client: rdb, TTL: 50 * time.Millisecond}
	if err := short.Load(ctx, "gone", []Packet{{Index: 0, Amount: 5}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if n, err := short.Len(ctx, "gone"); err == nil && n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a list past its TTL still in Redis")
		}
		time.Sleep(10 * time.Millisecond)
	}
	none := &RedisListPool{Client: rdb}
	if err := none.Load(ctx, "kept", []Packet{{Index: 0, Amount: 5}}); err != nil {
		t.Fatal(err)
	}
	if ms := pttl("kept"); ms != -1 {
		t.Fatalf("list without a TTL: PTTL %d, want -1 (none)", ms)
	}
}
