-- A room's position, giving it an epoch if it has none yet, so that a client
-- joining before the first push already has the epoch its later pushes use.
-- KEYS as sequence.lua. ARGV[1] a fresh epoch, ARGV[2] the epoch's TTL in ms
-- (sequence.lua's ARGV[11]; renewed here: a node subscribing keeps it), ARGV[3]
-- and ARGV[4] the epoch and the highest offset the calling node has received
-- ("" and 0: none).
-- Returns {epoch, newest offset}.
local ep = redis.call('GET', KEYS[2])
local seq = tonumber(redis.call('GET', KEYS[1]) or '-1')
if (not ep) or seq < 0 or (ep == ARGV[3] and seq < tonumber(ARGV[4])) then
  -- No epoch, or the counter is gone, or it went back below an offset the
  -- caller has received in its epoch (Redis came back from an older
  -- snapshot): numbering restarts in a new epoch, as in sequence.lua —
  -- offsets handed out again in the same epoch would be dropped as
  -- duplicates by every node that had them.
  ep = ARGV[1]
  redis.call('SET', KEYS[2], ep, 'PX', ARGV[2])
  redis.call('SET', KEYS[1], 0, 'PX', ARGV[2])
  redis.call('DEL', KEYS[3])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return {ep, tonumber(redis.call('GET', KEYS[1]))}
