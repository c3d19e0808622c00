package bench

import (
	"context"

	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/persist"
)

// ledgerDebit is the gift service's debit alone: persist.Ledger.Apply with
// the Op gift.Service builds (no catalogue lookup, no pushes, no effects).
type ledgerDebit struct{ l *persist.Ledger }

func (d ledgerDebit) debit(_ context.Context, g giftOp) error {
	amount := g.price
	op := persist.Op{
		User:  g.sender,
		ReqID: "gift:" + g.reqID,
		Postings: []persist.Posting{{User: g.sender, Delta: -amount, Reason: persist.ReasonGift,
			Ref: gift.Ref(g.room, g.giftID, 1, g.receiver, false)}},
		Tallies: []persist.Tally{{Name: gift.TallyReceived, User: g.receiver, Delta: amount}},
		Check:   func() error { return nil },
	}
	_, err := d.l.Apply(op)
	return err
}
