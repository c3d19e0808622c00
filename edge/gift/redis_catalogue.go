package gift

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/liveedge/liveedge/gateway/proto"
)

// RedisCatalogueKey is the Redis hash of the shared catalogue (field = gift id).
const RedisCatalogueKey = "le:giftcat"

// RedisCatalogue stores the catalogue in Redis, shared by every node. Reads
// use rueidis client-side caching: Redis tracks the key and sends an
// invalidation when any node changes it; the node's invalidation hook then
// calls Catalogue.Reload (no polling).
type RedisCatalogue struct{ Client rueidis.Client }

// LoadAll implements CatalogueStore.
func (r RedisCatalogue) LoadAll() ([]Gift, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	m, err := r.Client.DoCache(ctx, r.Client.B().Hgetall().Key(RedisCatalogueKey).Cache(), time.Hour).AsStrMap()
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
	return out, nil
}

// Put implements CatalogueStore.
func (r RedisCatalogue) Put(g Gift) error {
	v, err := proto.Marshal(g)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return r.Client.Do(ctx, r.Client.B().Hset().Key(RedisCatalogueKey).FieldValue().
		FieldValue(strconv.FormatInt(g.ID, 10), string(v)).Build()).Error()
}
