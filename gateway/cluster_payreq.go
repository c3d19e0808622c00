package gateway

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/pay"
	"github.com/liveedge/liveedge/gateway/proto"
)

// payReqTTL is how long a (user, req_id) names its order through every node
// of a cluster: the wallet's idempotency window.
const payReqTTL = 25 * time.Hour

// payReqTakeover is how long a req_id bound to an order its node says it
// does not have is left alone (the order is being written there) before
// another node may bind it again: its node died between binding and
// writing, or stalled that long (it then closes its late order itself).
const payReqTakeover = 30 * time.Second

// payReqClaims is pay.ReqClaims in Redis: le:payreq:{<user>}:<req_id> holds
// "<order id>:<unix ms bound>".
type payReqClaims struct {
	rdb rueidis.Client
	now func() time.Time
}

var _ pay.ReqClaims = payReqClaims{}

func payReqKey(user int64, req string) string {
	return "le:payreq:{" + strconv.FormatInt(user, 10) + "}:" + req
}

// bindScript sets KEYS[1] to ARGV[1] for ARGV[2] ms unless it holds a value:
// that value is returned (nil: bound now).
var bindScript = rueidis.NewLuaScript(`
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false`)

// unbindScript deletes KEYS[1] if it names order ARGV[1].
var unbindScript = rueidis.NewLuaScript(`
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+):') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

func parsePayReq(v string) (id, at int64, err error) {
	ids, ats, ok := strings.Cut(v, ":")
	if id, err = strconv.ParseInt(ids, 10, 64); err != nil || !ok {
		return 0, 0, errors.New("gateway: malformed req_id binding " + strconv.Quote(v))
	}
	at, err = strconv.ParseInt(ats, 10, 64)
	return id, at, err
}

func (c payReqClaims) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Second)
}

func (c payReqClaims) Claim(user int64, req string, id int64) (int64, time.Duration, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	now := c.now()
	v, err := bindScript.Exec(ctx, c.rdb, []string{payReqKey(user, req)},
		[]string{strconv.FormatInt(id, 10) + ":" + strconv.FormatInt(now.UnixMilli(), 10),
			strconv.FormatInt(payReqTTL.Milliseconds(), 10)}).ToString()
	if rueidis.IsRedisNil(err) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, err
	}
	prev, at, err := parsePayReq(v)
	if err != nil {
		return 0, 0, err
	}
	return prev, now.Sub(time.UnixMilli(at)), nil
}

func (c payReqClaims) Bound(user int64, req string) (int64, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	v, err := c.rdb.Do(ctx, c.rdb.B().Get().Key(payReqKey(user, req)).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	id, _, err := parsePayReq(v)
	return id, err
}

func (c payReqClaims) Release(user int64, req string, id int64) error {
	ctx, cancel := c.ctx()
	defer cancel()
	return unbindScript.Exec(ctx, c.rdb, []string{payReqKey(user, req)}, []string{strconv.FormatInt(id, 10)}).Error()
}

var errOrderBeingMade = proto.Errorf(proto.CodeConflict, "the order of this req_id is being created; retry with the same req_id")

// createOrder creates user's order r, or answers with the order its req_id
// already names — made through another node, fetched from that node.
func (n *Node) createOrder(user int64, r pay.CreateReq) (pay.Order, error) {
	for attempt := 0; ; attempt++ {
		o, err := n.Pay.CreateOrder(user, r)
		var el *pay.OrderElsewhere
		if !errors.As(err, &el) {
			return o, err
		}
		o, err = n.orderOp("get", el.ID)
		switch {
		case err == nil && o.UserID == user:
			return o, nil
		case err == nil:
			return pay.Order{}, errors.New("gateway: a req_id of user " + strconv.FormatInt(user, 10) + " names another user's order")
		case proto.AsError(err).Code != proto.CodeNotFound:
			return pay.Order{}, err // its node is down or busy: retry
		case el.Age < payReqTakeover || attempt > 0:
			return pay.Order{}, errOrderBeingMade
		}
		// Its node answered, long after the binding, that it has no such
		// order: it died before writing it. Bind the req_id afresh.
		if err := (payReqClaims{rdb: n.Redis, now: time.Now}).Release(user, r.ReqID, el.ID); err != nil {
			return pay.Order{}, errOrderBeingMade
		}
	}
}
