redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == '${PENDING_MARK}' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  return 1
end
return 0
