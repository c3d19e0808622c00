-- Give a coupon back for an order (edge/ticket/coupon_shared.go): freed only
-- if this order holds it, so a repeat, or an order that never got it, frees
-- nothing. The order is remembered (b:<order>) so a late retry of its use
-- cannot take the coupon again.
-- KEYS[1] the coupon's hash, KEYS[2] the wallet's generation (coupon_use.lua).
-- ARGV[1] the order.
-- Returns 1 (it held the coupon: freed now), 0, or -1 not ready (nothing changed).
if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'b:' .. ARGV[1], 1)
if redis.call('HGET', KEYS[1], 'by') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'by')
  return 1
end
return 0
