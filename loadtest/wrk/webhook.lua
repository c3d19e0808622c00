-- wrk script for the payment webhook (loadtest.RunWebhook, make bench-webhook):
-- POSTs pre-signed notifies, each body exactly once, then stops its thread.
--
--   wrk -t T -c C -d MAX -s webhook.lua http://127.0.0.1:PORT -- BODIES T DONEDIR
--
-- BODIES has one notify a line: "<X-Pay-Signature value>\t<raw JSON body>".
-- Thread k sends lines k, k+T, k+2T, ...; once its lines are all sent a
-- connection that asks for more gets GET /healthz (counted as filler) until
-- every notify of the thread is answered and the thread stops (a notify left
-- unanswered keeps it going until -d: the run then fails its check). A thread
-- that is done writes DONEDIR/done-<id>: wrk itself always runs for -d, so
-- the caller sends it SIGINT once every thread is done. The rate is timed
-- here, from a thread's first notify sent to its last answered (wrk's own
-- duration is -d or the SIGINT). done() prints one line "WEBHOOK {json}".

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } lt_timeval;
int gettimeofday(lt_timeval *tv, void *tz);
]]
local function now_us()
  local tv = ffi.new("lt_timeval")
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000000 + tonumber(tv.tv_usec)
end

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

-- per thread (globals, so that done() can read them with thread:get)
reqs, n, sent, ok, bad, filler = {}, 0, 0, 0, 0, 0
first_us, last_us = 0, 0
local healthz, donefile

local function finish()
  last_us = now_us()
  local f = io.open(donefile, "w")
  f:write(string.format("%d %d %d\n", n, first_us, last_us))
  f:close()
  wrk.thread:stop()
end

function init(args)
  local file, nthreads = args[1], tonumber(args[2])
  donefile = args[3] .. "/done-" .. id
  local i = 0
  for line in io.lines(file) do
    if i % nthreads == id then
      local sig, body = line:match("^([^\t]+)\t(.*)$")
      n = n + 1
      reqs[n] = wrk.format("POST", "/api/v1/pay/notify/mock",
        { ["Content-Type"] = "application/json", ["X-Pay-Signature"] = sig }, body)
    end
    i = i + 1
  end
  healthz = wrk.format("GET", "/healthz")
  -- wrk calls request() once in thread 0 before it runs, only to count the
  -- requests it returns (script_verify_request): that call must not use up
  -- a notify, which would then never be sent.
  verifying = (id == 0)
  if n == 0 then
    local f = io.open(donefile, "w")
    f:write("0 0 0\n")
    f:close()
  end
end

function request()
  if verifying then
    verifying = false
    return healthz
  end
  if sent < n then
    if sent == 0 then
      first_us = now_us()
    end
    sent = sent + 1
    return reqs[sent]
  end
  filler = filler + 1
  return healthz
end

function response(status, headers, body)
  if body == "success" then
    ok = ok + 1
  elseif body ~= "ok" then
    bad = bad + 1
  end
  if n > 0 and ok + bad == n then
    finish()
  end
end

function done(summary, latency, requests)
  local s, o, b, f = 0, 0, 0, 0
  local t0, t1 = 0, 0
  for _, t in ipairs(threads) do
    local a, z = t:get("first_us"), t:get("last_us")
    if a > 0 and (t0 == 0 or a < t0) then t0 = a end
    if z > t1 then t1 = z end
    s = s + t:get("sent")
    o = o + t:get("ok")
    b = b + t:get("bad")
    f = f + t:get("filler")
  end
  local e = summary.errors
  io.write(string.format(
    'WEBHOOK {"sent":%d,"ok":%d,"bad":%d,"filler":%d,"requests":%d,"duration_us":%d,"notify_us":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    s, o, b, f, summary.requests, summary.duration, (t1 > t0) and (t1 - t0) or 0,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
