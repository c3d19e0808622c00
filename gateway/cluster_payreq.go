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
	"github.com/liveedge/liveedge/persist"
)

// payReqTTL is how long a (user, req_id) names its order through every node
// of a cluster once the order is written: the wallet's idempotency window.
const payReqTTL = pay.ReqBindingWindow

// payReqPending is how long a binding lasts before its order is written and
// the binding confirmed: a node that dies in between lets the req_id go
// again after it (its order was never handed out). A node whose write takes
// longer finds the binding lapsed, or another order's, at its confirm and
// closes its own order (pay.ReqClaims).
const payReqPending = time.Minute

// payReqClaims is pay.ReqClaims in Redis: liveedge:payreq:{<user>}:<req_id>
// holds "p<order id>" while pending, "<order id>" once confirmed (outside
// le:*: the shared wallet's reset after a data loss deletes the le:*
// families it rebuilds, and leaves these). Redis
// restarted empty: the confirmed bindings are rebuilt with the shared
// wallet from the orders on every node's disk (contributePayReqs); until the
// wallet is ready again, bindings are neither made nor confirmed ("retry").
type payReqClaims struct{ rdb rueidis.Client }

var _ pay.ReqClaims = payReqClaims{}

func payReqKey(user int64, req string) string {
	return "liveedge:payreq:{" + strconv.FormatInt(user, 10) + "}:" + req
}

// notReadyLua refuses a binding's change while the shared wallet (KEYS[2],
// its meta hash) is not ready: its bindings may still be on their way back.
const notReadyLua = `if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then
  return redis.error_reply('NOTREADY the shared state is being rebuilt')
end
`

// claimReqScript: setIfAbsentScript, once the wallet is ready. KEYS the
// binding, the meta hash; ARGV the pending value, its TTL in ms.
var claimReqScript = rueidis.NewLuaScript(notReadyLua + setIfAbsentLua)

// confirmScript makes KEYS[1] name order ARGV[1] for ARGV[2] ms if it is
// pending for it, confirmed for it, or gone; it returns what it names.
// KEYS[2]: the meta hash (notReadyLua).
var confirmScript = rueidis.NewLuaScript(confirmLua)

const confirmLua = notReadyLua + `
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] or v == 'p' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return v`

// unbindScript deletes KEYS[1] if it names order ARGV[1].
var unbindScript = rueidis.NewLuaScript(`
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == 'p' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// payReqID is the order a binding names.
func payReqID(v string) (int64, error) {
	id, err := strconv.ParseInt(strings.TrimPrefix(v, "p"), 10, 64)
	if err != nil || id <= 0 {
		return 0, errors.New("gateway: malformed req_id binding " + strconv.Quote(v))
	}
	return id, nil
}

func (c payReqClaims) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Second)
}

func (c payReqClaims) Claim(user int64, req string, id int64) (int64, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	v, err := claimReqScript.Exec(ctx, c.rdb, []string{payReqKey(user, req), persist.SharedMetaKey},
		[]string{"p" + strconv.FormatInt(id, 10), strconv.FormatInt(payReqPending.Milliseconds(), 10)}).ToString()
	if rueidis.IsRedisNil(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return payReqID(v)
}

func (c payReqClaims) Confirm(user int64, req string, id int64) (int64, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	v, err := confirmScript.Exec(ctx, c.rdb, []string{payReqKey(user, req), persist.SharedMetaKey},
		[]string{strconv.FormatInt(id, 10), strconv.FormatInt(payReqTTL.Milliseconds(), 10)}).ToString()
	if err != nil {
		return 0, err
	}
	return payReqID(v)
}

func (c payReqClaims) Release(user int64, req string, id int64) error {
	ctx, cancel := c.ctx()
	defer cancel()
	return unbindScript.Exec(ctx, c.rdb, []string{payReqKey(user, req)}, []string{strconv.FormatInt(id, 10)}).Error()
}

// Bound is asked only when a new order would be refused (pay.CreateOrder),
// often while Redis is away (a worker lease not held): its wait is short.
// While the shared wallet is not ready the bindings are being put back
// (contributePayReqs): an error, not "none" — the caller answers "retry".
func (c payReqClaims) Bound(user int64, req string) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	// The state first: read "ready", every binding is back by the read
	// after it (the rebuild flips it last).
	res := c.rdb.DoMulti(ctx, c.rdb.B().Hget().Key(persist.SharedMetaKey).Field("state").Build(),
		c.rdb.B().Get().Key(payReqKey(user, req)).Build())
	if state, err := res[0].ToString(); err != nil || state != "ready" {
		if err == nil || rueidis.IsRedisNil(err) {
			err = errBindingsNotReady
		}
		return 0, err
	}
	v, err := res[1].ToString()
	if rueidis.IsRedisNil(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return payReqID(v)
}

var errBindingsNotReady = errors.New("pay: req_id bindings being rebuilt")

// contributePayReqs adds the confirmed req_id bindings of this node's orders
// to a rebuilding wallet generation (persist.SharedConfig.Contribute). The
// records do not change meanwhile: a binding is confirmed only while the
// wallet is ready.
func (n *Node) contributePayReqs(since time.Time, add func(op ...string) error) error {
	return pay.ReqBindingsOnDisk(n.Store, since, func(user int64, req string, id, at int64) error {
		return add("idem", payReqKey(user, req), strconv.FormatInt(id, 10), strconv.FormatInt(at+payReqTTL.Milliseconds(), 10))
	})
}

var errReqNotConfirmed = proto.Errorf(proto.CodeInternal, "could not confirm the order of this req_id; retry with the same req_id")

var errOrderBeingMade = proto.Errorf(proto.CodeConflict, "the order of this req_id is being created; retry with the same req_id")

// createOrder creates user's order r, or answers with the order its req_id
// already names — made through another node, fetched from that node. One
// that node does not have yet is being written there (10409: retry); if
// that node died first, the binding lapses after payReqPending.
func (n *Node) createOrder(user int64, r pay.CreateReq) (pay.Order, error) {
	o, err := n.Pay.CreateOrder(user, r)
	var el *pay.OrderElsewhere
	if !errors.As(err, &el) {
		return o, err
	}
	o, err = n.orderOp("get", el.ID)
	switch {
	case err == nil && o.UserID == user:
		// Written: confirmed here too (its node may have died before
		// confirming; the binding would lapse and a retry make another).
		cur, cerr := (payReqClaims{rdb: n.Redis}).Confirm(user, r.ReqID, el.ID)
		if cerr != nil {
			// Not handed out unconfirmed (pay.confirmReq's rule): its
			// binding, if still pending, lapses, a later request makes
			// another order — and the user holds two payable orders of
			// one req_id. The retry confirms it.
			n.Log.Warn("pay: confirming a req_id failed", "user", user, "err", cerr)
			return pay.Order{}, errReqNotConfirmed
		}
		if cur != el.ID {
			// The binding lapsed meanwhile (its order's write took longer
			// than payReqPending) and a retry claimed it for another
			// order: this one is closed by its node (superseded), so it is
			// not handed out — the retry answers the order it names.
			return pay.Order{}, errOrderBeingMade
		}
		return o, nil
	case err == nil:
		return pay.Order{}, errors.New("gateway: a req_id of user " + strconv.FormatInt(user, 10) + " names another user's order")
	case proto.AsError(err).Code == proto.CodeNotFound:
		return pay.Order{}, errOrderBeingMade
	}
	return pay.Order{}, err // its node is down or busy: retry
}
