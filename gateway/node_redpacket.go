package gateway

import (
	"cmp"
	"context"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/edge/limit"
	"github.com/liveedge/liveedge/edge/redpacket"
)

// newRedPackets builds the red-packet service (after the rooms, the wallet
// and the router) and restores the rains a previous run left unfinished. A
// grabber must have a session joined to the rain's room (router.UserInRoom: in a
// cluster on any live node; a presence that could not be read is 50000).
func (n *Node) newRedPackets() (err error) {
	cfg := n.Config.RedPacket
	var pool redpacket.Pool = redpacket.NewMemoryPool()
	if cfg.Pool == "redis-list" {
		// A list outlives its rain by an hour at most (its longest duration,
		// then the settlement's time) when nothing dropped it.
		pool = &redpacket.RedisListPool{Client: n.Redis, TTL: cfg.MaxDuration.D() + time.Hour}
	}
	var peers redpacket.Peers
	var claim func(context.Context, string, int64, int64, string, []string) (bool, string, error)
	var unclaim func(context.Context, string, int64, string) error
	if n.shardedRains() {
		peers, claim, unclaim = rpPeers{n}, n.claimRain, n.unclaimRain
	}
	var roomRun func(context.Context, int64, string, int64) (bool, error)
	var roomDone func(context.Context, int64, string) error
	var creates, prepares, starts *limit.Shared
	if n.Cluster != nil {
		roomRun, roomDone = n.runRainInRoom, n.rainDoneInRoom
		// An anchor's rains are counted on every node (as this one's), and
		// so are its prepares and starts (one per interval; nil: no limit).
		creates = limit.NewShared(n.Redis, "rpnew", redpacket.DefaultCreatesPerMinute, time.Minute, redpacket.CreateBurst)
		prepares = limit.NewShared(n.Redis, "rpprep", 1, cfg.PrepareInterval.D(), 1)
		starts = limit.NewShared(n.Redis, "rpstart", 1, cfg.StartInterval.D(), 1)
	}
	n.grabs = limit.New(cfg.GrabsPerSecond, time.Second, max(1, cfg.GrabsPerSecond), nil)
	var grabs *limit.Shared
	if n.Cluster != nil && !cfg.OnePerUser {
		// One grab per grab_interval per user and rain across the nodes:
		// with one packet per user, the user's Redis place bounds it
		// already; without, each node counted only its own grabs.
		grabs = limit.NewShared(n.Redis, "rpgrab", 1, cfg.GrabInterval.D(), 1)
	}
	n.RedPackets, err = redpacket.New(n.Store, n.Wallet, n.Router, redpacket.Config{
		Peers: peers, Claim: claim, Unclaim: unclaim, RoomRun: roomRun, RoomDone: roomDone,
		Node: n.Config.Node.ID, Pool: pool,
		AnchorOf: n.Rooms.AnchorOf, InRoom: n.Router.UserInRoom,
		Frozen:   n.Accounts.Frozen,
		MaxCount: cfg.MaxCount, MaxTotal: cfg.MaxTotal, MaxDuration: cfg.MaxDuration.D(),
		MaxPerAnchor: cfg.MaxPerAnchor, OnePerUser: cfg.OnePerUser,
		PrepareInterval: cfg.PrepareInterval.D(), StartInterval: cfg.StartInterval.D(),
		GrabInterval: cfg.GrabInterval.D(), CodeTag: n.codeTag(), TagHeld: n.codeTagHeld(),
		SharedCreates: creates, SharedPrepares: prepares, SharedStarts: starts, SharedGrabs: grabs,
	}, n.Log)
	if err != nil {
		return err
	}
	n.Rooms.SetRedPacket(n.activeRain)
	n.rains.Store(n.RedPackets)
	return nil
}

// codeTag is the worker id that new rain codes carry in a cluster (their
// node, found from the code by any other node), -1 on a single node.
func (n *Node) codeTag() int {
	if n.Cluster == nil || n.worker == nil {
		return -1
	}
	return n.worker.ID()
}

// codeTagHeld reports whether this node holds its code tag's worker id
// now (nil on a single node: always).
func (n *Node) codeTagHeld() func() bool {
	if n.Cluster == nil || n.worker == nil {
		return nil
	}
	return n.worker.Held
}

// rainRoomKey holds the code of room's running rain (a cluster: the room's
// rains may be owned by different nodes).
func rainRoomKey(room int64) string { return "le:rprun:{" + strconv.FormatInt(room, 10) + "}" }

// rainDoneScript deletes a room's running-rain key only if code still holds it.
var rainDoneScript = rueidis.NewLuaScript(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`)

// rainRunScript makes ARGV[1] the room's running rain until ARGV[2] (Unix
// ms) if no other rain is, extending its time if it already is: 1, else 0.
var rainRunScript = rueidis.NewLuaScript(`local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
return 1`)

// activeRain is the rain code room info shows: the room's running rain,
// else — to its anchor — this node's latest prepared one. In a cluster the running rain may
// be another node's: when this node runs none there, it is read from the
// room's running-rain key (cached on this node, invalidated by Redis when
// it changes, at most a second old) — a viewer of another node joining
// after the rain's 5560 learns its code there as on the owner's node.
func (n *Node) activeRain(room int64, anchor bool) string {
	running, prepared := n.RedPackets.Codes(room)
	if !anchor {
		// A rain not started yet is the anchor's: shown to viewers, a bot
		// polling room info learnt its code (and size) before the 5560
		// and grabbed the moment it started, ahead of everyone it was for.
		prepared = ""
	}
	if running != "" || n.Cluster == nil {
		return cmp.Or(running, prepared)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if code, err := n.Redis.DoCache(ctx, n.Redis.B().Get().Key(rainRoomKey(room)).Cache(), time.Second).ToString(); err == nil && code != "" {
		return code
	} else if err != nil && !rueidis.IsRedisNil(err) {
		n.Log.Debug("room info: running rain not read", "room", room, "err", err)
	}
	return prepared
}

func (n *Node) runRainInRoom(ctx context.Context, room int64, code string, until int64) (bool, error) {
	ok, err := rainRunScript.Exec(ctx, n.Redis, []string{rainRoomKey(room)}, []string{code, strconv.FormatInt(until, 10)}).AsInt64()
	return ok == 1, err
}

func (n *Node) rainDoneInRoom(ctx context.Context, room int64, code string) error {
	return rainDoneScript.Exec(ctx, n.Redis, []string{rainRoomKey(room)}, []string{code}).Error()
}
