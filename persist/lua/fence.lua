if tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'fence', ARGV[1])
end
return 1
