-- Write a contest back after Redis lost its data (edge/pk/shared.go,
-- RestoreLost): a node that knows the contest puts it back, once — the
-- first writer creates it, the others find it there. Over is final: a
-- contest known over is never made running again.
-- KEYS[1] the contest's hash, [2] rooms in a contest, [3] running contests.
-- ARGV[1] mode: "run" (a running contest this node holds) or "over" (one it
-- knows ended: its final state, so that no node's write-back revives it),
-- [2] id, [3] room a, [4] room b, [5] record, [6] score 0, [7] score 1,
-- [8] seq (run: the new epoch's base; over: the final seq), [9] how long an
-- ended contest stays readable (ms), [10] the calling replica's token.
-- Returns
--   over: {1} written, {0} it was over already;
--   run:  {0, s0, s1, seq} it is over (ended, or known ended by a node),
--         {1} it is running already (another node wrote it back first),
--         {2, s0, s1, seq} written back here: push the scores with seq,
--         {3, s0, s1, seq} one of its rooms is in another contest now
--         (started while the state was lost): ended here, at once — push
--         the result.
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
  -- (Also over a running write-back by a node that had not learnt the end.)
  redis.call('HSET', KEYS[1], 'rec', ARGV[5], 'state', 'over', 's0', ARGV[6], 's1', ARGV[7], 'seq', ARGV[8])
  unindex()
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
  return {1}
end

if mode ~= 'run' then return redis.error_reply('pk: bad mode') end
if state == 'over' then
  local r = redis.call('HMGET', KEYS[1], 's0', 's1', 'seq')
  return {0, tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0}
end
if state == 'run' then
  -- There (another node's write-back): its indexes too, if they went.
  redis.call('HSETNX', KEYS[3], id, redis.call('HGET', KEYS[1], 'rec'))
  for _, room in ipairs({ARGV[3], ARGV[4]}) do redis.call('HSETNX', KEYS[2], room, id) end
  return {1}
end
local seq = tonumber(ARGV[8]) + 1 -- the push that announces it
for _, room in ipairs({ARGV[3], ARGV[4]}) do
  local cur = redis.call('HGET', KEYS[2], room)
  if cur and cur ~= id then
    redis.call('HSET', KEYS[1], 'rec', ARGV[5], 'state', 'over', 's0', ARGV[6], 's1', ARGV[7], 'seq', seq, 'ender', ARGV[10])
    redis.call('PEXPIRE', KEYS[1], ARGV[9])
    unindex()
    return {3, tonumber(ARGV[6]), tonumber(ARGV[7]), seq}
  end
end
redis.call('HSET', KEYS[1], 'rec', ARGV[5], 'state', 'run', 's0', ARGV[6], 's1', ARGV[7], 'seq', seq)
redis.call('HSET', KEYS[2], ARGV[3], id, ARGV[4], id)
redis.call('HSET', KEYS[3], id, ARGV[5])
return {2, tonumber(ARGV[6]), tonumber(ARGV[7]), seq}
