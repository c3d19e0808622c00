if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return 0 end
local cur = '0'
repeat
  local r = redis.call('SCAN', cur, 'MATCH', 'le:*', 'COUNT', 1000)
  cur = r[1]
  local del = {}
  for _, k in ipairs(r[2]) do
    for i = 4, #ARGV do
      if string.sub(k, 1, #ARGV[i]) == ARGV[i] then
        del[#del + 1] = k
        break
      end
    end
  end
  if #del > 0 then redis.call('UNLINK', unpack(del)) end
until cur == '0'
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'state', 'rebuilding', 'nodes', ARGV[3])
return 1
