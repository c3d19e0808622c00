-- Close a room on behalf of its anchor, cluster-wide.
-- KEYS as open.lua. ARGV[1] room id, ARGV[2] anchor, ARGV[3] now (unix ms),
-- ARGV[4] interval ms.
-- Returns {1, closed record}, {2} rate limited, {3} already closed,
-- {4} not found, {5} not the room's anchor.
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then
  if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then return {3} end
  return {4}
end
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[1] then
  return {5}
end
if tonumber(ARGV[4]) > 0 and not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[4]) then
  return {2}
end
local closed = string.gsub(rec, '"status":"open"', '"status":"closed","closed_at":' .. ARGV[3], 1)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[5], ARGV[1], closed)
return {1, closed}
