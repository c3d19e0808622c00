-- Read offsets ARGV[2]..ARGV[3] of a room's history in epoch ARGV[1], in one
-- step (an epoch change between reading the epoch and the entries would
-- label the new epoch's pushes with the old one).
-- KEYS[1] epoch, KEYS[2] history stream.
-- Returns false when the epoch is not ARGV[1], else the XRANGE reply.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
return redis.call('XRANGE', KEYS[2], ARGV[2] .. '-0', ARGV[3] .. '-0')
