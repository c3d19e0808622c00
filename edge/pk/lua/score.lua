-- Add PK gifts to a running contest's scores and number the push that tells
-- the rooms, in one step: the push's seq is the contest's next, cluster-wide.
-- KEYS[1] the contest's hash. ARGV[1] side 0's gifts, ARGV[2] side 1's.
-- Returns {1, score 0, score 1, seq, sum 0, sum 1}, or {0} when the contest
-- is not running. s0/s1 hold only sums of gifts added here; f0/f1 (written
-- back after a Redis data loss, restore.lua) are a floor from the wallet's
-- tallies, never added to: a gift counted in the floor whose score comes
-- after the write-back would otherwise count twice. The pushed score is
-- max(sum, floor); the sums are returned too (what the node may write back).
if redis.call('HGET', KEYS[1], 'state') ~= 'run' then return {0} end
local s0 = redis.call('HINCRBY', KEYS[1], 's0', ARGV[1])
local s1 = redis.call('HINCRBY', KEYS[1], 's1', ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'f0', 'f1')
return {1, math.max(s0, tonumber(f[1] or '0')), math.max(s1, tonumber(f[2] or '0')),
  redis.call('HINCRBY', KEYS[1], 'seq', 1), s0, s1}
