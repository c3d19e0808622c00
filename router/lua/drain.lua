-- Take a user's offline pushes under a lease, in one step: the list's
-- pushes, after those of leases that ran out (oldest lease first), move to a
-- new lease of the caller's token, which its node releases (release.lua)
-- once it has delivered them. A drain whose reply was lost (or whose node
-- died) leaves its lease: the first drain after it runs out takes the
-- pushes back — at least once, where taking them off the list lost them.
-- A lease that has not run out is nobody else's to take: two drains at once
-- never both get a push (unless its lease ran out before its release).
-- KEYS[1] the user's offline list, KEYS[2] its leases (a hash, same hash
-- tag): '#' → the last lease's number, token → msgpack {number, deadline in
-- ms of Redis's clock, pushes}.
-- ARGV[1] the token (unique per drain), ARGV[2] the lease in ms, ARGV[3]
-- the most pushes kept per user (the newest; 0: no bound), ARGV[4] the
-- offline TTL in ms (for a list without one).
-- Returns {ms until the next of the other leases runs out (-1: none left),
-- the pushes taken, oldest first}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local back, left = {}, -1
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  if leases[i] ~= '#' then
    local l = cmsgpack.unpack(leases[i + 1])
    if l[2] <= now then
      back[#back + 1] = {l[1], leases[i], l[3]}
    elseif left < 0 or l[2] - now < left then
      left = l[2] - now
    end
  end
end
table.sort(back, function(a, b) return a[1] < b[1] end)
local out = {}
for _, l in ipairs(back) do
  for _, v in ipairs(l[3]) do
    out[#out + 1] = v
  end
  redis.call('HDEL', KEYS[2], l[2])
end
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = v
end
local max = tonumber(ARGV[3])
if max > 0 and #out > max then
  local newest = {}
  for i = #out - max + 1, #out do
    newest[#newest + 1] = out[i]
  end
  out = newest
end
if #out == 0 then
  return {left}
end
-- The lease keeps its pushes as long as the list or the leases taken back
-- would have (their TTL, set at each push kept: offline_ttl from the last),
-- not longer: a push never outlives offline_ttl by being leased.
local ttl = 0
for _, k in ipairs({KEYS[1], KEYS[2]}) do
  local p = redis.call('PTTL', k)
  if p == -1 then
    p = tonumber(ARGV[4])
  end
  if p > ttl then
    ttl = p
  end
end
redis.call('DEL', KEYS[1])
local n = redis.call('HINCRBY', KEYS[2], '#', 1)
redis.call('HSET', KEYS[2], ARGV[1], cmsgpack.pack({n, now + tonumber(ARGV[2]), out}))
if ttl <= 0 then
  ttl = tonumber(ARGV[4])
end
redis.call('PEXPIRE', KEYS[2], ttl)
table.insert(out, 1, left)
return out
