package ticket

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/liveedge/liveedge/gateway/proto"
)

// metrics are the ticket service's counters (Collectors; the node adds its
// node label).
type metrics struct {
	orders        *prometheus.CounterVec // placed orders by outcome
	closed        *prometheus.CounterVec // closed orders by reason
	compensations *prometheus.CounterVec // saga compensations by step undone
}

func newMetrics() *metrics {
	return &metrics{
		orders: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "liveedge", Name: "ticket_orders_total",
			Help: "Ticket order requests, by outcome (pending_pay, paid, sold_out, limit, conflict, coupon, balance, failed, other)."},
			[]string{"outcome"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "liveedge", Name: "ticket_orders_closed_total",
			Help: "Ticket orders closed unpaid (timeout, cancel) or refunded after the close (late_payment)."},
			[]string{"reason"}),
		compensations: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "liveedge", Name: "ticket_saga_compensations_total",
			Help: "Coins-saga compensations done, by step undone (refund, coupon, seats)."},
			[]string{"step"}),
	}
}

// Collectors returns the service's Prometheus metrics.
func (s *Service) Collectors() []prometheus.Collector {
	return []prometheus.Collector{s.m.orders, s.m.closed, s.m.compensations}
}

// outcome is the orders label of a Place result.
func outcome(o Order, err error) string {
	if err == nil {
		switch o.Status {
		case StatusPendingPay:
			return "pending_pay"
		case StatusPaid:
			return "paid"
		}
		return "other"
	}
	switch proto.AsError(err).Code {
	case proto.CodeSoldOut:
		return "sold_out"
	case proto.CodeTicketLimit:
		return "limit"
	case proto.CodeConflict:
		return "conflict"
	case proto.CodeCouponUnusable:
		return "coupon"
	case proto.CodeInsufficientBalance:
		return "balance"
	case proto.CodeInternal:
		return "failed"
	}
	return "other"
}
