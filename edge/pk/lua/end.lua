-- End a contest once, cluster-wide: the state moves run -> over only here, so
-- of the nodes whose timers fire, one gets {1, ...} and pushes the result.
-- KEYS[1] the contest's hash, [2] rooms in a contest, [3] running contests.
-- ARGV[1] id, [2] room a, [3] room b, [4] room a's tally, [5] room b's tally
-- (the wallet's, read just before: a PK gift whose debit was acknowledged but
-- whose score was never added, e.g. its node died, still counts), [6] how
-- long the ended contest stays readable (ms), [7] the calling replica's
-- token (one per node's copy of the contest).
-- Returns {1, score 0, score 1, seq} (ended here — also to a retry by the
-- replica that ended it, whose first reply was lost, so it still pushes the
-- result), {0, score 0, score 1, seq} (over: ended by another replica),
-- {4, score 0, score 1, seq} (over, its ender unknown: written back after
-- Redis lost its data — a replica whose earlier end went unanswered may
-- have ended it, and pushes the result), {3}
-- (no such contest: Redis lost it — the replica keeps it until it is written
-- back, restore.lua), or {2} (a node's PK gifts are still being debited:
-- retry shortly).
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'over' then
  local r = redis.call('HMGET', KEYS[1], 's0', 's1', 'seq', 'ender')
  local code = 0
  if r[4] == ARGV[7] then code = 1 elseif not r[4] then code = 4 end
  return {code, tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0}
end
if state ~= 'run' then return {3} end
-- A node still debiting PK gifts of the contest marked it (w:<token> = the
-- mark's deadline, by this clock): the end waits for it (returns {2}: retry)
-- — not for the caller's own mark (it waited for its gifts itself).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HGETALL', KEYS[1])
for i = 1, #f, 2 do
  if string.sub(f[i], 1, 2) == 'w:' and f[i] ~= 'w:' .. ARGV[7] and tonumber(f[i + 1]) > now then return {2} end
end
-- (f0/f1: a written-back contest's floor from the tallies, score.lua.)
local v = redis.call('HMGET', KEYS[1], 's0', 's1', 'f0', 'f1')
local s0 = math.max(tonumber(v[1] or '0'), tonumber(v[3] or '0'), tonumber(ARGV[4]))
local s1 = math.max(tonumber(v[2] or '0'), tonumber(v[4] or '0'), tonumber(ARGV[5]))
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[1], 'state', 'over', 's0', s0, 's1', s1, 'ender', ARGV[7])
for _, room in ipairs({ARGV[2], ARGV[3]}) do
  if redis.call('HGET', KEYS[2], room) == ARGV[1] then redis.call('HDEL', KEYS[2], room) end
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {1, s0, s1, seq}
