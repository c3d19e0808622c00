// Package ticket sells seats of programs (shows) on one node: programs with
// ticket categories and seat grids, orders that lock seats all-or-nothing
// (a manual seat list or N adjacent seats of one row chosen here), the
// per-order and per-user limits, a repeat-submit guard per (user, program),
// provider payments through the pay centre's webhook (edge/pay routes a
// paid event of business "tickets" to Service.Paid), the coins saga (lock
// seats → use coupon → debit coins → confirm, compensated exactly), the
// timeout close of unpaid orders and one-use coupons. docs/tickets.md has
// the design, the saga's state machine and crash table.
//
// What it owns (Pebble, rec/ keys): rec/tprog/<id> programs, rec/torder/<id>
// orders (the order record is the durable truth of its seats and of every
// saga step), rec/torderreq/<user><req_id> → order id; coupons behind a
// CouponStore — rec/tcoupon/<id> on one node (PebbleCoupons), Redis in a
// cluster (SharedCoupons: granted and used through any node, once
// cluster-wide). Seats live in memory only (Inventory) and are rebuilt from
// the orders at start: PENDING_PAY and PLACING orders lock their seats, PAID
// orders hold them sold.
//
// Invariants:
//   - A seat is free, or locked or sold by exactly one order; per category
//     free + locked + sold = rows × cols (memCategory).
//   - A seat changes owner only free → locked (Reserve, all-or-nothing) and
//     back only through its owner order (Release / Sell act on seats of the
//     order they name): releasing twice frees nothing the second time.
//   - An order's state, and each side effect (coupon use, debit, refund,
//     coupon back), are written in one atomic durable write with the flag
//     that records it (Order.Steps), before the reply: what the durable
//     order says happened, happened, and nothing else.
//   - No PLACING order outlives start-up: New completes or compensates each
//     (or, on a storage error, the sweep retries until it settles).
//   - A coupon is held by at most one order, and freed only for the order
//     its store says holds it. Where the store cannot share the order's
//     batch (Redis), a use the order does not record is given back by the
//     compensation (it asks the store), and a closed order gives its coupon
//     back after its CANCELLED record (owed give-backs retried by the sweep
//     and at start).
//
// Concurrency: one mutex per category (Reserve of seats of several
// categories takes them in ascending category id — the one lock order);
// one lock per order id around every transition of that order; one per
// coupon; the repeat guard (sharded by user) serialises the orders of one
// (user, program), so the per-user limit check and the reservation that
// follows are not racy. The reservation takes no lock shared by all
// orders; around it a few O(1) updates run under short process-wide mutexes
// (the pay centre's order-id sequence and open-orders map, the map of
// pending timeouts), none held across I/O.
// Lock order: pay order (edge/pay) → ticket order → coupon → category. No
// category lock is ever held across I/O (Pebble writes happen after the
// in-memory reservation, outside it); order and coupon locks are per key and
// are held across their own durable write. Every method is safe for
// concurrent use.
package ticket
