package gateway

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
)

// A chat sent with a req_id (extension) is posted once: the same (user,
// req_id) within chatOnceTTL answers the first chat's mid and publishes
// nothing — a client's retry after a timeout or a reconnect, on any node of
// a cluster. One still being sent, or not confirmed (a cluster's sequencer
// that did not answer in time: the push may still go out), is answered
// 10409 until its fate is known (its mid then kept, or its claim released:
// router.PublishRoomBy) or its claim expires — after its chat can no longer
// go out (chatSendBy). A chat refused (rate limit, room busy or gone)
// leaves no trace: its retry is sent.
const (
	chatOnceTTL = 2 * time.Minute
	// chatInFlightTTL bounds a claim whose chat is being sent or was not
	// confirmed (its node may have died meanwhile). Its chat is numbered
	// within the first half of it or never (chatSendBy).
	chatInFlightTTL = 2 * time.Minute
	// chatOnceMax bounds the (user, req_id) pairs one node remembers
	// (memChatOnce, ~200 B each): 100k, ~830 chats/s with a req_id for 2
	// minutes; beyond that the least recent go earlier (a retry then
	// posts again).
	chatOnceMax = 100_000
)

// chatOnce remembers the chats sent with a req_id. claim answers the mid of
// a chat sent already, or an error (one in flight: 10409; unavailable), or
// settle: the caller sends the chat and calls settle with its mid ("" = not
// sent).
type chatOnce interface {
	// peek reads, changing nothing: the mid of a chat sent already, or
	// errChatInFlight, or neither.
	peek(user int64, req string) (mid string, err *proto.Error)
	claim(user int64, req string) (mid string, settle func(mid string), err *proto.Error)
	// inFlight is how long a claim holds while its chat is being sent.
	inFlight() time.Duration
}

// chatSendBy is how long after its claim (inFlight) a chat may still be
// numbered — after that a cluster's sequencer still retrying its batch has
// Redis refuse it (router.PublishRoomBy): the claim outlives it, by as
// much again, so the chat cannot go out once a retry may claim its req_id
// anew and post it. The other half covers the node's and Redis's clocks
// apart and the late settle of a chat numbered just in time.
func chatSendBy(inFlight time.Duration) time.Duration { return inFlight / 2 }

var errChatInFlight = proto.Errorf(proto.CodeConflict, "a chat with this req_id is still being sent; retry with the same req_id")

type chatKey struct {
	user int64
	req  string
}

// chatSent is what a node remembers of a chat: its mid ("" = in flight) and
// when it was claimed or sent.
type chatSent struct {
	mid string
	at  time.Time
}

// memChatOnce is chatOnce in this node's memory (a single node), an LRU of
// at most chatOnceMax entries.
type memChatOnce struct {
	mu  sync.Mutex
	lru *simplelru.LRU[chatKey, chatSent]
	now func() time.Time
}

func newMemChatOnce() *memChatOnce { return newMemChatOnceSize(chatOnceMax) }

func newMemChatOnceSize(n int) *memChatOnce {
	l, _ := simplelru.NewLRU[chatKey, chatSent](n, nil) // only a size ≤ 0 fails
	return &memChatOnce{lru: l, now: time.Now}
}

func (m *memChatOnce) inFlight() time.Duration { return chatInFlightTTL }

func (m *memChatOnce) peek(user int64, req string) (string, *proto.Error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.known(chatKey{user, req}, m.now())
}

// known answers what m remembers of k at now (with m.mu held): a sent
// chat's mid, errChatInFlight, or neither (absent or expired).
func (m *memChatOnce) known(k chatKey, now time.Time) (string, *proto.Error) {
	if v, ok := m.lru.Peek(k); ok {
		switch {
		case v.mid != "" && now.Sub(v.at) < chatOnceTTL:
			return v.mid, nil
		case v.mid == "" && now.Sub(v.at) < chatInFlightTTL:
			return "", errChatInFlight
		}
	}
	return "", nil
}

func (m *memChatOnce) claim(user int64, req string) (string, func(string), *proto.Error) {
	k := chatKey{user, req}
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if mid, err := m.known(k, now); mid != "" || err != nil {
		return mid, nil, err
	}
	claimed := chatSent{at: now}
	m.lru.Add(k, claimed)
	return "", func(mid string) {
		m.mu.Lock()
		defer m.mu.Unlock()
		if v, ok := m.lru.Peek(k); !ok || v != claimed {
			return // evicted or expired and claimed again: not ours
		}
		if mid == "" {
			m.lru.Remove(k)
			return
		}
		m.lru.Add(k, chatSent{mid: mid, at: m.now()})
	}, nil
}

// redisChatOnce is chatOnce in Redis (a cluster: a retry may reach another
// node): le:chatreq:{<user>}:<req_id> holds a claim ("~" + a token, for
// chatInFlightTTL) and then the chat's mid (for chatOnceTTL).
type redisChatOnce struct {
	rdb     rueidis.Client
	node    string
	n       atomic.Uint64
	timeout time.Duration
	ttl     time.Duration // of a claim in flight (zero: chatInFlightTTL; tests shorten it)
}

func (r *redisChatOnce) inFlight() time.Duration {
	if r.ttl > 0 {
		return r.ttl
	}
	return chatInFlightTTL
}

// chatReqKey is outside le:* (the shared wallet's reset after a data loss
// deletes the le:* families it rebuilds; this one is kept whatever they
// become).
func chatReqKey(user int64, req string) string {
	return "liveedge:chatreq:{" + strconv.FormatInt(user, 10) + "}:" + req
}

// setIfAbsentScript: KEYS[1] a key; ARGV a value, its TTL in ms. Returns
// the key's value or nil (set now). Chat req_id claims use it (the value: a
// mid, or another claim).
var setIfAbsentScript = rueidis.NewLuaScript(setIfAbsentLua)

const setIfAbsentLua = `
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false`

// chatSettleScript: KEYS[1] the pair's key; ARGV the claim, the mid ("" =
// not sent), its TTL in ms. Only the claim's owner settles it.
var chatSettleScript = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1`)

func (r *redisChatOnce) peek(user int64, req string) (string, *proto.Error) {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	v, err := r.rdb.Do(ctx, r.rdb.B().Get().Key(chatReqKey(user, req)).Build()).ToString()
	switch {
	case rueidis.IsRedisNil(err):
		return "", nil
	case err != nil:
		return "", errUnavailable
	case v != "" && v[0] == '~':
		return "", errChatInFlight
	}
	return v, nil
}

func (r *redisChatOnce) claim(user int64, req string) (string, func(string), *proto.Error) {
	key := chatReqKey(user, req)
	token := "~" + r.node + ":" + strconv.FormatUint(r.n.Add(1), 36)
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	v, err := setIfAbsentScript.Exec(ctx, r.rdb, []string{key},
		[]string{token, strconv.FormatInt(r.inFlight().Milliseconds(), 10)}).ToString()
	settle := func(mid string) error {
		ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
		defer cancel()
		return chatSettleScript.Exec(ctx, r.rdb, []string{key},
			[]string{token, mid, strconv.FormatInt(chatOnceTTL.Milliseconds(), 10)}).Error()
	}
	switch {
	case rueidis.IsRedisNil(err):
		return "", func(mid string) {
			// Tried twice; a claim left behind expires (retries meanwhile
			// are 10409; a sent chat's retry after that posts again).
			if settle(mid) != nil {
				_ = settle(mid)
			}
		}, nil
	case err != nil:
		_ = settle("") // the claim may have been made, its reply lost
		return "", nil, errUnavailable
	case v != "" && v[0] == '~':
		return "", nil, errChatInFlight
	}
	return v, nil, nil
}
