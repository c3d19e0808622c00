-- Give a coupon back for an order (edge/ticket/coupon_shared.go): freed only
-- if this order holds it, so a repeat, or an order that never got it, frees
-- nothing. The order is remembered (b:<order>) so a late retry of its use
-- cannot take the coupon again — only an order of the coupon's owner (any
-- other is refused its use anyway: marks for them would let anyone who
-- knows a coupon id grow its hash without bound).
-- A mark is needed only as long as a late use can come (a use's call
-- outlives its timeout by seconds): it holds the time it was made, and
-- marks older than ARGV[4] ms are deleted once the hash holds more than 32
-- fields, so an owner placing and failing orders with one coupon does not
-- grow its hash without bound.
-- KEYS[1] the coupon's hash, KEYS[2] the wallet's generation (coupon_use.lua).
-- ARGV[1] the order, ARGV[2] its buyer (absent from an older node: marked),
-- ARGV[3] now in unix ms, ARGV[4] how long a mark is kept, in ms (both
-- absent from an older node: the mark is 1, nothing pruned).
-- Returns 1 (it held the coupon: freed now), 0, or -1 not ready (nothing changed).
if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then return -1 end
local owner = redis.call('HGET', KEYS[1], 'u')
if not owner then return 0 end
if ARGV[2] and ARGV[2] ~= owner then return 0 end
redis.call('HSET', KEYS[1], 'b:' .. ARGV[1], ARGV[3] or 1)
if ARGV[4] and redis.call('HLEN', KEYS[1]) > 32 then
  local cut = tonumber(ARGV[3]) - tonumber(ARGV[4])
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local f = all[i]
    if string.sub(f, 1, 2) == 'b:' and f ~= 'b:' .. ARGV[1] and (tonumber(all[i + 1]) or 0) < cut then
      redis.call('HDEL', KEYS[1], f)
    end
  end
end
if redis.call('HGET', KEYS[1], 'by') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'by')
  return 1
end
return 0
