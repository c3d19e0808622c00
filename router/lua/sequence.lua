-- Number a batch of room pushes and keep them in the room's history, in one
-- step, so that an offset is never handed out without its push being readable.
-- KEYS[1] seq counter, KEYS[2] epoch, KEYS[3] history stream, KEYS[4] the
-- batches numbered last, per node process (same hash tag).
-- ARGV[1] history max length, ARGV[2] the history's TTL in ms (idle rooms
-- forget their pushes), ARGV[3] epoch to use if the room
-- has none, ARGV[4] now in ms, ARGV[5] n, ARGV[6] and ARGV[7] the epoch and
-- the highest offset the calling node has received ("" and 0: none), ARGV[8]
-- the calling process (its boot id) and ARGV[9] the batch's number there
-- (increasing: a process sends batch k+1 of a room only once batch k was
-- numbered, or given up), ARGV[10] the batch's deadline in ms (0: none),
-- ARGV[11] the TTL in ms of the epoch, the counter and the batches numbered
-- (a room quiet for less keeps its epoch; position.lua renews it too),
-- then 4 values per push: mid, biz, ack (0/1), d.
-- Returns {first offset, epoch}; {first offset, epoch, 1} when the batch was
-- numbered already (a retry after a lost reply: the same offsets, nothing
-- numbered twice); {0, epoch, 2} for a batch older than the last one this
-- process had numbered (an attempt given up, arriving late): not numbered;
-- {0, epoch, 3, now in ms} for a batch not numbered by its deadline (by
-- Redis's clock): not numbered — nor will it be, every attempt of the batch
-- carries the same deadline.
local ep = redis.call('GET', KEYS[2])
local seq = tonumber(redis.call('GET', KEYS[1]) or '-1')
if (not ep) or seq < 0 or (ep == ARGV[6] and seq < tonumber(ARGV[7])) then
  -- No epoch, or the counter is gone while the epoch stayed, or it went
  -- back below an offset already delivered (partial loss, an older
  -- snapshot): numbering restarts, so the epoch must change and old history
  -- go — offsets handed out again in the same epoch would be dropped as
  -- duplicates by every node that had them.
  -- Both keys set with their TTL at once: a batch refused below (its
  -- deadline) leaves a state that expires, not an epoch forever.
  ep = ARGV[3]
  redis.call('SET', KEYS[2], ep, 'PX', ARGV[11])
  redis.call('SET', KEYS[1], 0, 'PX', ARGV[11])
  redis.call('DEL', KEYS[3], KEYS[4])
end
local k = tonumber(ARGV[9])
local done = redis.call('HGET', KEYS[4], ARGV[8])
if done then
  local dk, dfirst, dep = string.match(done, '^(%d+):(%d+):(.*)$')
  if dep == ep then
    if tonumber(dk) == k then
      return {tonumber(dfirst), ep, 1}
    elseif tonumber(dk) > k then
      return {0, ep, 2}
    end
  end
end
local by = tonumber(ARGV[10])
if by > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now > by then
    return {0, ep, 3, now}
  end
end
local n = tonumber(ARGV[5])
local last = redis.call('INCRBY', KEYS[1], n)
local first = last - n + 1
for i = 0, n - 1 do
  local b = 12 + 4 * i
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], (first + i) .. '-0',
    'm', ARGV[b], 'b', ARGV[b + 1], 'a', ARGV[b + 2], 'd', ARGV[b + 3], 't', ARGV[4])
end
redis.call('HSET', KEYS[4], ARGV[8], ARGV[9] .. ':' .. first .. ':' .. ep)
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('PEXPIRE', KEYS[2], ARGV[11])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[11])
return {first, ep}
