-- Grant a coupon (edge/ticket/coupon_shared.go). KEYS[1] the coupon's hash,
-- KEYS[2] the wallet's generation (coupon_use.lua). ARGV user, amount,
-- created_at. Returns 1 granted, 0 not ready or 2 the id is taken (nothing
-- written either way: a grant never overwrites a coupon).
if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'a', ARGV[2], 't', ARGV[3])
return 1
