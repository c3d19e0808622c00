package bench

import (
	"context"
	"strconv"
	"time"

	"github.com/liveedge/liveedge/edge/gift"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// ledgerDebit is the gift service's debit alone: persist.Ledger.Apply with
// the Op gift.Service builds (no catalogue lookup, no pushes, no effects).
type ledgerDebit struct{ l *persist.Ledger }

func (d ledgerDebit) debit(_ context.Context, g giftOp) error {
	amount := g.price
	op := persist.Op{
		User:     g.sender,
		ReqID:    "gift:" + g.reqID,
		Postings: []persist.Posting{{User: g.sender, Delta: -amount, Reason: persist.ReasonGift, Ref: "gift to " + strconv.FormatInt(g.receiver, 10)}},
		Tallies:  []persist.Tally{{Name: gift.TallyReceived, User: g.receiver, Delta: amount}},
		Check:    func() error { return nil },
		Records: func(ids []int64) []persist.Record {
			rec := gift.Record{OrderID: strconv.FormatInt(ids[0], 10), SenderID: g.sender, ReceiverID: g.receiver,
				RoomID: g.room, GiftID: g.giftID, Count: 1, Price: g.price, Amount: amount, ReqID: g.reqID,
				At: time.Now().UnixMilli()}
			v, _ := proto.Marshal(rec)
			return []persist.Record{{Key: append([]byte("rec/gift/"), rec.OrderID...), Value: v}}
		},
	}
	_, err := d.l.Apply(op)
	return err
}
