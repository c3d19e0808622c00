package ticket

import (
	"strconv"
)

// Order statuses (PROTOCOL §4). PLACING is a coins order whose saga is
// running; it never outlives the process that runs it (start-up recovery
// completes or compensates every PLACING order before serving).
const (
	StatusPlacing    = "PLACING"
	StatusPendingPay = "PENDING_PAY"
	StatusPaid       = "PAID"
	StatusCancelled  = "CANCELLED"
	StatusRefunded   = "REFUNDED"
)

// Seat statuses (SPEC §5).
const (
	SeatFree   uint8 = 1
	SeatLocked uint8 = 2
	SeatSold   uint8 = 3
)

// Payment kinds of an order.
const (
	PayMock  = "mock"  // a provider payment through the pay centre's webhook
	PayCoins = "coins" // the coins saga: lock seats → use coupon → debit coins → confirm
)

// Saga states of a coins order (Order.Saga).
const (
	SagaRunning      = "RUNNING"
	SagaCompensating = "COMPENSATING"
	SagaDone         = "DONE"
	SagaCompensated  = "COMPENSATED"
)

// Biz is the pay-centre business of ticket orders (pay.Order.Biz).
const Biz = "tickets"

// ReasonTicket is the ledger reason of a coins payment for tickets (its
// compensation is persist.ReasonRefund).
const ReasonTicket = "ticket"

// Bounds of what an admin may create (bigger → 10001).
const (
	MaxCategories  = 16
	MaxRows        = 100
	MaxCols        = 100
	MaxPerOrder    = 20
	MaxPerUser     = 100
	maxNameLen     = 64
	maxPrice       = 10_000_000
	maxCouponValue = 1_000_000_000
	maxReqIDLen    = 64
)

// CategoryDef is a ticket category: a grid of Rows × Cols seats at Price.
type CategoryDef struct {
	ID    int    `json:"category_id"`
	Name  string `json:"name"`
	Price int64  `json:"price"`
	Rows  int    `json:"rows"`
	Cols  int    `json:"cols"`
}

// ProgramDef is a program (a show) with its categories and limits.
type ProgramDef struct {
	ID          int64         `json:"program_id"`
	Name        string        `json:"name"`
	Categories  []CategoryDef `json:"categories"`
	PerOrderMax int           `json:"per_order_max"`
	PerUserMax  int           `json:"per_user_max"`
}

// Seat names one seat; its id on the wire is "<category>-<row>-<col>".
type Seat struct {
	Cat, Row, Col int
}

func (s Seat) String() string {
	return strconv.Itoa(s.Cat) + "-" + strconv.Itoa(s.Row) + "-" + strconv.Itoa(s.Col)
}

// ParseSeat parses a seat id; false for anything but three positive
// decimal numbers joined by '-'. It allocates nothing (every manual order
// parses its seats).
func ParseSeat(id string) (Seat, bool) {
	if len(id) > 24 {
		return Seat{}, false
	}
	var v [3]int
	part, start := 0, 0
	for i := 0; i <= len(id); i++ {
		if i < len(id) && id[i] != '-' {
			continue
		}
		if part == len(v) {
			return Seat{}, false
		}
		p := id[start:i]
		if p == "" || p[0] == '+' || p[0] == '0' {
			return Seat{}, false
		}
		n, err := strconv.Atoi(p)
		if err != nil || n <= 0 {
			return Seat{}, false
		}
		v[part], part, start = n, part+1, i+1
	}
	if part != len(v) {
		return Seat{}, false
	}
	return Seat{v[0], v[1], v[2]}, true
}

// Steps are the durable facts of an order's side effects besides its seats;
// each flag is written in the same atomic batch (or ledger op) as the effect
// it records, so after a crash the order record alone says what happened.
type Steps struct {
	CouponUsed bool `json:"coupon_used,omitempty"` // the coupon is marked used by this order
	Debited    bool `json:"debited,omitempty"`     // the coins were debited (ledger req "ticket:<id>")
	Refunded   bool `json:"refunded,omitempty"`    // the debit was compensated (ledger req "ticket-refund:<id>")
	CouponBack bool `json:"coupon_back,omitempty"` // the coupon was given back
	Released   bool `json:"released,omitempty"`    // the seats were released
}

// Order is a ticket order, stored as JSON at rec/torder/<id>.
type Order struct {
	OrderID   string   `json:"order_id"`
	UserID    int64    `json:"user_id"`
	ProgramID int64    `json:"program_id"`
	SeatIDs   []string `json:"seat_ids"`
	Total     int64    `json:"total"`                // the seats' prices
	Amount    int64    `json:"amount"`               // to pay: Total − Discount (coins, as prices)
	PayAmount int64    `json:"pay_amount,omitempty"` // what the provider charges (cents: Amount × pay.CentsPerCoin, its pay order's); 0 = no pay order
	CouponID  string   `json:"coupon_id,omitempty"`
	Discount  int64    `json:"discount,omitempty"`
	Pay       string   `json:"pay"`
	Status    string   `json:"status"`
	PayURL    string   `json:"pay_url,omitempty"`
	ReqID     string   `json:"req_id"`
	Saga      string   `json:"saga,omitempty"` // coins orders: SagaRunning … SagaCompensated
	Steps     Steps    `json:"steps"`
	FailCode  int      `json:"fail_code,omitempty"` // a failed saga: the failed step's error
	FailMsg   string   `json:"fail_msg,omitempty"`
	Note      string   `json:"note,omitempty"`
	CreatedAt int64    `json:"created_at"` // unix ms
	ExpiresAt int64    `json:"expires_at,omitempty"`
	UpdatedAt int64    `json:"updated_at"`

	id    int64
	seats []Seat
}

// Coupon is a one-use discount granted by an admin, stored at
// rec/tcoupon/<id>. UsedBy is the order holding it ("" = usable).
type Coupon struct {
	ID        string `json:"coupon_id"`
	UserID    int64  `json:"user_id"`
	Amount    int64  `json:"amount"`
	UsedBy    string `json:"used_by,omitempty"`
	CreatedAt int64  `json:"created_at"`
}
