package bench

import (
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble"
	"github.com/cockroachdb/pebble/bloom"
)

func TestZProbe(t *testing.T) {
	if os.Getenv("ZPROBE") == "" {
		t.Skip()
	}
	for _, mode := range []string{"commit", "commit+mem64", "get+commit"} {
		opts := &pebble.Options{Logger: quietLogger{}}
		if strings.Contains(mode, "mem64") {
			opts.MemTableSize = 64 << 20
		}
		if strings.Contains(mode, "bloom") {
			for i := range opts.Levels {
				opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
			}
			opts.EnsureDefaults()
			for i := range opts.Levels {
				opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
			}
		}
		db, err := pebble.Open(t.TempDir(), opts)
		if err != nil {
			t.Fatal(err)
		}
		var n, getNs, comNs, semNs, stallNs, rotNs, waitNs atomic.Int64
		var stop atomic.Bool
		var wg sync.WaitGroup
		val := make([]byte, 200)
		for g := 0; g < 512; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stop.Load() {
					i := n.Add(1)
					k := binary.BigEndian.AppendUint64([]byte("idem/"), uint64(i))
					if mode != "commit" {
						tg := time.Now()
						if _, c, err := db.Get(k); err == nil {
							c.Close()
						}
						getNs.Add(int64(time.Since(tg)))
					}
					tc := time.Now()
					b := db.NewBatch()
					b.Set(k, val[:80], nil)
					b.Set(binary.BigEndian.AppendUint64([]byte("trade/"), uint64(i)), val, nil)
					b.Set(binary.BigEndian.AppendUint64([]byte("rec/"), uint64(i)), val, nil)
					b.Merge(binary.BigEndian.AppendUint64([]byte("bal/"), uint64(i%10000)), val[:8], nil)
					b.Merge(binary.BigEndian.AppendUint64([]byte("tal/"), uint64(i%100)), val[:8], nil)
					b.Set(binary.BigEndian.AppendUint64([]byte("idemx/"), uint64(i)), nil, nil)
					if err := b.Commit(pebble.Sync); err != nil {
						t.Error(err)
					}
					cs := b.CommitStats()
					semNs.Add(int64(cs.SemaphoreWaitDuration))
					stallNs.Add(int64(cs.MemTableWriteStallDuration + cs.L0ReadAmpWriteStallDuration))
					rotNs.Add(int64(cs.WALRotationDuration))
					waitNs.Add(int64(cs.CommitWaitDuration))
					b.Close()
					comNs.Add(int64(time.Since(tc)))
				}
			}()
		}
		t0 := time.Now()
		c0 := selfCPU()
		time.Sleep(4 * time.Second)
		stop.Store(true)
		wg.Wait()
		m := db.Metrics()
		fmt.Printf("cpu %.2f cores get %v commit %v\n", float64(selfCPU()-c0)/float64(time.Since(t0)), time.Duration(getNs.Load()/n.Load()), time.Duration(comNs.Load()/n.Load()))
		nn := n.Load()
		fmt.Printf("sem %v stall %v rot %v syncwait %v\n", time.Duration(semNs.Load()/nn), time.Duration(stallNs.Load()/nn), time.Duration(rotNs.Load()/nn), time.Duration(waitNs.Load()/nn))
		fmt.Printf("%s: %.0f commits/s  L0 files %d  stalls? flushes %d compactions %d\n", mode, float64(n.Load())/time.Since(t0).Seconds(), m.Levels[0].NumFiles, m.Flush.Count, m.Compact.Count)
		db.Close()
	}
}
