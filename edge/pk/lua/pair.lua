-- Invitations and contest starts, cluster-wide (edge/pk/shared.go).
-- KEYS (hash tag {pk}): [1] invitations (hash id -> "<inviter>|<rooms a,b>|<json>"),
-- [2] their expiries (zset id -> unix ms), [3] pending per inviter (hash
-- inviter -> count), [4] rooms in a contest (hash room -> contest id),
-- [5] running contests (hash id -> record), [6] the contest's hash.
-- ARGV: [1] mode (invite | accept | decline | start), [2] id, [3] the caller's
-- clock (unix ms; unused: expiries go by Redis's clock, the one every node
-- shares — a node whose clock runs ahead dropped the others' invitations
-- early and kept its own too long), then per mode:
--   invite: [4] inviter, [5] room a, [6] room b, [7] ttl ms, [8] invitation json,
--           [9] max per inviter, [10] max in all
--   accept: [4] room a, [5] room b, [6] contest record
--   start:  [4] room a, [5] room b, [6] contest record
-- Returns {0} done, {1} a room is in a contest, {2} inviter's limit,
-- {3} the cluster's limit, {4} no such pending invitation.
local mode, id = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function drop(inv)
  local v = redis.call('HGET', KEYS[1], inv)
  if v then
    local inviter = string.match(v, '^(%d+)|')
    if inviter and redis.call('HINCRBY', KEYS[3], inviter, -1) <= 0 then
      redis.call('HDEL', KEYS[3], inviter)
    end
    redis.call('HDEL', KEYS[1], inv)
  end
  redis.call('ZREM', KEYS[2], inv)
end

-- Expired invitations go first (a bounded number per call).
for _, inv in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 64)) do
  drop(inv)
end

local function busy(a, b)
  return redis.call('HEXISTS', KEYS[4], a) == 1 or redis.call('HEXISTS', KEYS[4], b) == 1
end

local function begin(a, b, rec)
  redis.call('HSET', KEYS[6], 'rec', rec, 'state', 'run', 's0', 0, 's1', 0, 'seq', 1)
  redis.call('HSET', KEYS[4], a, id, b, id)
  redis.call('HSET', KEYS[5], id, rec)
end

if mode == 'invite' then
  if busy(ARGV[5], ARGV[6]) then return {1} end
  if tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0') >= tonumber(ARGV[9]) then return {2} end
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[10]) then return {3} end
  redis.call('HSET', KEYS[1], id, ARGV[4] .. '|' .. ARGV[5] .. ',' .. ARGV[6] .. '|' .. ARGV[8])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), id)
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
  return {0}
end

if mode == 'accept' or mode == 'decline' then
  local exp = redis.call('ZSCORE', KEYS[2], id)
  if not exp or tonumber(exp) <= now or redis.call('HEXISTS', KEYS[1], id) == 0 then return {4} end
  if mode == 'accept' and busy(ARGV[4], ARGV[5]) then
    -- Nothing starts, and the invitation stands until it expires: the
    -- anchor's retry, once the room is free, is not "not found".
    return {1}
  end
  drop(id)
  if mode == 'decline' then return {0} end
  begin(ARGV[4], ARGV[5], ARGV[6])
  return {0}
end

if mode == 'start' then
  if busy(ARGV[4], ARGV[5]) then return {1} end
  begin(ARGV[4], ARGV[5], ARGV[6])
  return {0}
end
return redis.error_reply('pk: bad mode')
