#!/usr/bin/env bash
# Idle memory per connection, LiveEdge beside a bare gws server, in one run
# (docs/performance.md). Usage, from the repository root after `make build`:
#
#   loadtest/idle-compare.sh CONNS [PROCS] [GOGC]
#
# Starts bin/liveedge (configs/single.yaml; HTTP 18160, WebSocket 18161, a
# temporary data dir) and bin/bareserver (18170/18171, GOGC as node.gogc),
# one after the other, and holds CONNS joined idle connections against each
# with bin/loadgen -scenario idle in PROCS client processes (default 2; a
# process may hold 20,000 files). Prints both summaries; JSON in $OUT.
# NODE_BIN=path runs another liveedge build; SKIP_BARE=1 skips the baseline.
set -euo pipefail
CONNS=${1:?connections}
PROCS=${2:-2}
GOGC_NODE=${3:-400}
RAMP=${RAMP:-1000}
HOLD=${HOLD:-20s}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
NODE_BIN=${NODE_BIN:-bin/liveedge} # e.g. a build of an earlier commit, for before/after
SKIP_BARE=${SKIP_BARE:-}
DATA=$(mktemp -d)
NODE= BARE=
# a failed run still stops its server (make bench goes on to other runs)
trap 'kill $NODE $BARE 2>/dev/null || true; rm -rf "$DATA"' EXIT
rm -f "$OUT/liveedge-$CONNS.json" "$OUT/bare-$CONNS.json" # no stale twin for the report

# Viewers' tokens are signed by the loadgen with the dev secret of
# configs/single.yaml, as an app's backend would issue them (the bare server
# ignores them): neither server's figures include minting tokens.
SECRET=liveedge-dev-secret-change-me
lg() { # name http ws pid
	bin/loadgen -scenario idle -http "$2" -ws "$3" -conns "$CONNS" -procs "$PROCS" -ramp "$RAMP" -token-secret "$SECRET" \
		-duration "$HOLD" -node-pid "$4" -q -json "$OUT/$1-$CONNS.json" | sed "s/^/[$1] /"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }

LIVEEDGE_HTTP_ADDR=127.0.0.1:18160 LIVEEDGE_WS_ADDR=127.0.0.1:18161 LIVEEDGE_NODE_DATA_DIR="$DATA" \
	LIVEEDGE_NODE_GOGC="$GOGC_NODE" LIVEEDGE_LOG_LEVEL=warn "$NODE_BIN" -config configs/single.yaml >"$OUT/liveedge.log" 2>&1 &
NODE=$!
wait_port 18161; sleep 2
lg liveedge http://127.0.0.1:18160 ws://127.0.0.1:18161/ws "$NODE"
stop "$NODE"

[ -n "$SKIP_BARE" ] && exit 0
bin/bareserver -http 127.0.0.1:18170 -ws 127.0.0.1:18171 -gogc "$GOGC_NODE" >"$OUT/bare.log" 2>&1 &
BARE=$!
wait_port 18171; sleep 1
lg bare http://127.0.0.1:18170 ws://127.0.0.1:18171/ws "$BARE"
stop "$BARE"
echo "JSON in $OUT"
