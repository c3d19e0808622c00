package persist

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

// ErrCrashed is what Apply returns at a crash point.
var ErrCrashed = errCrashed
