#!/usr/bin/env bash
# Issue 15 items 2 and 3 on this machine: a real local cluster of NODES node
# processes (configs/cluster-local.sh: nats-server, redis-server, gw-1..gw-N),
# CONNS idle SDK connections spread over them by loadgen (-procs PROCS,
# heartbeats on), every node's RSS and CPU sampled while they are held; then,
# with STORM=1, a reconnect storm: loadgen kills gw-N (SIGKILL) and measures
# the time until its clients are reconnected to the others and re-joined.
#
#   loadtest/scripts/cluster-idle.sh                  # 100,000 over 6 nodes
#   CONNS=15000 NODES=3 STORM=1 loadtest/scripts/cluster-idle.sh
#
# Writes $OUT/idle.json (loadgen), $OUT/nodes.csv (all nodes' RSS and CPU, every 5 s) and
# $OUT/summary.txt. Loopback only; bounded by CONNS, HOLD and the ramp.
set -euo pipefail
cd "$(dirname "$0")/../.."
NODES=${NODES:-6}
CONNS=${CONNS:-100000}
PROCS=${PROCS:-6}
RAMP=${RAMP:-2000}
HOLD=${HOLD:-60s}
STORM=${STORM:-0}
OUT=${OUT:-data/cluster-idle}
DATA=$(mktemp -d /tmp/liveedge-cluster-idle.XXXXXX)
mkdir -p "$OUT"
make -s build
go build -o bin/loadgen ./cmd/loadgen

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
echo "nodes: ${pids[*]}"

rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; } # clock ticks
before=0
for p in "${pids[@]}"; do before=$((before + $(rss "$p"))); done
echo "t,rss_bytes,cpu_ticks" >"$OUT/nodes.csv" # all nodes together, every 5 s
(
	t=0
	while sleep 5; do
		t=$((t + 5))
		r=0 c=0
		for p in "${pids[@]}"; do r=$((r + $(rss "$p"))); c=$((c + $(cpu "$p"))); done
		echo "$t,$r,$c" >>"$OUT/nodes.csv"
	done
) &
sampler=$!

args=(-scenario idle -ws "$ws" -http "$http" -conns "$CONNS" -procs "$PROCS" -ramp "$RAMP" -duration "$HOLD" -q -json "$OUT/idle.json")
if [ "$STORM" = 1 ]; then
	args=(-scenario reconnect-storm -ws "$ws" -http "$http" -conns "$CONNS" -procs "$PROCS" -ramp "$RAMP"
		-duration "$HOLD" -rate 2 -kill-after 5s -kill-pid "${pids[$((NODES - 1))]}" -q -json "$OUT/storm.json")
fi
bin/loadgen "${args[@]}" || true
kill $sampler 2>/dev/null || true
hz=$(getconf CLK_TCK)
# While the connections are held: the samples whose RSS is within 3 % of the
# highest. Idle CPU: the quietest 20 s among them (after the ramp).
summary=$(awk -F, -v before="$before" -v conns="$CONNS" -v hz="$hz" 'NR > 1 { t[NR] = $1; r[NR] = $2; c[NR] = $3; if ($2 > max) max = $2; n = NR }
END {
	best = -1
	for (i = 2; i + 4 <= n; i++) {
		ok = 1
		for (j = i; j <= i + 4; j++) if (r[j] < 0.97 * max) ok = 0
		if (!ok) continue
		d = (c[i + 4] - c[i]) / hz / (t[i + 4] - t[i])
		if (best < 0 || d < best) best = d
	}
	printf "node RSS before: %d B, with the connections held: %d B\n", before, max
	printf "node RSS per connection: %d B\n", (max - before) / conns
	printf "node CPU while the connections are held and idle (all nodes, cores, quietest 20 s): %.3f\n", best
}' "$OUT/nodes.csv")
{
	echo "nodes=$NODES conns=$CONNS procs=$PROCS ramp=$RAMP/s hold=$HOLD storm=$STORM"
	echo "$summary"
	echo "commit: $(git rev-parse --short HEAD)  date: $(date -u +%FT%TZ)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc)"
} | tee "$OUT/summary.txt"
