package gateway_test

import (
	"testing"
	"time"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// A node expires idempotency records past their TTL as soon as it starts
// (not only an hour later: a node restarted more often would keep them
// forever), and the money stays.
func TestIdemExpiredAtStart(t *testing.T) {
	cfg := nodetest.Config(t)
	st, err := persist.Open(cfg.Node.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-30 * time.Hour)
	l, err := persist.NewLedger(st, func() time.Time { return old })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Apply(persist.Op{User: 7, ReqID: "old", Postings: []persist.Posting{{User: 7, Delta: 50, Reason: persist.ReasonDev}}}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	idemRows := func(s *persist.Store) int {
		k := 0
		if err := s.Scan(persist.PrefixIdemG, func(_, _ []byte) error { k++; return nil }); err != nil {
			t.Fatal(err)
		}
		return k
	}
	n := nodetest.Start(t, cfg)
	nodetest.Eventually(t, 10*time.Second, func() bool { return idemRows(n.Store) == 0 }, "the expired idempotency row is still there")
	if b, _ := n.Ledger.Balance(7); b != 50 {
		t.Fatalf("balance %d, want 50", b)
	}
	persisttest.CheckConservation(t, n.Ledger)
}
