// Package bench holds the gift benchmarks (see README.md in this directory).
// Everything lives in _test.go files:
//
//   - BenchmarkGiftDebit_Hot / BenchmarkGiftDebit_Spread: durable gifts/s and
//     latency of gift.Service.Send on a real Pebble ledger against a faithful
//     re-creation of the seed's debit (Redis SET NX lock per user, sleep
//     0.5–1 s and retry when it is busy, GET + DECRBY, async DB write) on a
//     real redis-server, same workload, same client concurrency.
//   - BenchmarkGiftWS: gifts over WebSocket end to end against a real node,
//     as a ratio of a bare gws request/reply echo of the same frame sizes
//     driven by the same client code, then LiveEdge's latency at half its
//     maximum rate (open loop).
//
// Each benchmark round runs for a fixed wall time (not b.N operations):
//
//	go test -run '^$' -bench . -benchtime 1x ./edge/gift/bench/
//
// Plain `go test` runs only short smoke tests of the same code.
package bench
