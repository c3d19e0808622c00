-- Read a coupon (edge/ticket/coupon_shared.go). KEYS[1] the coupon's hash,
-- KEYS[2] the wallet's generation (coupon_use.lua). Returns {0} not ready,
-- or {1, user, amount, by, created_at} (user nil: unknown).
if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then return {0} end
local v = redis.call('HMGET', KEYS[1], 'u', 'a', 'by', 't')
return {1, v[1], v[2], v[3], v[4]}
