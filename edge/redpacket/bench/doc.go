// Package bench holds the red-packet grab benchmark. Everything lives in
// _test.go files:
//
//   - BenchmarkGrab_50k: one rain of 50,000 packets drained by 256 concurrent
//     grabbers, in process, three ways on the same machine in the same run:
//     (1) LiveEdge with the in-memory pool (pop + durable grant and credit in
//     one group-committed, fsynced Pebble ledger op + the 5570 push enqueued);
//     (2) LiveEdge with redpacket.pool = redis-list (RPOP instead of the
//     in-memory pop, the rest the same); (3) a faithful re-creation of the
//     seed's grab: RPOP from a Redis list, then a durable event publish
//     acknowledged before the reply (JetStream publish with ack to a
//     file-storage stream — the seed's Kafka send), twice: with JetStream's
//     default (no fsync per message, like Kafka acks=1) and with sync_always
//     (fsynced per message, as durable as LiveEdge's grant; 5,000 packets).
//     It reports grabs/s of each and the ratios of the memory pool to the
//     others.
//
//     go test -run '^$' -bench Grab -benchtime 1x ./edge/redpacket/bench/
//
// Plain `go test` runs only a short smoke test of the same code. A throwaway
// redis-server is started with persist/redistest; NATS runs embedded.
package bench
