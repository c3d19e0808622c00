package persist

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
	"github.com/cockroachdb/pebble/vfs/errorfs"
)

// A write that fails in Pebble's WAL is fatal: the store's OnFatal function
// runs once with the error (a node ends its process there), the failing
// Apply never returns as if written or as if nothing was, and every later
// write is refused with ErrStoreFailed without reaching Pebble; /readyz
// reads Failed.
func TestStoreWALFailureIsFatal(t *testing.T) {
	var failing atomic.Bool
	fs := errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op, path string) error {
		if failing.Load() && op == errorfs.OpFileWrite && strings.HasSuffix(path, ".log") {
			return errorfs.ErrInjected
		}
		return nil
	}))
	st, err := openFS(t.TempDir(), Options{}, fs)
	if err != nil {
		t.Fatal(err)
	}
	var fatal []error
	st.OnFatal(func(err error) { fatal = append(fatal, err) })
	if err := st.Put([]byte("a"), []byte("1")); err != nil {
		t.Fatal(err)
	}
	l, err := NewLedger(st, nil)
	if err != nil {
		t.Fatal(err)
	}
	credit := func(req string) error {
		_, err := l.Apply(Op{User: 1, ReqID: req, Postings: []Posting{{User: 1, Delta: 5, Reason: ReasonDev}}})
		return err
	}
	if err := credit("before"); err != nil {
		t.Fatal(err)
	}
	failing.Store(true)
	returned := func() (ret bool) {
		defer func() { _ = recover() }()
		_ = st.Put([]byte("b"), []byte("2"))
		return true
	}()
	if returned {
		t.Fatal("a write that failed in the WAL returned")
	}
	if len(fatal) != 1 || !strings.Contains(fatal[0].Error(), "injected") {
		t.Fatalf("OnFatal calls: %v, want the injected error once", fatal)
	}
	if err := st.Failed(); !errors.Is(err, ErrStoreFailed) {
		t.Fatalf("Failed: %v", err)
	}
	failing.Store(false) // the disk answers again: still refused
	if err := st.Put([]byte("c"), []byte("3")); !errors.Is(err, ErrStoreFailed) {
		t.Fatalf("a write after the failure: %v, want ErrStoreFailed", err)
	}
	if err := st.DeleteNoSync([]byte("a")); !errors.Is(err, ErrStoreFailed) {
		t.Fatalf("a delete after the failure: %v, want ErrStoreFailed", err)
	}
	// The ledger refuses its ops too ("retry": the node is stopping).
	if err := credit("after"); !errors.Is(err, ErrStoreFailed) || !errors.Is(err, ErrInProgress) {
		t.Fatalf("a ledger op after the store's failure: %v", err)
	}
	if len(fatal) != 1 {
		t.Fatalf("OnFatal called %d times", len(fatal))
	}
	l.Close()
	// Close writes nothing more and reports the failure (no panic).
	if err := st.Close(); !errors.Is(err, ErrStoreFailed) {
		t.Fatalf("Close after the failure: %v, want ErrStoreFailed", err)
	}
}
