local meta = redis.call('HMGET', KEYS[1], 'gen', 'state')
if meta[1] ~= ARGV[1] or meta[2] ~= 'ready' then
  return {'gen', meta[1] or '', meta[2] or ''}
end
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
local nk, ak, base = KEYS[5 + n + m], KEYS[6 + n + m], 7 + 3 * n + m
local counts = redis.call('HMGET', nk, 'n', 'fence')
local applied = tonumber(counts[1] or '0')
if applied < tonumber(ARGV[base + 1]) then return {'lost', applied} end
if tonumber(ARGV[base + 2]) <= tonumber(counts[2] or '0') then return {'fenced'} end
local v, claim = redis.call('GET', KEYS[3]), ARGV[base + 4]
local opt = string.sub(claim, 1, 1) == '?'
if opt then claim = string.sub(claim, 2) end
if claim ~= '' and v ~= claim then
  if v then return {'dup', v} end
  if not opt then return {'claim'} end
end
if claim == '' and v then return {'dup', v} end
-- Lua numbers are doubles: exact up to 2^53 - 1 (${MAX_BALANCE}), beyond
-- which a balance read or returned here would be wrong. An op that would
-- take a balance past it is refused before anything is written.
local after = {}
for i = 1, n do
  local k = KEYS[4 + i]
  local d = tonumber(ARGV[5 + 3 * i - 2 + 2])
  if d > ${MAX_BALANCE} or d < -${MAX_BALANCE} then return {'big'} end
  local b = after[k] or tonumber(redis.call('GET', k) or '0')
  b = b + d
  if b < 0 then return {'poor'} end
  if d > 0 and b > ${MAX_BALANCE} then return {'big'} end
  after[k] = b
end
-- Every number in a reply or a trade is written with %d: Lua prints a
-- number with 14 significant digits (1e14 as 1e+14), which the node
-- could not parse back after the money moved.
local function int(x) return string.format('%d', x) end
local ids, bals = {}, {}
for i = 1, n do
  local d = ARGV[5 + 3 * i]
  bals[i] = int(redis.call('INCRBY', KEYS[4 + i], d))
  ids[i] = int(redis.call('INCR', KEYS[2]))
  local user = string.match(KEYS[4 + i], '{(%d+)}')
  -- The numbers go in as digits in place of zeros cjson wrote (the user_id
  -- as the key's digits, the delta and the time as the node sent them).
  local t = cjson.encode({trade_id = 0, user_id = 0, delta = 0,
    reason = ARGV[5 + 3 * i + 1], ref = ARGV[5 + 3 * i + 2], balance = 0, at = 0,
    req_id = (user == ARGV[6]) and ARGV[7] or nil})
  t = string.gsub(t, '"trade_id":0', '"trade_id":' .. ids[i], 1)
  t = string.gsub(t, '"user_id":0', '"user_id":' .. user, 1)
  t = string.gsub(t, '"delta":0', '"delta":' .. d, 1)
  t = string.gsub(t, '"balance":0', '"balance":' .. bals[i], 1)
  t = string.gsub(t, '"at":0', '"at":' .. ARGV[5], 1)
  local lk = 'le:trades:{' .. user .. '}'
  redis.call('ZADD', lk, ids[i], t)
  redis.call('ZREMRANGEBYRANK', lk, 0, -${RECENT_DROP_FROM})
end
for j = 1, m do redis.call('INCRBY', KEYS[4 + n + j], ARGV[7 + 3 * n + j]) end
local res = table.concat(ids, ',') .. '|' .. table.concat(bals, ',') .. '|' .. ARGV[5]
redis.call('SET', KEYS[3], '${PENDING_MARK}' .. res, 'PX', ARGV[4])
redis.call('HINCRBY', nk, 'n', 1)
redis.call('HINCRBY', nk, 'sum', ARGV[base + 3])
-- The entry names the op's idempotency key too: a rollback that keeps this
-- script's writes but loses the done mark is mended from it (repairDone).
redis.call('HSET', ak, ARGV[base + 2], res .. '#' .. KEYS[3])
return {'ok', res}
