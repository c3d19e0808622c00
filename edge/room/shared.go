package room

import (
	"context"
	_ "embed"
	"errors"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
)

// Redis keys of the cluster's rooms; one hash tag, so both scripts stay in one
// Redis Cluster slot (room metadata is small: rooms are opened by anchors at
// most once per open_close_interval).
const (
	keyOpen    = "le:{rooms}:open"   // id → record of each open room
	keyAnchors = "le:{rooms}:anchor" // anchor → id of its open room
	keySeq     = "le:{rooms}:seq"    // the id counter
	keyRecords = "le:{rooms}:rec"    // id → record of each open room (and of rooms closed before ClosedRecordTTL)
)

// closedKey holds a closed room's record for ClosedRecordTTL.
func closedKey(id int64) string { return "le:{rooms}:closed:" + strconv.FormatInt(id, 10) }

// ClosedRecordTTL is how long a closed room's record is kept in Redis (GET
// /rooms/{id} of a closed room answers from it; later, 10004).
const ClosedRecordTTL = 7 * 24 * time.Hour

func rateKey(anchor int64) string { return "le:{rooms}:rl:" + strconv.FormatInt(anchor, 10) }

var (
	//go:embed lua/open.lua
	openLua string
	//go:embed lua/close.lua
	closeLua    string
	openScript  = rueidis.NewLuaScript(openLua)
	closeScript = rueidis.NewLuaScript(closeLua)
)

// Shared keeps the rooms of a cluster in Redis: ids from one counter, one open
// room per anchor and the open/close rate limit checked atomically by one
// script each, whichever node the request reaches. Every node's Service holds
// a replica of the open rooms (Sync, plus the opened/closed events other
// nodes publish).
type Shared struct {
	Client  rueidis.Client
	Timeout time.Duration // per call (0 = 2 s)
}

func (sh *Shared) ctx() (context.Context, context.CancelFunc) {
	d := sh.Timeout
	if d <= 0 {
		d = 2 * time.Second
	}
	return context.WithTimeout(context.Background(), d)
}

func keys(anchor int64) []string {
	return []string{keyOpen, keyAnchors, keySeq, rateKey(anchor), keyRecords}
}

func decodeRecord(v string) (Room, error) {
	var rm Room
	err := proto.Unmarshal([]byte(v), &rm)
	return rm, err
}

// open returns the anchor's open room (created = false) or a new one.
func (sh *Shared) open(anchor int64, typ int, now time.Time, interval time.Duration, seen int64) (rm Room, created bool, err error) {
	ctx, cancel := sh.ctx()
	defer cancel()
	arr, err := openScript.Exec(ctx, sh.Client, keys(anchor), []string{
		strconv.FormatInt(anchor, 10), strconv.Itoa(typ), strconv.FormatInt(now.UnixMilli(), 10),
		strconv.FormatInt(interval.Milliseconds(), 10), strconv.FormatInt(seen, 10)}).ToArray()
	if err != nil {
		return Room{}, false, err
	}
	code, _ := arr[0].AsInt64()
	switch code {
	case 0, 1:
		v, err := arr[1].ToString()
		if err != nil {
			return Room{}, false, err
		}
		rm, err := decodeRecord(v)
		return rm, code == 1, err
	case 2:
		return Room{}, false, proto.ErrRateLimited
	}
	return Room{}, false, errors.New("room: open script: bad reply")
}

func (sh *Shared) close(anchor, id int64, now time.Time, interval time.Duration) (Room, error) {
	ctx, cancel := sh.ctx()
	defer cancel()
	arr, err := closeScript.Exec(ctx, sh.Client, append(keys(anchor), closedKey(id)), []string{
		strconv.FormatInt(id, 10), strconv.FormatInt(anchor, 10), strconv.FormatInt(now.UnixMilli(), 10),
		strconv.FormatInt(interval.Milliseconds(), 10), strconv.FormatInt(ClosedRecordTTL.Milliseconds(), 10)}).ToArray()
	if err != nil {
		return Room{}, err
	}
	code, _ := arr[0].AsInt64()
	switch code {
	case 1:
		v, err := arr[1].ToString()
		if err != nil {
			return Room{}, err
		}
		return decodeRecord(v)
	case 2:
		return Room{}, proto.ErrRateLimited
	case 3:
		return Room{}, proto.Errorf(proto.CodeConflict, "room already closed")
	case 4:
		return Room{}, proto.ErrNotFound
	case 5:
		return Room{}, proto.Errorf(proto.CodeForbidden, "not the room's anchor")
	}
	return Room{}, errors.New("room: close script: bad reply")
}

// load reads any room's record (open, or closed within ClosedRecordTTL).
func (sh *Shared) load(id int64) (Room, error) {
	ctx, cancel := sh.ctx()
	defer cancel()
	v, err := sh.Client.Do(ctx, sh.Client.B().Hget().Key(keyRecords).Field(strconv.FormatInt(id, 10)).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		v, err = sh.Client.Do(ctx, sh.Client.B().Get().Key(closedKey(id)).Build()).ToString()
	}
	if rueidis.IsRedisNil(err) {
		return Room{}, proto.ErrNotFound
	}
	if err != nil {
		return Room{}, err
	}
	return decodeRecord(v)
}

// openRooms reads every open room. lost reports that Redis has lost the
// rooms' data (the id counter, which never goes away otherwise, is missing).
func (sh *Shared) openRooms() (rooms []Room, lost bool, err error) {
	ctx, cancel := sh.ctx()
	defer cancel()
	res := sh.Client.DoMulti(ctx, sh.Client.B().Hgetall().Key(keyOpen).Build(), sh.Client.B().Exists().Key(keySeq).Build())
	m, err := res[0].AsStrMap()
	if err != nil {
		return nil, false, err
	}
	n, err := res[1].AsInt64()
	if err != nil {
		return nil, false, err
	}
	lost = n == 0
	out := make([]Room, 0, len(m))
	for _, v := range m {
		rm, err := decodeRecord(v)
		if err != nil {
			return nil, false, err
		}
		out = append(out, rm)
	}
	return out, lost, nil
}

// restore writes open rooms a node still knows back into a Redis that lost
// them (each only if absent), and lifts the id counter above them, so ids
// stay unique and the rooms stay open. A room whose anchor has another open
// room in Redis now (opened after the loss) is not put back: it is
// returned, closed — its anchor keeps one open room, and the room would be
// unclosable (close.lua: not that anchor's room).
func (sh *Shared) restore(rooms []Room) (closed []Room, err error) {
	ctx, cancel := sh.ctx()
	defer cancel()
	cmds := make([]rueidis.Completed, 0, len(rooms)+1)
	var top int64
	for _, rm := range rooms {
		v, err := proto.Marshal(rm)
		if err != nil {
			return nil, err
		}
		cmds = append(cmds, restoreScript(sh.Client, rm, string(v)))
		top = max(top, rm.ID)
	}
	cmds = append(cmds, raiseScript(sh.Client, top))
	res := sh.Client.DoMulti(ctx, cmds...)
	for i, r := range res {
		if err := r.Error(); err != nil {
			return nil, err
		}
		if i < len(rooms) {
			if n, _ := r.AsInt64(); n == 0 {
				rm := rooms[i]
				rm.Status = StatusClosed
				closed = append(closed, rm)
			}
		}
	}
	return closed, nil
}

// restoreScript puts room rm (record v) back unless its anchor has another
// open room (0 then, else 1); EVAL of a few lines, as raiseScript.
func restoreScript(c rueidis.Client, rm Room, v string) rueidis.Completed {
	return c.B().Eval().Script(`local a = redis.call('HGET', KEYS[2], ARGV[2])
if a and a ~= ARGV[1] then return 0 end
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[3])
return 1`).Numkeys(3).Key(keyOpen, keyAnchors, keyRecords).
		Arg(strconv.FormatInt(rm.ID, 10), strconv.FormatInt(rm.AnchorID, 10), v).Build()
}

// raiseScript sets the id counter to at least top (EVAL of a one-liner: the
// counter only moves up).
func raiseScript(c rueidis.Client, top int64) rueidis.Completed {
	return c.B().Eval().Script(`local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end return 0`).
		Numkeys(1).Key(keySeq).Arg(strconv.FormatInt(top, 10)).Build()
}
