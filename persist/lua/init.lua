if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'state', 'rebuilding', 'nodes', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'gen', 'state')
