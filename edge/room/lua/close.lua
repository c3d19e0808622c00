-- Close a room on behalf of its anchor, cluster-wide.
-- KEYS as open.lua, then KEYS[6] the room's closed record. ARGV[1] room id,
-- ARGV[2] anchor, ARGV[3] now (unix ms), ARGV[4] interval ms, ARGV[5] how
-- long a closed record is kept (ms).
-- Returns {1, closed record}, {2} rate limited, {3} already closed,
-- {4} not found, {5} not the room's anchor.
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then
  if redis.call('EXISTS', KEYS[6]) == 1 or redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then return {3} end
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
-- The record moves out of the hash of every room ever opened into a key of
-- its own that expires: closed rooms are not kept forever.
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('SET', KEYS[6], closed, 'PX', ARGV[5])
return {1, closed}
