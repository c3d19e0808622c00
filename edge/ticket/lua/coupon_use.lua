-- Use a coupon for an order, once cluster-wide (edge/ticket/coupon_shared.go).
-- KEYS[1] the coupon's hash: u user, a amount, t created_at, by the order
-- holding it (absent = free), b:<order> = 1 for every order that gave it back.
-- KEYS[2] the shared wallet's generation (persist.SharedMetaKey): coupons are
-- rebuilt with the wallet after Redis lost them, and used only when it is ready.
-- ARGV[1] the buyer, [2] the order.
-- Returns {0, amount, user, created_at} taken (or already held by this order:
-- a retry), {1} unknown, {2} another user's, {3} held by another order,
-- {4} this order gave it back before (a late retry of its use takes nothing),
-- {5} not ready (nothing changed).
if redis.call('HGET', KEYS[2], 'state') ~= 'ready' then return {5} end
local v = redis.call('HMGET', KEYS[1], 'u', 'a', 'by', 't')
if not v[1] then return {1} end
if v[1] ~= ARGV[1] then return {2} end
if v[3] then
  if v[3] == ARGV[2] then return {0, v[2], v[1], v[4]} end
  return {3}
end
if redis.call('HEXISTS', KEYS[1], 'b:' .. ARGV[2]) == 1 then return {4} end
redis.call('HSET', KEYS[1], 'by', ARGV[2])
return {0, v[2], v[1], v[4]}
