-- Add PK gifts to a running contest's scores and number the push that tells
-- the rooms, in one step: the push's seq is the contest's next, cluster-wide.
-- KEYS[1] the contest's hash. ARGV[1] side 0's gifts, ARGV[2] side 1's.
-- Returns {1, score 0, score 1, seq}, or {0} when the contest is not running.
if redis.call('HGET', KEYS[1], 'state') ~= 'run' then return {0} end
local s0 = redis.call('HINCRBY', KEYS[1], 's0', ARGV[1])
local s1 = redis.call('HINCRBY', KEYS[1], 's1', ARGV[2])
return {1, s0, s1, redis.call('HINCRBY', KEYS[1], 'seq', 1)}
