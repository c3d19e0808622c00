// Package persisttest holds the checks every money test runs against a real
// ledger.
package persisttest

import (
	"testing"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/persist"
)

// CheckConservation fails the test unless Σ credits − Σ debits = Σ balances,
// every balance equals the sum of its user's trades, and none is negative.
// It returns the three sums for further assertions.
func CheckConservation(tb testing.TB, l *persist.Ledger) (credits, debits, balances int64) {
	tb.Helper()
	credits, debits, balances, err := l.Audit()
	if err != nil {
		tb.Fatalf("conservation: %v", err)
	}
	if credits-debits != balances {
		tb.Fatalf("conservation: credits %d − debits %d != balances %d", credits, debits, balances)
	}
	return credits, debits, balances
}

// CheckConservationDir is CheckConservation on the local ledger in a stopped
// node's data directory.
func CheckConservationDir(tb testing.TB, dataDir string) (credits, debits, balances int64) {
	tb.Helper()
	st, err := persist.Open(dataDir)
	if err != nil {
		tb.Fatal(err)
	}
	defer st.Close()
	l, err := persist.NewLedger(st, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return CheckConservation(tb, l)
}

// CheckSharedConservation is CheckConservation for the shared wallet: the
// ledgers of every node (their Pebble directories, nodes stopped) against the
// balances in Redis at addr.
func CheckSharedConservation(tb testing.TB, redisAddr string, dataDirs ...string) (credits, debits, balances int64) {
	tb.Helper()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{redisAddr}, DisableCache: true})
	if err != nil {
		tb.Fatal(err)
	}
	defer rdb.Close()
	var stores []*persist.Store
	for _, d := range dataDirs {
		st, err := persist.Open(d)
		if err != nil {
			tb.Fatal(err)
		}
		defer st.Close()
		stores = append(stores, st)
	}
	credits, debits, balances, err = persist.AuditShared(func(u int64) (int64, error) {
		return persist.RedisBalance(rdb, u)
	}, stores...)
	if err != nil {
		tb.Fatalf("shared conservation: %v", err)
	}
	return credits, debits, balances
}
