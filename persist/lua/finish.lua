local meta = redis.call('HMGET', KEYS[1], 'gen', 'state', 'nodes')
if meta[1] ~= ARGV[1] then return 'stale' end
redis.call('SADD', KEYS[2], ARGV[2])
if redis.call('SCARD', KEYS[2]) >= tonumber(meta[3]) then
  redis.call('HSET', KEYS[1], 'state', 'ready')
end
return redis.call('HGET', KEYS[1], 'state')
