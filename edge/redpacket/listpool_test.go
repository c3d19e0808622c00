package redpacket

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/redistest"
	"github.com/liveedge/liveedge/router"
)

// listNode is one node whose rains' packets wait in Redis lists
// (redpacket.pool: redis-list).
type listNode struct {
	svc    *Service
	ledger *persist.Ledger
	store  *persist.Store
}

func startListNode(t *testing.T, dir string, rdb rueidis.Client) *listNode {
	t.Helper()
	st, err := persist.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l, err := persist.NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := router.NewLocal("n1", router.LocalConfig{})
	r.OpenRoom(shardRoom)
	svc, err := New(st, l, r, Config{Node: "n1", Pool: &RedisListPool{Client: rdb},
		AnchorOf:    func(int64) (int64, bool, error) { return shardAnchor, true, nil },
		InRoom:      func(room, user int64) (bool, error) { return room == shardRoom, nil },
		MaxDuration: time.Hour, CodeTag: -1,
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return &listNode{svc: svc, ledger: l, store: st}
}

func (n *listNode) stop() {
	n.svc.Close()
	n.ledger.Close()
	_ = n.store.Close()
}

// grantedIndexes reads the durable grants of code: index → amount.
func (n *listNode) grantedIndexes(t *testing.T, code string) map[int32]int64 {
	t.Helper()
	out := map[int32]int64{}
	err := n.store.Scan(grantPrefix(code), func(k, v []byte) error {
		var g grant
		if err := proto.Unmarshal(v, &g); err != nil {
			return err
		}
		out[int32(binary.BigEndian.Uint32(k[len(k)-4:]))] = g.Amount
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// A Redis restarted from an append-only file that missed its last writes
// gives a rain's list back packets already popped and granted. The node
// skips them: no packet is granted twice, and what the grabbers hold plus
// the refund is the rain's total — before, the second grabber of a packet
// was credited it again (its request id is per user), the grant row
// overwritten, and the anchor refunded as if it had been granted once: T
// plus that packet paid out. The same after a restart of the node, whose
// marks come back from the grant rows.
func TestRedisListRolledBackNeverGrantsAPacketTwice(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	dir := t.TempDir()
	n := startListNode(t, dir, rdb)
	defer func() { n.stop() }()
	const count, total = 6, 600
	if _, err := n.ledger.Apply(persist.Op{Postings: []persist.Posting{{User: shardAnchor, Delta: total, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	v, err := n.svc.Create(shardAnchor, shardRoom, total, count, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	code := v.Code
	if _, err := n.svc.Prepare(shardAnchor, code); err != nil {
		t.Fatal(err)
	}
	if _, err := n.svc.Start(shardAnchor, code); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// rollBack puts every granted packet back into the list, as a Redis
	// that lost the pops would have it.
	rollBack := func() {
		t.Helper()
		for i, a := range n.grantedIndexes(t, code) {
			if err := rdb.Do(ctx, rdb.B().Rpush().Key(redisListKey(code)).Element(encodePacket(Packet{Index: i, Amount: a})).Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}
	}
	user := int64(100)
	grab := func() *proto.Error {
		user++
		_, perr := n.svc.Grab(user, code)
		return perr
	}
	for range 2 {
		if perr := grab(); perr != nil {
			t.Fatal(perr)
		}
	}
	rollBack()
	for range 2 {
		if perr := grab(); perr != nil {
			t.Fatalf("grab after the rollback: %v", perr)
		}
	}
	n.stop()
	n = startListNode(t, dir, rdb) // reloads the list from the grants
	rollBack()
	// The rest grabbed at once by eight grabbers, each with users of its own.
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range 3 * count {
				_, perr := n.svc.Grab(user+1+int64(g*3*count+k), code)
				if perr != nil && perr.Code == errEmpty.Code {
					return
				}
			}
			t.Errorf("grabber %d: no end after %d grabs", g, 3*count)
		}()
	}
	wg.Wait()
	user += 8 * 3 * count
	var view View
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if view, err = n.svc.Get(code); err == nil && view.State == StateFinished {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rain not finished: %+v %v", view, err)
		}
	}
	grants := n.grantedIndexes(t, code)
	var sum, held int64
	for _, a := range grants {
		sum += a
	}
	for u := int64(101); u <= user; u++ {
		b, err := n.ledger.Balance(u)
		if err != nil {
			t.Fatal(err)
		}
		held += b
	}
	anchor, _ := n.ledger.Balance(shardAnchor)
	if len(grants) != count || view.GrantedCount != count || held != sum || held+anchor != total || view.Refunded != anchor {
		t.Fatalf("grants %d (%d coins), view %+v; grabbers hold %d, anchor %d; want each of %d packets granted once and %d in all", len(grants), sum, view, held, anchor, count, total)
	}
	if cr, db, bal, err := n.ledger.Audit(); err != nil || cr-db != bal {
		t.Fatalf("audit: credits %d debits %d balances %d (%v)", cr, db, bal, err)
	}
}
