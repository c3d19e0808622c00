// Package redpacket runs red-packet rains (SPEC §3, issue 13): an anchor
// puts T coins into N packets for a room, viewers in the room grab them for
// a while, and whatever nobody grabbed goes back to the anchor.
//
// # What it owns
//
//   - The rains of this node: their records (rec/rp/<code> until FINISHED,
//     then rec/rpdone/<code>: a start reads only the first), their splits
//     (rec/rpsplit/<code>) and their grants (rec/rpgrant/<code>/<index>) in
//     Pebble, and in memory the rains not finished, which room runs which,
//     how many rains each anchor has open, and the users who already got a
//     packet (one-per-user).
//   - The life of a rain: WAIT (created) → PREPARED (anchor debited T, split
//     durable, one ledger op) → RUNNING (pool loaded, biz 5560) → FINISHED
//     (settled once: refund of T − Σ durable grants, biz 5561).
//   - The pool of packets not yet granted, behind the Pool seam: MemoryPool
//     (this node's memory, the default) or RedisListPool (the seed's Redis
//     list per code, the benchmark baseline). A cluster-wide sharded pool
//     plugs in behind the same interface (see docs/redpacket.md).
//
// It moves money only through persist.Wallet: the prepare debit, each grant
// (the grabber's credit and the grant row in one op, idempotent by
// (grabber, "rp:<code>:<index>")) and the settlement refund.
//
// # Concurrency
//
// Service is safe for concurrent use. Grabs of one rain run in parallel: a
// grab reserves under the rain's mutex, pops from the pool without it, and
// its ledger op is group-committed with everyone else's; the grab's answer
// comes from a ledger committer once the op is durable (GrabAsync), so a
// WebSocket reader never waits on an fsync. Settlement runs on a goroutine of
// its own, only when no grab of the rain is in flight. Lock order: the
// service's mutex, then a rain's; no lock is held across I/O or a wallet
// call. Close stops the timers and waits for settlements in progress; a rain
// left running resumes (or settles) when the node starts again.
package redpacket
