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
local after = {}
for i = 1, n do
  local k = KEYS[4 + i]
  local b = after[k] or tonumber(redis.call('GET', k) or '0')
  b = b + tonumber(ARGV[5 + 3 * i - 2 + 2])
  if b < 0 then return {'poor'} end
  after[k] = b
end
local ids, bals = {}, {}
local now = tonumber(ARGV[5])
for i = 1, n do
  local d = ARGV[5 + 3 * i]
  bals[i] = redis.call('INCRBY', KEYS[4 + i], d)
  ids[i] = redis.call('INCR', KEYS[2])
  local user = string.match(KEYS[4 + i], '{(%d+)}')
  -- user_id goes in as the key's digits: a Lua number (a double, printed
  -- with 14 digits) would mangle an id of 15 digits or more.
  local t = string.gsub(cjson.encode({trade_id = ids[i], user_id = 0, delta = tonumber(d),
    reason = ARGV[5 + 3 * i + 1], ref = ARGV[5 + 3 * i + 2], balance = bals[i], at = now,
    req_id = (user == ARGV[6]) and ARGV[7] or nil}), '"user_id":0', '"user_id":' .. user, 1)
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
