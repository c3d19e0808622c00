local meta = redis.call('HMGET', KEYS[1], 'gen', 'state')
if meta[1] ~= ARGV[1] or meta[2] ~= 'rebuilding' then return 'stale' end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return 'done' end
-- Checked whole before anything is written: a script that fails halfway
-- keeps its writes but not its marker, and the retry would add them again.
local t = redis.call('TIME')
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local i = 3
while i <= #ARGV do
  local op, v = ARGV[i], ARGV[i + 2]
  if op == 'incr' or op == 'seq' then
    if not tonumber(v) then return redis.error_reply('bad value for ' .. op) end
    i = i + 3
  elseif op == 'idem' then
    if not tonumber(ARGV[i + 3]) then return redis.error_reply('bad deadline for idem') end
    i = i + 4
  elseif op == 'hincr' then
    if not tonumber(ARGV[i + 3]) then return redis.error_reply('bad value for hincr') end
    i = i + 4
  elseif op == 'hset' then
    if ARGV[i + 3] == nil then return redis.error_reply('hset without a value') end
    i = i + 4
  elseif op == 'sadd' then
    if not tonumber(ARGV[i + 3]) then return redis.error_reply('bad deadline for sadd') end
    i = i + 4
  elseif op == 'zadd' then
    if not tonumber(ARGV[i + 3]) then return redis.error_reply('bad score for zadd') end
    i = i + 4
  else return redis.error_reply('bad op ' .. tostring(op)) end
end
if i ~= #ARGV + 1 then return redis.error_reply('truncated op') end
i = 3
while i <= #ARGV do
  local op, k, v = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'incr' then redis.call('INCRBY', k, v); i = i + 3
  elseif op == 'idem' then
    -- Only a row still live (an expired one, on another node's disk, must
    -- not overwrite a newer request's key).
    if tonumber(ARGV[i + 3]) > nowms then redis.call('SET', k, v, 'PXAT', ARGV[i + 3]) end
    i = i + 4
  elseif op == 'hincr' then redis.call('HINCRBY', k, v, ARGV[i + 3]); i = i + 4
  elseif op == 'hset' then redis.call('HSET', k, v, ARGV[i + 3]); i = i + 4
  elseif op == 'sadd' then
    -- A member until a deadline (the set kept at least that long).
    local deadline = tonumber(ARGV[i + 3])
    if deadline > nowms then
      redis.call('SADD', k, v)
      local ttl = redis.call('PTTL', k)
      if ttl >= 0 and nowms + ttl < deadline then redis.call('PEXPIREAT', k, deadline)
      elseif ttl == -1 then redis.call('PEXPIREAT', k, deadline) end
    end
    i = i + 4
  elseif op == 'zadd' then
    -- A recent trade (member v, its id the score); the list keeps the
    -- newest ${RECENT_MAX} of every node's, as apply.lua does.
    redis.call('ZADD', k, ARGV[i + 3], v)
    redis.call('ZREMRANGEBYRANK', k, 0, -${RECENT_DROP_FROM})
    i = i + 4
  elseif op == 'seq' then
    if tonumber(redis.call('GET', k) or '0') < tonumber(v) then redis.call('SET', k, v) end
    i = i + 3
  else return redis.error_reply('bad op ' .. op) end
end
redis.call('SADD', KEYS[2], ARGV[2])
return 'ok'
