// Package room owns living rooms: an anchor opens a room of a type and closes
// it; viewers list open rooms by type and read a room's info. On one node the
// rooms are durable in Pebble (room/<id>); in a cluster (Config.Shared) they
// live in Redis under one hash tag — ids from one counter, one open room per
// anchor and the open/close rate limit checked by one Lua script each — and
// every node keeps a replica of the open rooms (Apply, Sync, EnsureOpen).
//
// Invariants (kept by Service under mu): an anchor has at most one open room;
// a room id is never reused; a closed room never becomes joinable again.
// Durable writes happen outside mu (an anchor's open is reserved first).
package room
