-- A room's position, giving it an epoch if it has none yet, so that a client
-- joining before the first push already has the epoch its later pushes use.
-- KEYS as sequence.lua. ARGV[1] a fresh epoch, ARGV[2] key TTL in ms.
-- Returns {epoch, newest offset}.
local ep = redis.call('GET', KEYS[2])
if (not ep) or redis.call('EXISTS', KEYS[1]) == 0 then
  ep = ARGV[1]
  redis.call('SET', KEYS[2], ep, 'PX', ARGV[2])
  redis.call('SET', KEYS[1], 0, 'PX', ARGV[2])
  redis.call('DEL', KEYS[3])
end
return {ep, tonumber(redis.call('GET', KEYS[1]))}
