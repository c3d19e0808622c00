// Package persisttest holds the checks every money test runs against a real
// ledger.
package persisttest

import (
	"testing"

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
