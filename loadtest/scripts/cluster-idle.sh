#!/usr/bin/env bash
# Issue 15 items 2 and 3 on this machine: a real local cluster of NODES node
# processes (configs/cluster-local.sh: nats-server, redis-server, gw-1..gw-N),
# CONNS idle connections spread over them by loadgen (-procs PROCS,
# heartbeats on), every node's RSS, CPU and open connections sampled while
# they are held; then, with STORM=1, a reconnect storm: loadgen kills gw-N
# (SIGKILL) and measures the time until its clients are reconnected to the
# others and re-joined.
#
#   loadtest/scripts/cluster-idle.sh                  # 100,000 over 6 nodes
#   CONNS=15000 NODES=3 STORM=1 loadtest/scripts/cluster-idle.sh
#   CONNS=30000 NODES=3 STORM=1 STORM_WEIGHT=2 loadtest/scripts/cluster-idle.sh
#
# STORM_WEIGHT=W gives the node killed (the last) W shares of the
# connections to the others' one each (its URL listed W times): with 3
# nodes and W=2 it holds half of them, 15,000 of 30,000, and the two others
# 7,500 each — 15,000 each after the kill, within a process's 20,000 files.
#
# CLIENT=raw (the default for the idle run) uses loadgen's minimal idle
# client (-client raw: a gws connection, a join and heartbeat pings, nothing
# else per connection), so that 100,000 clients leave the two cores to the
# nodes; CLIENT=sdk uses the Go SDK. The storm always uses the SDK.
#
# Writes $OUT/idle.json (loadgen), $OUT/nodes.csv (every 5 s: all nodes'
# RSS and CPU ticks, then per node RSS, CPU ticks and open connections from
# /metrics, then NATS's and Redis's CPU ticks) and $OUT/summary.txt.
# Loopback only; bounded by CONNS, HOLD and the ramp.
set -euo pipefail
cd "$(dirname "$0")/../.."
NODES=${NODES:-6}
CONNS=${CONNS:-100000}
PROCS=${PROCS:-6}
RAMP=${RAMP:-2000}
HOLD=${HOLD:-60s}
STORM=${STORM:-0}
STORM_WEIGHT=${STORM_WEIGHT:-1}
CLIENT=${CLIENT:-raw}
OUT=${OUT:-data/cluster-idle}
for p in 14222 16379 $(seq 8080 $((8080 + 2 * NODES - 1))); do
	if ss -Hltn "sport = :$p" | grep -q .; then
		echo "port $p is in use (another cluster running?): not starting"
		exit 1
	fi
done
DATA=$(mktemp -d /tmp/liveedge-cluster-idle.XXXXXX)
mkdir -p "$OUT"
make -s build

NODES=$NODES DATA=$DATA configs/cluster-local.sh >"$OUT/cluster.log" 2>&1 &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -rf "$DATA"' EXIT
ws="" http=""
for i in $(seq "$NODES"); do
	h=$((8080 + 2 * (i - 1)))
	ws="$ws${ws:+,}ws://127.0.0.1:$((h + 1))/ws"
	http="$http${http:+,}http://127.0.0.1:$h"
	ok=0
	for _ in $(seq 150); do curl -fs "http://127.0.0.1:$h/readyz" >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
	[ "$ok" = 1 ] || { echo "gw-$i not ready; the cluster's log:"; tail -20 "$OUT/cluster.log"; exit 1; }
done
pidof_port() { ss -Hltnp "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
pids=()
for i in $(seq "$NODES"); do pids+=("$(pidof_port $((8081 + 2 * (i - 1))))"); done
nats=$(pidof_port 14222)
redis=$(pidof_port 16379)
echo "nodes: ${pids[*]}  nats: $nats  redis: $redis"

rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; } # clock ticks
# a node's open connections, Go heap in use and goroutine stacks (its /metrics)
metrics() {
	{ curl -fs -m 2 "http://127.0.0.1:$1/metrics" 2>/dev/null || true; } | awk '
		/^liveedge_connections\{/ {c = $NF + 0}
		/^go_memstats_heap_inuse_bytes / {h = $NF + 0}
		/^go_memstats_stack_inuse_bytes / {s = $NF + 0}
		END {printf "%d,%d,%d", c, h, s}'
}
# t: seconds since the first sample, read from the clock (a sample takes a
# while under load: /metrics of every node)
t0=$(date +%s%N)
elapsed() { local d=$(($(date +%s%N) - t0)); printf '%d.%03d' $((d / 1000000000)) $((d / 1000000 % 1000)); }
# t,rss,cpu,(rss_i,cpu_i,conns_i,heap_i,stack_i)...,nats_cpu,redis_cpu,
# loadgen_cpu,loadgen_rss (all its processes),machine_busy,machine_total (ticks, /proc/stat),load1
sample() {
	# /proc first, all at once (t is their time); the nodes' /metrics after
	local t r=0 c=0 i p rs=() cs=() per="" nc rc lc=0 lr=0 lg mb mt
	t=$(elapsed)
	for p in "${pids[@]}"; do
		rs+=("$(rss "$p")") cs+=("$(cpu "$p")")
	done
	nc=$(cpu "$nats") rc=$(cpu "$redis")
	if [ -s "$OUT/loadgen.pid" ]; then
		lg=$(cat "$OUT/loadgen.pid")
		for p in $lg $(pgrep -P "$lg" || true); do
			lc=$((lc + $(cpu "$p"))) lr=$((lr + $(rss "$p")))
		done
	fi
	read -r mb mt < <(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat)
	for i in "${!pids[@]}"; do
		r=$((r + rs[i])) c=$((c + cs[i]))
		per="$per,${rs[i]},${cs[i]},$(metrics $((8080 + 2 * i)))"
	done
	echo "$t,$r,$c$per,$nc,$rc,$lc,$lr,$mb,$mt,$(cut -d' ' -f1 /proc/loadavg)"
}
hdr="t,rss_bytes,cpu_ticks"
for i in $(seq "$NODES"); do hdr="$hdr,rss_$i,cpu_$i,conns_$i,heap_$i,stack_$i"; done
echo "$hdr,nats_cpu,redis_cpu,loadgen_cpu,loadgen_rss,machine_busy,machine_total,load1" >"$OUT/nodes.csv" # every 5 s
rm -f "$OUT/loadgen.pid"
sample >>"$OUT/nodes.csv"
(
	set +e # a slow or failed sample must not end the sampling
	while :; do
		# the next multiple of 5 s from t0 (a slow sample skips, never catches up)
		d=$(($(date +%s%N) - t0))
		wait_ns=$((5000000000 - d % 5000000000))
		sleep "$(printf '%d.%09d' $((wait_ns / 1000000000)) $((wait_ns % 1000000000)))"
		sample >>"$OUT/nodes.csv"
	done
) &
sampler=$!

args=(-scenario idle -client "$CLIENT" -ws "$ws" -http "$http" -conns "$CONNS" -procs "$PROCS" -ramp "$RAMP" -duration "$HOLD" -q -json "$OUT/idle.json")
if [ "$STORM" = 1 ]; then
	victim=${ws##*,}
	for _ in $(seq 2 "$STORM_WEIGHT"); do ws="$ws,$victim"; done
	args=(-scenario reconnect-storm -ws "$ws" -http "$http" -conns "$CONNS" -procs "$PROCS" -ramp "$RAMP"
		-duration "$HOLD" -rate 2 -kill-after 5s -kill-pid "${pids[$((NODES - 1))]}" -q -json "$OUT/storm.json")
fi
start=$(date +%s)
bin/loadgen "${args[@]}" >"$OUT/loadgen.txt" &
echo $! >"$OUT/loadgen.pid"
wait $! || true
cat "$OUT/loadgen.txt"
echo "loadgen ran $(($(date +%s) - start)) s"
kill $sampler 2>/dev/null || true
hz=$(getconf CLK_TCK)
# While the connections are held: the samples where the nodes' open
# connections (their /metrics, all nodes) are within 1 % of the most seen.
# Idle CPU over the hold: from 10 s after they were first all open to the
# last sample that still had them, and the quietest and busiest 20 s in it
# (20 s or more between two samples). RSS per connection, per node, at the
# hold's end (and where it goes: Go heap in use, goroutine stacks).
summary=$(awk -F, -v nodes="$NODES" -v hz="$hz" 'NR > 1 {
	n++
	for (k = 1; k <= NF; k++) v[n, k] = $k
	if ($2 > maxrss) maxrss = $2
	open_ = 0
	for (k = 0; k < nodes; k++) open_ += $(6 + 5 * k)
	o[n] = open_
	if (open_ > maxopen) maxopen = open_
}
function rate(col, i, j) { return (v[j, col] - v[i, col]) / hz / (v[j, 1] - v[i, 1]) }
END {
	x = 4 + 5 * nodes # nats_cpu, redis_cpu, loadgen_cpu, loadgen_rss, machine_busy, machine_total, load1
	for (f = 1; f <= n && o[f] < 0.99 * maxopen; f++);
	for (l = f; l < n && o[l + 1] >= 0.99 * maxopen; l++);
	for (s = f; s < l && v[s, 1] < v[f, 1] + 10; s++);
	printf "node RSS before: %.1f MiB, highest: %.1f MiB; most connections open on the nodes at once: %d (first at t=%.0f s)\n", v[1, 2] / 1048576, maxrss / 1048576, maxopen, v[f, 1]
	if (f <= n) printf "node RSS when they were first all open: %.1f MiB = %d B per connection\n", v[f, 2] / 1048576, (v[f, 2] - v[1, 2]) / o[f]
	if (s >= l || v[l, 1] - v[s, 1] < 20) { print "no 20 s with the connections held: no idle figures"; exit }
	lo = -1; hi = -1
	for (i = s; i < l; i++) {
		for (j = i + 1; j <= l && v[j, 1] - v[i, 1] < 20; j++);
		if (j > l) break
		d = rate(3, i, j)
		if (lo < 0 || d < lo) lo = d
		if (d > hi) hi = d
	}
	secs = v[l, 1] - v[s, 1]
	printf "hold t=%.0f..%.0f s (%.0f s): %d connections open on the nodes at its end (%d at its start)\n", v[s, 1], v[l, 1], secs, o[l], o[s]
	printf "node RSS per connection (all nodes, end of the hold): %d B\n", (v[l, 2] - v[1, 2]) / o[l]
	printf "node CPU while the connections are held and idle (all nodes, cores): %.3f over the hold; 20-s windows %.3f .. %.3f\n", rate(3, s, l), lo, hi
	for (k = 0; k < nodes; k++) {
		c = 4 + 5 * k
		open_ = v[l, c + 2]
		per = 0
		if (open_ > 0) per = (v[l, c] - v[1, c]) / open_
		printf "  gw-%d: %d connections, RSS %.1f -> %.1f MiB = %d B per connection (Go heap in use %.1f MiB, stacks %.1f MiB), CPU %.3f cores\n", k + 1, open_,
			v[1, c] / 1048576, v[l, c] / 1048576, per, v[l, c + 3] / 1048576, v[l, c + 4] / 1048576, rate(c + 1, s, l)
	}
	printf "  nats-server CPU %.3f cores, redis-server CPU %.3f cores, loadgen (all processes) CPU %.3f cores, RSS %.1f MiB (over the hold)\n",
		rate(x, s, l), rate(x + 1, s, l), rate(x + 2, s, l), v[l, x + 3] / 1048576
	printf "  machine: %.2f of %.0f cores busy (everything, /proc/stat), load average %s .. %s\n", rate(x + 4, s, l), rate(x + 5, s, l), v[s, x + 6], v[l, x + 6]
}' "$OUT/nodes.csv")
{
	client=$CLIENT
	[ "$STORM" = 1 ] && client=sdk # the storm always uses the SDK
	echo "nodes=$NODES conns=$CONNS procs=$PROCS ramp=$RAMP/s hold=$HOLD storm=$STORM client=$client"
	if [ "$STORM" = 1 ]; then
		# loadgen's figures of the storm: what the killed node held, the
		# reconnects after the kill, the deliveries across it
		echo "killed: gw-$NODES (SIGKILL 5 s into the hold), $STORM_WEIGHT of $((NODES - 1 + STORM_WEIGHT)) shares of the connections"
		grep -E '^ *(connections|pushes|deliveries|order|after kill)' "$OUT/loadgen.txt" || true
	fi
	echo "$summary"
	echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!docs' 2>/dev/null; [ $? = 1 ] && echo ' (with changes)')  date: $(date -u +%FT%TZ)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/summary.txt"
