package gift

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
	"github.com/liveedge/liveedge/persist"
)

// RedisCatalogueKey is the Redis hash of the shared catalogue (field = gift id).
const RedisCatalogueKey = "le:giftcat"

// RedisCatalogue stores the catalogue in Redis, shared by every node. Reads
// use rueidis client-side caching: Redis tracks the key and sends an
// invalidation when any node changes it; the node's invalidation hook then
// calls Catalogue.Reload (no polling).
//
// Mirror, if set, is the node's Pebble: every catalogue read is kept there
// (fsynced; gifts are never deleted, only disabled), and a Redis that lost
// the catalogue (a restart without persistence) gets it back from there —
// each gift only if absent, so an admin's write meanwhile wins — instead of
// every gift failing 20002 until a restart re-seeded the defaults and lost
// the admins' changes.
type RedisCatalogue struct {
	Client rueidis.Client
	Mirror *persist.Store
}

// LoadAll implements CatalogueStore.
func (r RedisCatalogue) LoadAll() ([]Gift, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	m, err := r.Client.DoCache(ctx, r.Client.B().Hgetall().Key(RedisCatalogueKey).Cache(), time.Hour).AsStrMap()
	if err != nil {
		return nil, err
	}
	if len(m) == 0 && r.Mirror != nil {
		if m, err = r.restore(ctx); err != nil {
			return nil, err
		}
	}
	out := make([]Gift, 0, len(m))
	for _, v := range m {
		var g Gift
		if err := proto.Unmarshal([]byte(v), &g); err != nil {
			return nil, err
		}
		out = append(out, g)
	}
	if r.Mirror != nil && len(out) > 0 {
		if err := r.Mirror.Apply(func(b *persist.Batch) error {
			for _, g := range out {
				if err := b.Set(persist.Key(prefixGiftCat, uint64(g.ID)), []byte(m[strconv.FormatInt(g.ID, 10)]), nil); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// restore writes the mirrored catalogue back into Redis (HSETNX per gift)
// and reads it again (uncached: the cached empty hash may not be
// invalidated yet). Nothing mirrored: the empty catalogue (seeded by
// NewCatalogue).
func (r RedisCatalogue) restore(ctx context.Context) (map[string]string, error) {
	saved, err := PebbleCatalogue{Store: r.Mirror}.LoadAll()
	if err != nil || len(saved) == 0 {
		return map[string]string{}, err
	}
	cmds := make(rueidis.Commands, 0, len(saved))
	for _, g := range saved {
		v, err := proto.Marshal(g)
		if err != nil {
			return nil, err
		}
		cmds = append(cmds, r.Client.B().Hsetnx().Key(RedisCatalogueKey).Field(strconv.FormatInt(g.ID, 10)).Value(string(v)).Build())
	}
	for _, res := range r.Client.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return nil, err
		}
	}
	return r.Client.Do(ctx, r.Client.B().Hgetall().Key(RedisCatalogueKey).Build()).AsStrMap()
}

// Get implements CatalogueStore (uncached: a compare-and-set's read).
func (r RedisCatalogue) Get(id int64) (Gift, []byte, bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	v, err := r.Client.Do(ctx, r.Client.B().Hget().Key(RedisCatalogueKey).Field(strconv.FormatInt(id, 10)).Build()).AsBytes()
	return storedGift(v, rueidis.IsRedisNil(err), err)
}

// swapScript sets field ARGV[1] of KEYS[1] to ARGV[4] if it is absent
// (ARGV[2] "0") or holds ARGV[3] (ARGV[2] "1"): 1 set, 0 not.
var swapScript = rueidis.NewLuaScript(`
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '0' then
  if cur then return 0 end
elseif cur ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1`)

// Swap implements CatalogueStore: one script, whichever node writes.
func (r RedisCatalogue) Swap(raw []byte, g Gift) (bool, error) {
	v, err := proto.Marshal(g)
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	present := "0"
	if raw != nil {
		present = "1"
	}
	n, err := swapScript.Exec(ctx, r.Client, []string{RedisCatalogueKey},
		[]string{strconv.FormatInt(g.ID, 10), present, string(raw), string(v)}).AsInt64()
	if err != nil || n != 1 {
		return false, err
	}
	if r.Mirror == nil {
		return true, nil
	}
	return true, r.Mirror.Put(persist.Key(prefixGiftCat, uint64(g.ID)), v)
}
