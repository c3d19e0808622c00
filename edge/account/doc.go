// Package account owns the status of users' coin accounts (SPEC §2
// currency_account.status): 1 normal, 2 frozen. A frozen account can
// neither send nor receive gifts and cannot create payment orders; an admin
// freezes and unfreezes it (PUT /api/v1/admin/users/{id}/status).
//
// Two implementations of Statuses: Local keeps the status in the node's
// Pebble (fsynced) with the frozen users in memory; Shared keeps it in Redis
// (one key per user whose status changed) for every node sharing it, read
// through rueidis's client-side cache (invalidated by Redis tracking), so a
// gift costs no round trip, with each change fsynced on the disk of the node
// that made it too, from which a Redis that lost its data is rebuilt. Both are safe for concurrent use. A status change
// applies to requests that check after it; a gift already past the check
// completes.
package account
