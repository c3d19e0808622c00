#!/usr/bin/env bash
# make cluster: a real local cluster on 127.0.0.1 (PROTOCOL §8) in the
# foreground until Ctrl-C: nats-server on 14222 (JetStream), redis-server on
# 16379 with AOF persistence, nodes gw-1..gw-3 on HTTP 8080/8082/8084 and
# WebSocket 8081/8083/8085 with configs/cluster-local.yaml, data under
# ./data/cluster, every log line prefixed with its process.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
PATH=$PATH:/usr/sbin:/sbin # Debian's nats-server
BIN=${BIN:-bin/liveedge}
DATA=${DATA:-data/cluster}
NODES=${NODES:-3}
mkdir -p "$DATA/nats" "$DATA/redis"
case $DATA in /*) ABS=$DATA ;; *) ABS=$PWD/$DATA ;; esac
pids=() # NATS, Redis, then the nodes
cleanup() {
	trap - INT TERM EXIT
	echo "stopping the cluster..."
	# The nodes first, waited for: their graceful stop still uses NATS and
	# Redis (unacked pushes kept in Redis, presence removed, leases given
	# back); then NATS and Redis. (The backends run in sessions of their
	# own, so a terminal's Ctrl-C does not stop them under the nodes.)
	for p in "${pids[@]:2}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]:2}"; do wait "$p" 2>/dev/null || true; done
	for p in "${pids[@]:0:2}"; do kill -TERM "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
# Ctrl-C (or a TERM) stops everything and ends the script at once — it
# must not go on starting nodes after the cleanup.
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

# The prefixers ignore Ctrl-C: killed with the terminal's process group,
# they broke the nodes' log pipes, and a node writing its "shutting down"
# line died of SIGPIPE instead of stopping gracefully.
prefix() {
	trap '' INT
	exec sed -u "s/^/[$1] /"
}

# Every port free first: a stray server (a cluster left by a second Ctrl-C,
# `make run` on 8080) would be taken for this cluster's.
ports="14222 16379"
for i in $(seq "$NODES"); do ports="$ports $((8080 + 2 * (i - 1))) $((8081 + 2 * (i - 1)))"; done
for port in $ports; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		echo "port $port on 127.0.0.1 is in use: stop what listens there (a cluster left running, make run) first" >&2
		trap - INT TERM EXIT
		exit 1
	fi
done

setsid nats-server -a 127.0.0.1 -p 14222 -js -sd "$ABS/nats" > >(prefix nats) 2>&1 &
pids+=($!)
setsid redis-server --bind 127.0.0.1 --port 16379 --dir "$ABS/redis" --appendonly yes \
	--appendfsync everysec --save "" --maxmemory-policy noeviction > >(prefix redis) 2>&1 &
pids+=($!)
for _ in $(seq 100); do
	(exec 3<>/dev/tcp/127.0.0.1/14222) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/16379) 2>/dev/null && break
	sleep 0.1
done
nodes=""
for i in $(seq "$NODES"); do nodes="$nodes${nodes:+,}gw-$i"; done
for i in $(seq "$NODES"); do
	http=$((8080 + 2 * (i - 1)))
	ws=$((http + 1))
	LIVEEDGE_NODE_ID=gw-$i LIVEEDGE_NODE_DATA_DIR="$DATA/gw-$i" \
		LIVEEDGE_HTTP_ADDR=127.0.0.1:$http LIVEEDGE_WS_ADDR=127.0.0.1:$ws LIVEEDGE_WALLET_NODES=$nodes \
		"$BIN" -config configs/cluster-local.yaml > >(prefix "gw-$i") 2>&1 &
	pids+=($!)
	echo "gw-$i: http://127.0.0.1:$http  ws://127.0.0.1:$ws/ws"
done
for p in "${pids[@]:0:2}"; do
	kill -0 "$p" 2>/dev/null || { echo "NATS or Redis did not start (see its log above)" >&2; exit 1; }
done
for i in $(seq "$NODES"); do
	http=$((8080 + 2 * (i - 1)))
	ready=""
	for _ in $(seq 300); do
		curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$http/readyz" 2>/dev/null && { ready=1; break; }
		kill -0 "${pids[$((i + 1))]}" 2>/dev/null || { echo "gw-$i exited (see its log above)" >&2; exit 1; }
		sleep 0.1
	done
	[ -n "$ready" ] || { echo "gw-$i not ready within 30 s (see its log above)" >&2; exit 1; }
done
echo "cluster up: NATS 127.0.0.1:14222, Redis 127.0.0.1:16379 (AOF in $DATA/redis); Ctrl-C stops everything"
# A node that dies (e.g. killed to watch its clients fail over) leaves the
# others running; Ctrl-C, the end of NATS or Redis, or the end of every node
# stops everything — the last for a Ctrl-C this script could not trap (bash
# cannot trap a signal ignored when it started, as under a launcher without
# job control), which still reaches the nodes.
while kill -0 "${pids[0]}" 2>/dev/null && kill -0 "${pids[1]}" 2>/dev/null; do
	alive=""
	for p in "${pids[@]:2}"; do kill -0 "$p" 2>/dev/null && alive=1; done
	[ -n "$alive" ] || break
	sleep 1 &
	wait $! || true # (a trapped signal interrupts this wait at once)
done
