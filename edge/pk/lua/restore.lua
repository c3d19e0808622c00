-- Write a contest back after Redis lost its data (edge/pk/shared.go,
-- RestoreLost): a node that knows the contest puts it back, once — the
-- first writer creates it, the others find it there. Over is final: a
-- contest known over is never made running again.
-- KEYS[1] the contest's hash, [2] rooms in a contest, [3] running contests.
-- ARGV[1] mode: "run" (a running contest this node holds) or "over" (one it
-- knows ended: its final state, so that no node's write-back revives it),
-- [2] id, [3] room a, [4] room b, [5] record, [6] score 0, [7] score 1
-- (over: the final scores; run: the sums of gifts this node knows added,
-- score.lua's — never the tallies: gifts keep being added onto them),
-- [8] seq (run: the new epoch's base; over: the final seq), [9] how long an
-- ended contest stays readable (ms), [10] the calling replica's token,
-- [11] [12] (run) the wallet's tallies: the floor f0/f1 (score.lua).
-- Returns
--   over: {1} written, {0} it was over already, {2, s0, s1, seq} written
--         over a running write-back (a node that had missed the end wrote
--         it back first): the caller pushes the final again, with a seq
--         above that write-back's pushes;
--   run:  {0, s0, s1, seq} it is over, ended by another replica,
--         {4, s0, s1, seq} it is over, its ender unknown (written back
--         over by a node that knew it ended: a replica whose end went
--         unanswered may have been the ender, and pushes the result),
--         {1} it is running already (another node wrote it back first),
--         {2, s0, s1, seq} written back here: push the scores with seq,
--         {3, s0, s1, seq} one of its rooms is in another contest now
--         (started while the state was lost): ended here, at once — push
--         the result; also to a retry by the same replica (its first reply
--         lost), as end.lua does.
local mode, id = ARGV[1], ARGV[2]
local state = redis.call('HGET', KEYS[1], 'state')

local function unindex()
  for _, room in ipairs({ARGV[3], ARGV[4]}) do
    if redis.call('HGET', KEYS[2], room) == id then redis.call('HDEL', KEYS[2], room) end
  end
  redis.call('HDEL', KEYS[3], id)
end

if mode == 'over' then
  if state == 'over' then return {0} end
  local seq = tonumber(ARGV[8])
  if state == 'run' then
    seq = math.max(seq, tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') + 1)
  end
  redis.call('HSET', KEYS[1], 'rec', ARGV[5], 'state', 'over', 's0', ARGV[6], 's1', ARGV[7], 'seq', seq)
  redis.call('HDEL', KEYS[1], 'f0', 'f1')
  unindex()
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
  if state == 'run' then return {2, tonumber(ARGV[6]), tonumber(ARGV[7]), seq} end
  return {1}
end

if mode ~= 'run' then return redis.error_reply('pk: bad mode') end
if state == 'over' then
  local r = redis.call('HMGET', KEYS[1], 's0', 's1', 'seq', 'ender')
  local code = 0
  if r[4] == ARGV[10] then code = 3 elseif not r[4] then code = 4 end
  return {code, tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0}
end
if state == 'run' then
  -- There (another node's write-back): its indexes too, if they went.
  redis.call('HSETNX', KEYS[3], id, redis.call('HGET', KEYS[1], 'rec'))
  for _, room in ipairs({ARGV[3], ARGV[4]}) do redis.call('HSETNX', KEYS[2], room, id) end
  return {1}
end
redis.call('DEL', KEYS[1]) -- (a hash without a state: left fields)
local seq = tonumber(ARGV[8]) + 1 -- the push that announces it
local d0 = math.max(tonumber(ARGV[6]), tonumber(ARGV[11]))
local d1 = math.max(tonumber(ARGV[7]), tonumber(ARGV[12]))
for _, room in ipairs({ARGV[3], ARGV[4]}) do
  local cur = redis.call('HGET', KEYS[2], room)
  if cur and cur ~= id then
    redis.call('HSET', KEYS[1], 'rec', ARGV[5], 'state', 'over', 's0', d0, 's1', d1, 'seq', seq, 'ender', ARGV[10])
    redis.call('PEXPIRE', KEYS[1], ARGV[9])
    unindex()
    return {3, d0, d1, seq}
  end
end
redis.call('HSET', KEYS[1], 'rec', ARGV[5], 'state', 'run', 's0', ARGV[6], 's1', ARGV[7],
  'f0', ARGV[11], 'f1', ARGV[12], 'seq', seq)
redis.call('HSET', KEYS[2], ARGV[3], id, ARGV[4], id)
redis.call('HSET', KEYS[3], id, ARGV[5])
return {2, d0, d1, seq}
