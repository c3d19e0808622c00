package persist

import (
	"fmt"
	"time"
)

// Test-only access for the external tests of this package (persist_test).

// LedgerTrades lists user's trade rows in st, oldest first.
func LedgerTrades(st *Store, user int64) ([]Trade, error) {
	var out []Trade
	err := st.ScanRange(Key2(PrefixTrade, uint64(user), 0), Key(PrefixTrade, uint64(user)+1), func(_, v []byte) (bool, error) {
		t, err := decodeTrade(v)
		out = append(out, t)
		return true, err
	})
	return out, err
}

// SetCrashAt sets the test crash points of w ("intent", "script", "final":
// Apply stops dead there as if the process had been killed); nil clears.
// Set it only while no Apply runs.
func SetCrashAt(w *SharedWallet, f func(point string) bool) { w.crashAt = f }

// FailResets makes w's next n resets of a rolled-back generation fail.
func FailResets(w *SharedWallet, n int32) { w.failResets.Store(n) }

// PeerSeen is the highest applied-op count of node peer that w's audits
// have read in Redis in the current generation.
func PeerSeen(w *SharedWallet, peer string) int64 {
	w.peersMu.Lock()
	defer w.peersMu.Unlock()
	return w.peersSeen[peer]
}

// ErrCrashed is what Apply returns at a crash point.
var ErrCrashed = errCrashed

// RunOrderCrashChild runs a crash scenario of TestKill9BetweenDependentGroups
// in a child process: it opens the ledger in dir, stops at the scenario's
// crash point and prints how far it got (the parent kill -9s it then). It
// never returns.
func RunOrderCrashChild(scenario, dir string, credit, debit Op) {
	fail := func(err error) {
		fmt.Printf("error %v\n", err)
		park()
	}
	st, err := Open(dir)
	if err != nil {
		fail(err)
	}
	l, err := NewLedger(st, nil)
	if err != nil {
		fail(err)
	}
	isOp := func(entries []*commitEntry, op Op) bool {
		for _, e := range entries {
			for _, p := range e.postings {
				if p == op.Postings[0] {
					return true
				}
			}
		}
		return false
	}
	stopped := make(chan struct{})
	l.commit.crashAt = func(point string, entries []*commitEntry) {
		switch {
		case point == map[string]string{"groups": "write", "reserved": "reserved"}[scenario] && isOp(entries, credit):
			close(stopped)
			park() // the crash point: this goroutine goes no further
		case point == "wait" && isOp(entries, debit):
			fmt.Println("debit waits for the credit's group")
		}
	}
	ack := func(name string) func(Result, error) {
		return func(_ Result, err error) {
			if err != nil {
				fmt.Printf("error %s: %v\n", name, err)
				return
			}
			fmt.Printf("acked %s\n", name)
		}
	}
	go l.ApplyAsync(credit, ack("credit"))
	<-stopped
	l.ApplyAsync(debit, ack("debit"))
	park()
}

// park blocks the calling goroutine until the process is killed.
func park() {
	for {
		time.Sleep(time.Hour)
	}
}

// WriteIdemLayout writes n idempotency records of the last hour straight
// into st as a ledger with memory budget budget would have left them: as
// many as its index holds in group rows of 100, the rest in spill rows.
func WriteIdemLayout(st *Store, n int, budget int64) error {
	tab := newIdemTable(budget / ledgerShards)
	perShard := tab.capacity()
	hour := unixHour(time.Now().UnixMilli())
	res := encodeResult(Result{TradeIDs: []int64{123456789}, Balances: []int64{987654}, At: time.Now().UnixMilli()})
	var count [ledgerShards]int
	var group []byte
	var gid int64
	batch := st.db.NewBatch()
	flush := func(force bool) error {
		if batch.Count() < 10_000 && !force {
			return nil
		}
		if err := batch.Commit(nil); err != nil {
			return err
		}
		batch = st.db.NewBatch()
		return nil
	}
	for i := range n {
		user := int64(1 + i%100_000)
		req := fmt.Sprintf("gift:c%d-w%d-%d", i%16, i%4, i/100_000)
		sh := uint64(user) % ledgerShards
		if count[sh] < perShard*99/100 { // as the runtime's reservations leave it
			count[sh]++
			if group == nil {
				group = newIdemGroup(4096)
			}
			group = appendIdemEntry(group, user, req, res)
			if len(group) > 3000 {
				gid++
				if err := batch.Set(idemGroupKey(hour, gid), group, nil); err != nil {
					return err
				}
				group = nil
			}
		} else if err := batch.Set(idemSpillKey(spillPeriod(hour), user, req), res, nil); err != nil {
			return err
		}
		if err := flush(false); err != nil {
			return err
		}
	}
	if group != nil {
		gid++
		if err := batch.Set(idemGroupKey(hour, gid), group, nil); err != nil {
			return err
		}
	}
	if err := batch.Set(SeqKey("idxg"), EncodeInt64(gid), nil); err != nil {
		return err
	}
	return flush(true)
}

// BalancesInMemory is how many users' balances l keeps in memory.
func BalancesInMemory(l *Ledger) int {
	n := 0
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		n += len(sh.bal)
		sh.mu.Unlock()
	}
	return n
}
