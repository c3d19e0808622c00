package persisttest

import (
	"context"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist"
)

// OpenSharedWallet opens node cfg.Node's shared wallet on a fresh store,
// with a Redis client to addr (Redis itself, or a fault proxy before it),
// and waits until it is ready; all are closed when the test ends.
func OpenSharedWallet(tb testing.TB, addr string, cfg persist.SharedConfig) (*persist.Store, *persist.SharedWallet) {
	tb.Helper()
	return OpenSharedWalletAt(tb, tb.TempDir(), addr, cfg)
}

// OpenSharedWalletAt is OpenSharedWallet on the store in dir (a restart:
// close the earlier wallet and store first; closing again at the end is
// harmless).
func OpenSharedWalletAt(tb testing.TB, dir, addr string, cfg persist.SharedConfig) (*persist.Store, *persist.SharedWallet) {
	tb.Helper()
	st, err := persist.Open(dir)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = st.Close() })
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(rdb.Close)
	w, err := persist.NewSharedWallet(st, rdb, cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(w.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.WaitReady(ctx); err != nil {
		tb.Fatal(err)
	}
	return st, w
}

// OpenLedger opens a single-node ledger on a fresh store; both are closed
// when the test ends.
func OpenLedger(tb testing.TB) (*persist.Store, *persist.Ledger) {
	tb.Helper()
	st, err := persist.Open(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = st.Close() })
	led, err := persist.NewLedger(st, time.Now)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(led.Close)
	return st, led
}
