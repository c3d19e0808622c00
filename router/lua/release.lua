-- Release a drain's lease (drain.lua) once its pushes are delivered: by its
-- token, so a lease that ran out and was taken back by another drain is
-- not touched (that drain's is another token). The leases' hash goes with
-- its last lease.
-- KEYS[1] the user's leases, ARGV[1] the token.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 and redis.call('HLEN', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[1])
end
return 0
