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
// Mirror, if set, is the node's Pebble: every gift read is kept there
// (fsynced; gifts are never deleted, only disabled) unless the copy there is
// newer (Gift.V), and every load first merges the mirror into Redis — a
// gift written where absent or older than the mirror's copy — so a Redis
// that lost the catalogue (a restart without persistence, a rollback to an
// older snapshot) gets every gift's latest version back from the nodes, even
// when a node seeded the defaults or an admin created a gift into the
// emptied hash first. (Before, only an empty hash was restored: after such
// a first write the admins' gifts were gone and the defaults' prices back,
// on every node and in every mirror.)
type RedisCatalogue struct {
	Client rueidis.Client
	Mirror *persist.Store
}

// mergeScript writes each gift ARGV[3i+1] (id) = ARGV[3i+2] (its JSON) of
// version ARGV[3i+3] into hash KEYS[1] where it is absent or of an older
// version: 1 if it wrote any. A row without a version (written by a node
// from before versions, during a rolling upgrade) is kept: it may be the
// latest write.
var mergeScript = rueidis.NewLuaScript(`
local wrote = 0
for i = 1, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local write = not cur
  if cur then
    local ok, g = pcall(cjson.decode, cur)
    write = ok and type(g) == 'table' and tonumber(g.v) ~= nil and tonumber(ARGV[i + 2]) > tonumber(g.v)
  end
  if write then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    wrote = 1
  end
end
return wrote`)

// LoadAll implements CatalogueStore.
func (r RedisCatalogue) LoadAll() ([]Gift, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var mirrored map[int64]Gift
	merged := false
	if r.Mirror != nil {
		saved, err := PebbleCatalogue{Store: r.Mirror}.LoadAll()
		if err != nil {
			return nil, err
		}
		mirrored = make(map[int64]Gift, len(saved))
		args := make([]string, 0, 3*len(saved))
		for _, g := range saved {
			mirrored[g.ID] = g
			v, err := proto.Marshal(g)
			if err != nil {
				return nil, err
			}
			args = append(args, strconv.FormatInt(g.ID, 10), string(v), strconv.FormatInt(g.V, 10))
		}
		if len(args) > 0 {
			wrote, err := mergeScript.Exec(ctx, r.Client, []string{RedisCatalogueKey}, args).AsInt64()
			if err != nil {
				return nil, err
			}
			merged = wrote == 1
		}
	}
	// Cached, unless this node's copy was just written back (the
	// invalidation of the cached hash may not have come yet): read anew.
	var m map[string]string
	var err error
	if merged {
		m, err = r.Client.Do(ctx, r.Client.B().Hgetall().Key(RedisCatalogueKey).Build()).AsStrMap()
	} else {
		m, err = r.Client.DoCache(ctx, r.Client.B().Hgetall().Key(RedisCatalogueKey).Cache(), time.Hour).AsStrMap()
	}
	if err != nil {
		return nil, err
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
				if had, ok := mirrored[g.ID]; ok && g.V != 0 && had.V > g.V {
					continue // the mirror's is newer: merged back above, read before it landed
				}
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
