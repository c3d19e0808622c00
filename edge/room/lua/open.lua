-- Open a room for an anchor, cluster-wide: at most one open room per anchor,
-- ids from one counter, open/close rate limited per anchor.
-- KEYS[1] open rooms (hash id -> record), KEYS[2] anchors (hash anchor -> id),
-- KEYS[3] id counter, KEYS[4] the anchor's rate-limit key, KEYS[5] all
-- records (hash id -> record). All share the hash tag {rooms}.
-- ARGV[1] anchor, ARGV[2] type, ARGV[3] now (unix ms), ARGV[4] interval ms,
-- ARGV[5] the highest room id the calling node has seen.
-- Returns {0, record} (already open), {1, record} (opened), {2} (rate limited).
local id = redis.call('HGET', KEYS[2], ARGV[1])
if id then
  return {0, redis.call('HGET', KEYS[1], id)}
end
if tonumber(ARGV[4]) > 0 and not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[4]) then
  return {2}
end
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[5]) then
  -- The counter is gone or went back (Redis lost its data, or came back
  -- from an older snapshot): restart it above the highest id this node has
  -- seen, so no live room's id is handed out again.
  redis.call('SET', KEYS[3], ARGV[5])
end
id = redis.call('INCR', KEYS[3])
local rec = '{"room_id":' .. id .. ',"type":' .. ARGV[2] .. ',"anchor_id":' .. ARGV[1] ..
  ',"status":"open","opened_at":' .. ARGV[3] .. '}'
redis.call('HSET', KEYS[1], id, rec)
redis.call('HSET', KEYS[2], ARGV[1], id)
redis.call('HSET', KEYS[5], id, rec)
return {1, rec}
