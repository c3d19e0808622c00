// Package pay owns recharge payments: products, orders and their guarded
// state machine, the signed idempotent webhook of payment providers, the
// active-query reconciliation of lost notifies and the timeout of unpaid
// orders. Coins are credited through a persist.Wallet, exactly once per order.
//
// Order state machine (every transition a compare-and-set under the order's
// lock, recorded durably with a log row; anything else → 40002):
//
//	WAITING_PAY → PAYING → PAYED → PAY_BACK (refund)
//	     └──────────┴────→ IN_VALID → PAY_BACK (a payment that arrived after
//	                                  the order closed is refunded, not credited)
//
// Orders of another business (Order.Biz, e.g. "tickets", see biz.go) are
// paid through the same webhook: the paid event goes to the registered
// Business instead of the wallet, and PAYING → PAY_BACK directly when the
// business had already closed its order.
package pay

import (
	"hash/fnv"
	"sync"
	"time"
)

// Order statuses.
const (
	StatusWaitingPay = "WAITING_PAY"
	StatusPaying     = "PAYING"
	StatusPayed      = "PAYED"
	StatusPayBack    = "PAY_BACK"
	StatusInvalid    = "IN_VALID"
)

// allowed lists the legal transitions. An open order goes to PAY_BACK when
// the provider reports it paid, but not as the order (another amount or
// channel): refunded, never credited (the reconciler, after two timeouts).
var allowed = map[string][]string{
	StatusWaitingPay: {StatusPaying, StatusPayed, StatusInvalid, StatusPayBack},
	StatusPaying:     {StatusPayed, StatusInvalid, StatusPayBack},
	StatusPayed:      {StatusPayBack},
	StatusInvalid:    {StatusPayBack, StatusPayed}, // PAYED: a business order whose business took the payment (ErrBizPaid)
}

// OpenStatus reports whether an order in status is open: not paid or closed
// yet (WAITING_PAY, PAYING).
func OpenStatus(status string) bool { return status == StatusWaitingPay || status == StatusPaying }

// CanMove reports whether from → to is a legal transition.
func CanMove(from, to string) bool {
	for _, s := range allowed[from] {
		if s == to {
			return true
		}
	}
	return false
}

// Product is a recharge product: pay Price cents, get Coins.
type Product struct {
	ID    int64  `json:"product_id"`
	Name  string `json:"name"`
	Price int64  `json:"price"` // cents
	Coins int64  `json:"coins"`
	Type  int    `json:"type"`
	Valid bool   `json:"valid"`
	Biz   string `json:"biz"` // business the payment belongs to ("coins")
}

// CentsPerCoin is the rate between money and coins: SPEC §4's seed products
// sell 30 元 (3,000 cents) for 300 coins … 100 元 for 1,000, so a coin costs
// 10 cents (every product of Products is priced so). A pay order's Amount is
// cents; a business that prices its goods in coins (tickets) asks the
// provider for coins × CentsPerCoin.
const CentsPerCoin = 10

// Products is the seed catalogue (SPEC §4: 30 元 → 300 coins … 100 元 → 1000 coins).
var Products = []Product{
	{ID: 1, Name: "300 coins", Price: 3000, Coins: 300, Type: 1, Valid: true, Biz: "coins"},
	{ID: 2, Name: "500 coins", Price: 5000, Coins: 500, Type: 1, Valid: true, Biz: "coins"},
	{ID: 3, Name: "1000 coins", Price: 10000, Coins: 1000, Type: 1, Valid: true, Biz: "coins"},
	{ID: 4, Name: "1 coin (test)", Price: 10, Coins: 1, Type: 0, Valid: true, Biz: "coins"},
}

// Order is a payment order.
type Order struct {
	OrderID   string `json:"order_id"`
	UserID    int64  `json:"user_id"`
	ProductID int64  `json:"product_id"`
	Amount    int64  `json:"amount"` // cents
	Coins     int64  `json:"coins"`
	Channel   string `json:"channel"`
	Source    string `json:"source"`
	Biz       string `json:"biz"`
	Status    string `json:"status"`
	ReqID     string `json:"req_id"`
	PayURL    string `json:"pay_url,omitempty"`
	EventID   string `json:"event_id,omitempty"`
	// TxnID is the provider's transaction id of the payment that settled
	// the order (paid, or refunded), when its event carried one.
	TxnID     string `json:"txn_id,omitempty"`
	CreatedAt int64  `json:"created_at"` // unix ms
	UpdatedAt int64  `json:"updated_at"`
	PaidAt    int64  `json:"paid_at,omitempty"`
	ExpiresAt int64  `json:"expires_at,omitempty"` // business orders: closed unpaid after this (unix ms)
	Note      string `json:"note,omitempty"`
}

// coins reports whether o buys coins (a recharge; Biz "" on orders stored
// before businesses existed), not a business's goods.
func (o *Order) coins() bool { return o.Biz == "" || o.Biz == BizCoins }

// GeneBits is k of the gene method: the low k bits of an order id are
// user_id mod 2^k, so an order is routed by its user or by its id alike
// (shard = id & (2^k − 1) = user mod 2^k).
const GeneBits = 10

const (
	seqBits    = 7
	workerBits = 5
	idEpochMs  = 1767225600000 // 2026-01-01T00:00:00Z
)

// IDGen makes snowflake order ids: 41 bits of ms since 2026 | 5 bits worker |
// 7 bits sequence | GeneBits bits of user_id mod 2^k. Safe for concurrent use.
type IDGen struct {
	mu     sync.Mutex
	worker int64
	lastMs int64
	seq    int64
	now    func() time.Time
}

// NewIDGen returns a generator; worker < 0 derives it from node.
func NewIDGen(node string, worker int, now func() time.Time) *IDGen {
	if worker < 0 {
		h := fnv.New32a()
		h.Write([]byte(node))
		worker = int(h.Sum32() % (1 << workerBits))
	}
	if now == nil {
		now = time.Now
	}
	return &IDGen{worker: int64(worker) & (1<<workerBits - 1), now: now}
}

// Next returns a new id for user.
func (g *IDGen) Next(user int64) int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	ms := g.now().UnixMilli() - idEpochMs
	if ms < g.lastMs {
		ms = g.lastMs // clock went back: keep counting on the last ms
	}
	if ms == g.lastMs {
		g.seq++
		if g.seq >= 1<<seqBits {
			ms, g.seq = g.lastMs+1, 0 // borrow the next ms
		}
	} else {
		g.seq = 0
	}
	g.lastMs = ms
	return ms<<(workerBits+seqBits+GeneBits) | g.worker<<(seqBits+GeneBits) | g.seq<<GeneBits | user&(1<<GeneBits-1)
}

// notBelow makes every later id greater than id, whatever the clock says:
// as if the last id made had been the last of id's millisecond.
func (g *IDGen) notBelow(id int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if ms := id >> (workerBits + seqBits + GeneBits); ms >= g.lastMs {
		g.lastMs, g.seq = ms, 1<<seqBits-1
	}
}

// Shard is the routing shard of an order id (= user_id mod 2^GeneBits).
func Shard(orderID int64) int64 { return orderID & (1<<GeneBits - 1) }

// WorkerOf is the worker id in an order id's bits: which node made it (the
// node holding WorkerLeaseKey of it, in a cluster).
func WorkerOf(orderID int64) int {
	return int(orderID>>(seqBits+GeneBits)) & (1<<workerBits - 1)
}

// TimeOf is when an order id was made (its milliseconds since 2026).
func TimeOf(orderID int64) time.Time {
	return time.UnixMilli(orderID>>(workerBits+seqBits+GeneBits) + idEpochMs)
}

// FirstIDAt is the lowest order id an IDGen can make at t (0 before 2026):
// every id made at t or later is at least this.
func FirstIDAt(t time.Time) int64 {
	return max(t.UnixMilli()-idEpochMs, 0) << (workerBits + seqBits + GeneBits)
}
