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
# Writes $OUT/idle.json (loadgen), $OUT/rss.csv (per node, every 5 s) and
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
	for _ in $(seq 200); do curl -fs "http://127.0.0.1:$h/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
done
pidof_port() { ss -Hltnp "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
pids=()
for i in $(seq "$NODES"); do pids+=("$(pidof_port $((8081 + 2 * (i - 1))))"); done
echo "nodes: ${pids[*]}"

rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; } # clock ticks
before=0
for p in "${pids[@]}"; do before=$((before + $(rss "$p"))); done
echo "t,node,rss_bytes" >"$OUT/rss.csv"
(
	t=0
	while sleep 5; do
		t=$((t + 5))
		for i in "${!pids[@]}"; do echo "$t,gw-$((i + 1)),$(rss "${pids[$i]}")" >>"$OUT/rss.csv"; done
	done
) &
sampler=$!

args=(-scenario idle -ws "$ws" -http "$http" -conns "$CONNS" -procs "$PROCS" -ramp "$RAMP" -duration "$HOLD" -q -json "$OUT/idle.json")
if [ "$STORM" = 1 ]; then
	args=(-scenario reconnect-storm -ws "$ws" -http "$http" -conns "$CONNS" -procs "$PROCS" -ramp "$RAMP"
		-duration "$HOLD" -rate 2 -kill-after 5s -kill-pid "${pids[$((NODES - 1))]}" -q -json "$OUT/storm.json")
fi
bin/loadgen "${args[@]}" &
lg=$!
# Idle CPU and RSS once every connection is up: the ramp is CONNS/RAMP s.
ramp_s=$(( CONNS / RAMP + 10 ))
sleep "$ramp_s"
c0=0; for p in "${pids[@]}"; do c0=$((c0 + $(cpu "$p"))); done
sleep 20
c1=0; for p in "${pids[@]}"; do c1=$((c1 + $(cpu "$p"))); done
after=0
for p in "${pids[@]}"; do after=$((after + $(rss "$p"))); done
wait $lg || true
kill $sampler 2>/dev/null || true
hz=$(getconf CLK_TCK)
{
	echo "nodes=$NODES conns=$CONNS procs=$PROCS ramp=$RAMP/s hold=$HOLD storm=$STORM"
	echo "node RSS before: $before B, with the connections held: $after B"
	echo "node RSS per connection: $(( (after - before) / CONNS )) B"
	echo "node CPU while idle (all nodes, cores): $(awk -v d=$((c1 - c0)) -v hz="$hz" 'BEGIN {printf "%.3f", d / hz / 20}')"
	echo "commit: $(git rev-parse --short HEAD)  date: $(date -u +%FT%TZ)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc)"
} | tee "$OUT/summary.txt"
