// Package persist is each node's durable storage: a Pebble database under
// <data_dir>/pebble. It owns the on-disk key layout (keys.go) and the rule that a
// write is acknowledged only after it is durable.
//
// Durability: every write goes through Store.Apply, which commits with
// pebble.Sync. Pebble's commit pipeline group-commits concurrent syncing writers
// into one WAL fsync, so many concurrent requests share one fsync instead of
// paying one each. Store is safe for concurrent use; no lock is held across I/O
// by this package. A write that fails inside Pebble is fatal (Store: the node
// stops and replays its WAL at the next start).
//
// The money: Ledger (ledger.go, its group committer commit.go, idempotency
// idemtable.go) is a node's own wallet; SharedWallet (shared.go: the request
// protocol; shared_rebuild.go: generations and rebuilds; shared_audit.go:
// conservation and resets; its Redis scripts under lua/, lua.go) is one
// wallet for a cluster, every op recorded in the node's Ledger too.
package persist
