package gateway

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/redpacket"
	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// Red-packet rains in a cluster are owned by the node that created them: its
// Pebble holds the record, the split and the settlement (docs/redpacket.md).
// A rain's code carries the creating node's worker id in its first character
// (redpacket.Config.CodeTag), so every other node forwards prepare, start and
// GET of that rain to the owner over NATS (the le.pay.<node> request subject
// of payment orders), with the caller's identity.
//
// Grabs are sharded (memory pool): a node serves a grab for a rain it does
// not own from a slice of packets leased from the owner, granting in its own
// Pebble (edge/redpacket/shard.go). The lease, reclaim and close requests
// between nodes travel on their own subject, le.rp.<node>, with their own
// bounded workers, so a grab storm never queues behind webhooks. With the
// seed's redis-list pool a grab is forwarded to the owner instead. The
// grabber-in-room check uses the cluster-wide presence; the 5570 credit and
// the 5560/5561 room pushes reach users on every node through the router.

var (
	errGrabNoOwner = proto.Errorf(proto.CodeRedPacketNotFound, "red packet not found or not started")
	errRainNoOwner = proto.Errorf(proto.CodeNotFound, "red packet rain not found")
)

// rainOwner returns the node that serves code ("" = this node, a single
// node, or not a code: answered here).
func (n *Node) rainOwner(code string) (string, error) {
	if n.Cluster == nil {
		return "", nil
	}
	tag, ok := redpacket.CodeTag(code)
	if !ok {
		return "", nil
	}
	if n.RedPackets != nil && n.RedPackets.Owns(code) {
		// Made here under a worker id this node no longer holds (it came
		// back under another): its anchor can still start or cancel it here.
		return "", nil
	}
	return n.workerOwner(tag)
}

// sawRainOwner renews owner as seen holding code's worker id (a grab from
// its slice succeeded) — only if Redis named it the holder last: a slice
// of a rain whose node came back under another worker id names a node
// that no longer holds this one.
func (n *Node) sawRainOwner(code, owner string) {
	if tag, ok := redpacket.CodeTag(code); ok {
		n.owners.touch(tag, owner, time.Now())
	}
}

// redPacket runs op (rp.prepare | rp.start | rp.grab | rp.get) for user on
// the rain's node and returns the reply's d as JSON.
func (n *Node) redPacket(op string, user int64, code string) ([]byte, *proto.Error) {
	if op == "rp.grab" && n.shardedRains() {
		if owner, ok := n.RedPackets.ShardOwner(code); ok {
			// A slice of it here: grabbed from it, the owner asked only
			// for more (docs/redpacket.md: while the owner is down, its
			// holders keep granting from their slices).
			b, perr := n.grabVia(owner, user, code)
			if perr == nil {
				n.sawRainOwner(code, owner) // its lease answered lately (or the slice lasted)
			}
			if redpacket.OwnerUnreachable(perr) {
				// The slice is out and the owner did not answer: gone
				// past its worker lease (Redis says so, errLeaseGone), it
				// is "not found" as below, not a retry a client would
				// make until the rain's end.
				if _, err := n.rainOwner(code); errors.Is(err, errLeaseGone) {
					return nil, errGrabNoOwner
				}
			}
			return b, perr
		}
	}
	owner, err := n.rainOwner(code)
	if err != nil {
		if errors.Is(err, errLeaseGone) {
			// No node holds the code's worker id (a made-up code, or its
			// node gone longer than a lease): nothing to grab or show —
			// not "retry", which a client would do for ever. (Redis not
			// answering is a retry: it could not tell.)
			switch op {
			case "rp.grab":
				return nil, errGrabNoOwner
			case "rp.get":
				return nil, errRainNoOwner
			}
		}
		return nil, proto.AsError(err)
	}
	if owner == "" {
		return n.redPacketLocal(op, user, code)
	}
	if op == "rp.grab" && n.shardedRains() {
		return n.grabVia(owner, user, code)
	}
	rep, err := n.forwardPay(owner, payFwdReq{Op: op, User: user, Code: code})
	if err != nil {
		return nil, proto.AsError(err)
	}
	return rep.Data, rep.Err
}

// grabVia grabs a packet of code, run by owner, from this node's slice.
func (n *Node) grabVia(owner string, user int64, code string) ([]byte, *proto.Error) {
	rep, perr := n.RedPackets.GrabVia(owner, user, code)
	if perr != nil {
		return nil, perr
	}
	return n.replyData(rep, nil)
}

func (n *Node) redPacketLocal(op string, user int64, code string) ([]byte, *proto.Error) {
	if user <= 0 && op != "rp.get" {
		return nil, &proto.Error{Code: proto.CodeUnauthenticated, Msg: "no caller"} // a forwarded op always names its caller
	}
	var v any
	var err error
	switch op {
	case "rp.prepare":
		v, err = n.RedPackets.Prepare(user, code)
	case "rp.start":
		v, err = n.RedPackets.Start(user, code)
	case "rp.cancel":
		v, err = n.RedPackets.Cancel(user, code)
	case "rp.get":
		v, err = n.RedPackets.Get(code)
	case "rp.grab":
		var perr *proto.Error
		v, perr = n.RedPackets.Grab(user, code)
		if perr != nil {
			return nil, perr
		}
	default:
		return nil, proto.BadRequest("unknown red-packet op")
	}
	return n.replyData(v, err)
}

// replyData is a locally served op's outcome as a reply's d (JSON) or its
// error, as the forwarding answers it.
func (n *Node) replyData(v any, err error) ([]byte, *proto.Error) {
	if err != nil {
		return nil, n.wireErr(err)
	}
	b, merr := proto.Marshal(v)
	if merr != nil {
		return nil, n.wireErr(merr)
	}
	return b, nil
}

// wireErr is wireError for an op served here: an error that is not one of
// ours (a disk or Redis failure) is logged with its cause and an id, and
// answered with that id — the client's 50000 (on whichever node it asked)
// then names the log line, as HTTP's own failures do.
func (n *Node) wireErr(err error) *proto.Error {
	e := wireError(err)
	if e != proto.ErrInternal {
		return e
	}
	id := n.errIDs.Add(1)
	n.Log.Error("request failed", "error_id", id, "err", err)
	return &proto.Error{Code: proto.CodeInternal, Msg: fmt.Sprintf("internal error (node %s, error %d)", n.Config.Node.ID, id)}
}

// grabAsync serves a grab frame. A rain of this node on a single node (or
// with the redis-list pool) is grabbed with GrabAsync: the reader hands off
// at the ledger. Every other grab may wait on Redis (one per user) or on
// other nodes (a lease, a reclaim round, a forward): on a goroutine of its
// own, bounded by the connection's in-flight limit.
func (n *Node) grabAsync(user int64, code string, done func(any, *proto.Error)) {
	if !n.grabs.Allow(uint64(user)) {
		done(nil, proto.ErrRateLimited)
		return
	}
	// Only what memory tells is asked here, on the connection's reader:
	// who runs the rain may be a Redis read (up to its timeout).
	if n.grabsHere(code) {
		// With Redis in use (grabWaits) the connection's lane runs this.
		n.RedPackets.GrabAsync(user, code, func(rep redpacket.GrabReply, perr *proto.Error) {
			if perr != nil {
				done(nil, perr)
				return
			}
			done(rep, nil)
		})
		return
	}
	go func() {
		b, perr := n.redPacket("rp.grab", user, code)
		if perr != nil {
			done(nil, perr)
			return
		}
		done(b, nil)
	}()
}

// grabWaits reports whether a grab of code may wait on Redis where it is
// served (grabAsync's first branch with Redis in use: the rain's packets in
// a Redis list, the user's place there, the shared grab count, an account's
// status): the gateway serves it on the connection's lane, off its reader.
func (n *Node) grabWaits(code string) bool { return n.Redis != nil && n.grabsHere(code) }

// grabsHere reports whether a grab of code is served by this node's red
// packet service where it arrives (a single node, or the rain's own node
// with its packets in a Redis list), not forwarded to the rain's node.
func (n *Node) grabsHere(code string) bool {
	return n.Cluster == nil || n.RedPackets.Owns(code) && !n.shardedRains()
}

// shardedRains reports whether grabs are served from slices on every node (a
// cluster with the memory pool).
func (n *Node) shardedRains() bool {
	return n.Cluster != nil && n.Config.RedPacket.Pool != "redis-list"
}

// rpShardWorkers bounds the lease, reclaim and close requests a node serves
// at once.
const rpShardWorkers = 64

func rpSubject(node string) string { return "le.rp." + node }

type rpShardReq struct {
	Op      string                `json:"op"` // lease | reclaim | close | recover
	Lease   *redpacket.LeaseReq   `json:"lease,omitempty"`
	Reclaim *redpacket.ReclaimReq `json:"reclaim,omitempty"`
	Recover *redpacket.RecoverReq `json:"recover,omitempty"`
	Code    string                `json:"code,omitempty"` // close
}

type rpShardRep struct {
	Lease   *redpacket.LeaseRep    `json:"lease,omitempty"`
	Packets []redpacket.Packet     `json:"packets,omitempty"`
	Left    int                    `json:"left,omitempty"` // reclaim: unused packets the holder still has
	Held    *int                   `json:"held,omitempty"` // reclaim: packets the holder received and did not give back (absent from an older node)
	Totals  *redpacket.ShardTotals `json:"totals,omitempty"`
	Recover *redpacket.RecoverRep  `json:"recover,omitempty"`
	Err     *proto.Error           `json:"err,omitempty"`
	Fail    string                 `json:"fail,omitempty"` // a non-protocol error (close not complete)
}

// serveRedPacketShards answers other nodes' lease, reclaim and close
// requests for sharded rains. A reclaim is a mutex operation: answered in
// the subscription's callback, so it never waits behind leases (an owner's
// lease can be waiting for a reclaim round on another node). Leases and
// closes run on at most rpShardWorkers goroutines; with none free the answer
// is "busy" at once (the asking node retries) rather than a queue that
// answers after its caller has given up.
func (n *Node) serveRedPacketShards() error {
	sem := make(chan struct{}, rpShardWorkers)
	sub, err := n.NC.Subscribe(rpSubject(n.Config.Node.ID), func(m *nats.Msg) {
		arrived := time.Now()
		if !n.rpWork.enter() { // stopping: RedPackets and the store close next
			respond(m, rpShardRep{Err: errShardBusy})
			return
		}
		defer n.rpWork.leave()
		var req rpShardReq
		if err := proto.Unmarshal(m.Data, &req); err != nil {
			respond(m, rpShardRep{Err: proto.BadRequest("bad red-packet shard request")})
			return
		}
		if req.Op == "reclaim" && req.Reclaim != nil {
			rc := n.RedPackets.ServeReclaim(*req.Reclaim)
			respond(m, rpShardRep{Packets: rc.Packets, Left: rc.Left, Held: &rc.Held})
			return
		}
		select {
		case sem <- struct{}{}:
		default:
			respond(m, rpShardRep{Err: errShardBusy})
			return
		}
		n.rpWork.also() // its goroutine's, while this callback's holds the gate
		go func() {
			defer func() { <-sem }()
			defer n.rpWork.leave()
			var rep rpShardRep
			switch {
			case req.Op == "lease" && req.Lease != nil:
				l, err := n.RedPackets.ServeLease(*req.Lease, arrived)
				if err != nil {
					rep.Err = proto.AsError(err)
				} else {
					rep.Lease = &l
				}
			case req.Op == "close":
				t, err := n.RedPackets.ServeClose(req.Code)
				rep.Err, rep.Fail = shardFailure(err)
				if err == nil {
					rep.Totals = &t
				}
			case req.Op == "recover" && req.Recover != nil:
				h, err := n.RedPackets.ServeRecover(*req.Recover)
				rep.Err, rep.Fail = shardFailure(err)
				if err == nil {
					rep.Recover = &h
				}
			default:
				rep.Err = proto.BadRequest("unknown red-packet shard op")
			}
			respond(m, rep)
		}()
	})
	n.rpSub = sub
	return err
}

// workGate counts work in flight that must end before what it uses closes:
// enter refuses once stop began, stop waits for the work entered.
type workGate struct {
	mu      sync.Mutex
	stopped bool
	wg      sync.WaitGroup
}

func (g *workGate) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopped {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *workGate) leave() { g.wg.Done() }

// also enters more work on behalf of work entered and not left yet (stop is
// still waiting for it: never refused).
func (g *workGate) also() { g.wg.Add(1) }

func (g *workGate) stop() {
	g.mu.Lock()
	g.stopped = true
	g.mu.Unlock()
	g.wg.Wait()
}

// shardFailure is err as a shard answer: a protocol error, or a failure
// that is not one (a close not complete, a store error).
func shardFailure(err error) (*proto.Error, string) {
	if pe := (*proto.Error)(nil); errors.As(err, &pe) {
		return pe, ""
	} else if err != nil {
		return nil, err.Error()
	}
	return nil, ""
}

var errShardBusy = proto.Errorf(proto.CodeInternal, "the red packet's node is busy, retry")

// rpPeers is redpacket.Peers over NATS request/reply.
type rpPeers struct{ n *Node }

func (p rpPeers) call(ctx context.Context, node string, req rpShardReq) (rpShardRep, error) {
	var rep rpShardRep
	b, err := proto.Marshal(req)
	if err != nil {
		return rep, err
	}
	m, err := p.n.NC.RequestWithContext(ctx, rpSubject(node), b)
	if err != nil {
		return rep, errors.New("red packet shard " + req.Op + " on " + node + ": " + err.Error())
	}
	data, err := answerData(m)
	if err != nil {
		return rep, err
	}
	if err := proto.Unmarshal(data, &rep); err != nil {
		return rep, err
	}
	if rep.Err != nil {
		return rep, rep.Err
	}
	if rep.Fail != "" {
		return rep, errors.New(rep.Fail)
	}
	return rep, nil
}

func (p rpPeers) Lease(ctx context.Context, owner string, req redpacket.LeaseReq) (redpacket.LeaseRep, error) {
	rep, err := p.call(ctx, owner, rpShardReq{Op: "lease", Lease: &req})
	if err != nil {
		return redpacket.LeaseRep{}, err
	}
	if rep.Lease == nil {
		return redpacket.LeaseRep{}, errors.New("red packet lease: empty answer")
	}
	return *rep.Lease, nil
}

func (p rpPeers) Reclaim(ctx context.Context, holder string, req redpacket.ReclaimReq) (redpacket.ReclaimRep, error) {
	rep, err := p.call(ctx, holder, rpShardReq{Op: "reclaim", Reclaim: &req})
	held := -1
	if rep.Held != nil {
		held = *rep.Held
	}
	return redpacket.ReclaimRep{Packets: rep.Packets, Left: rep.Left, Held: held}, err
}

func (p rpPeers) Close(ctx context.Context, holder, code string) (redpacket.ShardTotals, error) {
	rep, err := p.call(ctx, holder, rpShardReq{Op: "close", Code: code})
	if err != nil {
		return redpacket.ShardTotals{}, err
	}
	if rep.Totals == nil {
		return redpacket.ShardTotals{}, errors.New("red packet close: empty answer")
	}
	return *rep.Totals, nil
}

func (p rpPeers) Recover(ctx context.Context, holder string, req redpacket.RecoverReq) (redpacket.RecoverRep, error) {
	rep, err := p.call(ctx, holder, rpShardReq{Op: "recover", Recover: &req})
	if err != nil {
		return redpacket.RecoverRep{}, err
	}
	if rep.Recover == nil {
		return redpacket.RecoverRep{}, errors.New("red packet recover: empty answer")
	}
	return *rep.Recover, nil
}

// rainClaimKey is the set of users who have a packet of rain code (one per
// user, shared by every node).
func rainClaimKey(code string) string { return rainClaimPrefix + "{" + code + "}" }

// rainTokenKey is the hash of rain code's places taken by a grab: user →
// the token of the grab attempt that took it (redpacket.Config.Claim). A
// member of the set with no token here (rebuilt from a grant, or taken by
// a node of an older version) is held for good. Under rainClaimPrefix, so a
// wallet reset deletes it with the sets; nothing rebuilds it.
func rainTokenKey(code string) string { return rainClaimKey(code) + ":tok" }

// rainClaimPrefix is the prefix of the rains' one-per-user sets (rebuilt
// with the shared wallet: persist.SharedConfig.ContributedPrefixes).
const rainClaimPrefix = "le:rpu:"

// claimScript gives a user a place in a rain's set for a grab attempt (its
// token) and sets the keys' expiry in one step: {1, generation} if the user
// was not in it, or their place was held by one of ARGV[4…] (grabs of the
// same node known to have granted nothing: a claim's reply lost, a release
// not answered), which the token now replaces — the shared wallet's
// generation the place is in, which the grant is pinned to; {0} if another
// attempt holds it; {-1} while the shared wallet is not ready (Redis lost
// its data: the sets are being rebuilt from the nodes' grants with the
// wallet, contributeRainClaims). KEYS set, tokens, meta; ARGV user, expiry,
// token, then the attempts it may replace.
var claimScript = rueidis.NewLuaScript(`local meta = redis.call('HMGET', KEYS[3], 'state', 'gen')
if meta[1] ~= 'ready' or not meta[2] then return {-1} end
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
  local holder = redis.call('HGET', KEYS[2], ARGV[1])
  if not holder then return {0} end
  local mine = holder == ARGV[3]
  for i = 4, #ARGV do
    if holder == ARGV[i] then mine = true end
  end
  if not mine then return {0} end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[2], ARGV[2])
return {1, meta[2]}`)

// unclaimScript gives a user's place back if the grab attempt ARGV[2] still
// holds it (a later attempt that took it back keeps it). KEYS set, tokens.
var unclaimScript = rueidis.NewLuaScript(`if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[1], ARGV[1])
return 1`)

// rainClaimSlack is how long a rain's set outlives the rain's end.
const rainClaimSlack = time.Hour

// claimRain and unclaimRain keep redpacket's one-per-user places in Redis.
// A place taken names the wallet generation it is in (claimScript).
func (n *Node) claimRain(ctx context.Context, code string, user int64, until int64, token string, prev []string) (bool, string, error) {
	args := append([]string{strconv.FormatInt(user, 10), strconv.FormatInt(until+rainClaimSlack.Milliseconds(), 10), token}, prev...)
	out, err := claimScript.Exec(ctx, n.Redis, []string{rainClaimKey(code), rainTokenKey(code), persist.SharedMetaKey}, args).ToArray()
	if err != nil {
		return false, "", err
	}
	if len(out) == 0 {
		return false, "", errors.New("red packet claim: empty answer")
	}
	switch added, err := out[0].AsInt64(); {
	case err != nil:
		return false, "", err
	case added < 0:
		return false, "", redpacket.ErrClaimsUnavailable
	case added == 0:
		return false, "", nil
	}
	if len(out) < 2 {
		return false, "", errors.New("red packet claim: no generation in the answer")
	}
	gen, err := out[1].ToString()
	return err == nil, gen, err
}

func (n *Node) unclaimRain(ctx context.Context, code string, user int64, token string) error {
	return unclaimScript.Exec(ctx, n.Redis, []string{rainClaimKey(code), rainTokenKey(code)}, []string{strconv.FormatInt(user, 10), token}).Error()
}

// contributeRainClaims adds the one-per-user places of this node's grants to
// a rebuilding wallet generation (persist.SharedConfig.Contribute): Redis
// lost the sets, and a user granted a packet must not get a second one —
// the durable grants, and those in doubt (their ledger op may land later:
// applied again at the rain's end). Neither changes meanwhile (a grant is a
// wallet op, refused until the generation is ready; so is a claim,
// claimScript).
func (n *Node) contributeRainClaims(since time.Time, add func(op ...string) error) error {
	place := func(code string, user int64, until int64) error {
		return add("sadd", rainClaimKey(code), strconv.FormatInt(user, 10), strconv.FormatInt(until+rainClaimSlack.Milliseconds(), 10))
	}
	if err := redpacket.ClaimsOnDisk(n.Store, n.Config.RedPacket.MaxDuration.D(), since, place); err != nil {
		return err
	}
	if rp := n.rains.Load(); rp != nil {
		return rp.InDoubtClaims(place)
	}
	return nil
}
