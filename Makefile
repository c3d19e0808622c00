# LiveEdge — the two commands are `make run` and `make test`.
GO        ?= go
BIN       := bin
# Fuzz budgets are execution counts, not durations: with a -fuzztime
# duration, Go 1.26's fuzz coordinator can report a spurious "context deadline
# exceeded" failure at the deadline (golang/go#75804, fixed in Go 1.27).
# ~10 s each here.
FUZZ_FRAME ?= 60000x
FUZZ_NOTIFY ?= 30000x
# -p 1: packages run one after another, so latency assertions (pushes within
# 1 s on a 2-core machine) do not compete with another package's 1,000 clients.
TESTFLAGS ?= -race -p 1 -timeout 25m
# Tests whose latency bounds only mean something without the race detector
# (they skip the bound under -race): run once more in a normal build.
TIMING_TESTS := ^TestSlowConsumerClosedRoomUnaffected$$
CONFIG    ?= configs/single.yaml
# Debian puts nats-server in /usr/sbin, off a normal user's PATH.
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: run build test ts-test k6-check tools cluster-tools vet fmt-check fuzz bench bench-go bench-loadgen bench-webhook bench-idle-large bench-report clean cluster

run: build
	./$(BIN)/liveedge -config $(CONFIG)

# A real local cluster (PROTOCOL §8): nats-server :14222, redis-server :16379
# (AOF), gw-1..gw-3 on 8080/8081, 8082/8083, 8084/8085, data under
# ./data/cluster, logs prefixed by process; Ctrl-C stops everything.
cluster: cluster-tools build
	bash configs/cluster-local.sh

build:
	$(GO) build -o $(BIN)/liveedge ./cmd/liveedge
	$(GO) build -o $(BIN)/loadgen ./cmd/loadgen
	$(GO) build -o $(BIN)/wrkwebhook ./cmd/wrkwebhook
	$(GO) build -o $(BIN)/benchreport ./cmd/benchreport
	$(GO) build -o $(BIN)/bareserver ./cmd/bareserver

# Everything CI runs: static checks, every test under -race (then the timing
# tests again without it), a short fuzz run
# of each parser (seed corpus in testdata/fuzz is always run by go test).
test: tools vet fmt-check
	$(GO) test $(TESTFLAGS) ./...
	$(GO) test -count=1 -run '$(TIMING_TESTS)' ./gateway/
	$(MAKE) ts-test
	$(MAKE) k6-check
	$(MAKE) fuzz

# The TypeScript SDK (clientsdk/ts): its node tests against the real binary,
# and a check that the committed browser bundle (gateway/demo/liveedge.js,
# embedded by go build) is the one its sources build.
ts-test: build
	cd clientsdk/ts && { [ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --no-audit --no-fund; } && \
	  npm run --silent check-bundle && LIVEEDGE_BIN=$(CURDIR)/$(BIN)/liveedge npm test

# The k6 scenarios (loadtest/k6; k6 itself is not installed here, see its
# README): type-checked against the pinned @types/k6, and their protocol
# module (lib/liveedge.js) run by node's test runner against the real binary.
k6-check: build
	cd loadtest/k6 && { [ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --no-audit --no-fund; } && \
	  npx --no-install tsc --checkJs --noEmit -p . && \
	  LIVEEDGE_BIN=$(CURDIR)/$(BIN)/liveedge node --test test/*.test.mjs

# Tools the tests shell out to (a fresh Debian machine may lack them), as
# command:package (chromium drives the demo page test; node and npm the TS SDK's;
# gcc the race detector's cgo). Go itself is a prerequisite (README).
# make cluster needs only its servers: its own target, so that `make cluster
# test` still installs everything the tests need (a target-specific TOOLS on
# cluster once narrowed the one `tools` run both share).
TOOLS := git:git curl:curl make:make gcc:gcc redis-server:redis-server nats-server:nats-server chromium:chromium node:nodejs npm:npm wrk:wrk
CLUSTER_TOOLS := git:git curl:curl nats-server:nats-server redis-server:redis-server
define install-tools
	@missing=""; for tp in $(1); do command -v $${tp%%:*} >/dev/null 2>&1 || missing="$$missing $${tp#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(GO) mod download
endef
tools:
	$(call install-tools,$(TOOLS))
cluster-tools:
	$(call install-tools,$(CLUSTER_TOOLS))

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeClientFrame$$' -fuzztime=$(FUZZ_FRAME) ./gateway/proto
	$(GO) test -run='^$$' -fuzz='^FuzzNotify$$' -fuzztime=$(FUZZ_NOTIFY) ./edge/pay
	$(GO) test -run='^$$' -fuzz='^FuzzClusterWire$$' -fuzztime=$(FUZZ_FRAME) ./router
	$(GO) test -run='^$$' -fuzz='^FuzzSplit$$' -fuzztime=$(FUZZ_NOTIFY) ./edge/redpacket
	$(GO) test -run='^$$' -fuzz='^FuzzReaderSplits$$' -fuzztime=$(FUZZ_NOTIFY) ./gateway
	$(GO) test -run='^$$' -fuzz='^FuzzGiftFrame$$' -fuzztime=$(FUZZ_NOTIFY) ./edge/gift
	$(GO) test -run='^$$' -fuzz='^FuzzParseSeat$$' -fuzztime=$(FUZZ_NOTIFY) ./edge/ticket

# Benchmarks and the report: `make bench` runs the Go benchmarks (output in
# bench.out), the loadgen scenarios and the wrk webhook run (JSON under
# bench-tmp/), each against a fresh node of its own on free loopback ports,
# then writes docs/bench/latest.json, latest.md and the PNG plots README
# shows (cmd/benchreport). ~10 min on 2 cores; run on an otherwise idle
# machine. Each figure is compared with a baseline measured in the same run.
BENCH_TMP ?= bench-tmp
BENCH_OUT ?= docs/bench
# loadgen idle sizes (connections) and gift offered rates (gifts/s from 500 senders)
BENCH_IDLE ?= 1000 2000 5000
BENCH_GIFT_RATES ?= 1000 2000 4000 8000
# the payment webhook with wrk: orders, each notified once
BENCH_WEBHOOK_ORDERS ?= 50000
# router/bench: the single-node fan-out and its bare baselines, the burst
# phase the same 2M deliveries at both sizes (2,000 pushes to 1k viewers, 200
# to 10k: the bare loop writes one frame per push per viewer, and 2,000 pushes
# to 10k took it 6 of make bench's 16 min); the 10k run includes the cluster
# fan-out (10,000 viewers over 3 nodes beside the same on 1; nats-server and
# redis-server on free ports, +1-2 min): BENCH_FANOUT_10K without ClusterFanout
# leaves it out
BENCH_FANOUT_1K ?= ^Benchmark(RoomFanout|BareGwsLoop)_1k$$
BENCH_FANOUT_10K ?= ^Benchmark(RoomFanout|BareGwsLoop|ClusterFanout)_10k$$
BENCH_FANOUT_1K_PUSHES ?= 2000
BENCH_FANOUT_10K_PUSHES ?= 200

bench: tools build
	rm -rf $(BENCH_TMP) && mkdir -p $(BENCH_TMP)/loadgen
	{ for i in $$(seq 480); do echo "$$(date +%s) $$(cat /proc/loadavg)" >> $(BENCH_TMP)/load.txt; sleep 10; done & echo $$! > $(BENCH_TMP)/load.pid; }
	$(MAKE) bench-go
	$(MAKE) bench-loadgen || echo bench-loadgen >> $(BENCH_TMP)/failed
	$(MAKE) bench-idle-large || echo bench-idle-large >> $(BENCH_TMP)/failed
	$(MAKE) bench-webhook || echo bench-webhook >> $(BENCH_TMP)/failed
	kill $$(cat $(BENCH_TMP)/load.pid) 2>/dev/null; echo "$$(date +%s) $$(cat /proc/loadavg)" >> $(BENCH_TMP)/load.txt
	$(MAKE) bench-report
	! grep -q '^FAIL' bench.out && [ ! -e $(BENCH_TMP)/failed ] || { echo "failed: $$(cat $(BENCH_TMP)/failed 2>/dev/null) $$(grep '^FAIL' bench.out)"; exit 1; }

bench-go:
	{ $(GO) test -run='^$$' -bench='$(BENCH_FANOUT_1K)' -benchtime=$(BENCH_FANOUT_1K_PUSHES)x -timeout=30m ./router/bench/ && \
	  $(GO) test -run='^$$' -bench='$(BENCH_FANOUT_10K)' -benchtime=$(BENCH_FANOUT_10K_PUSHES)x -timeout=30m ./router/bench/ && \
	  $(GO) test -run='^$$' -bench=. -benchtime=1x -timeout=30m ./edge/gift/bench/ && \
	  $(GO) test -run='^$$' -bench='NotifyVerified|NotifyHTTP' -benchtime=20000x -timeout=30m ./edge/pay/bench/ && \
	  $(GO) test -run='^$$' -bench=Grab -benchtime=1x -timeout=30m ./edge/redpacket/bench/ ; } 2>&1 | tee bench.out

# loadgen against a fresh node per run: idle memory per connection at each
# size; the gift storm at fixed offered rates; a red-packet grab storm.
bench-loadgen: build
	mkdir -p $(BENCH_TMP)/loadgen
	for n in $(BENCH_IDLE); do \
	  ./$(BIN)/loadgen -liveedge $(BIN)/liveedge -scenario idle -conns $$n -ramp 1000 -duration 3s -q \
	    -json $(BENCH_TMP)/loadgen/idle-$$n.json || exit 1; done
	for r in $(BENCH_GIFT_RATES); do \
	  ./$(BIN)/loadgen -liveedge $(BIN)/liveedge -scenario gift -conns 500 -rate $$r -duration 5s -q \
	    -json $(BENCH_TMP)/loadgen/gift-$$r.json || exit 1; done
	./$(BIN)/loadgen -liveedge $(BIN)/liveedge -scenario grab -conns 2000 -ramp 2000 -duration 3s -q \
	  -json $(BENCH_TMP)/loadgen/grab-2000.json

# The payment webhook over real HTTP with wrk: a fresh node, orders created
# beforehand, one pre-signed notify each (loadtest/wrk/webhook.lua), then
# every order must be paid and credited exactly once (cmd/wrkwebhook).
bench-webhook: tools build
	mkdir -p $(BENCH_TMP)
	./$(BIN)/wrkwebhook -liveedge $(BIN)/liveedge -orders $(BENCH_WEBHOOK_ORDERS) -max-time 60s -q \
	  -json $(BENCH_TMP)/webhook.json

# Idle memory per connection at 10k and 19k in one node process, a bare gws
# server holding the same connections right after it (loadtest/idle-compare.sh,
# ports 18160-18171; ~1.5 GB of memory; 2 loadgen processes, a process may
# hold 20,000 files here; held 20 s, a heartbeat each: the idle CPU):
# liveedge-N.json and bare-N.json (~4 min).
BENCH_IDLE_LARGE ?= 10000 19000
bench-idle-large: build
	mkdir -p $(BENCH_TMP)/loadgen
	for n in $(BENCH_IDLE_LARGE); do \
	  OUT=$(BENCH_TMP)/loadgen bash loadtest/idle-compare.sh $$n 2 400 || exit 1; done

# The report from what the runs above left: bench.out, $(BENCH_TMP)/.
bench-report: build
	./$(BIN)/benchreport -bench bench.out -loadgen '$(BENCH_TMP)/loadgen/*.json' \
	  -webhook $(BENCH_TMP)/webhook.json -load $(BENCH_TMP)/load.txt \
	  -cluster-idle '$(BENCH_OUT)/cluster-idle-*.txt,$(BENCH_OUT)/cluster-storm-*.txt' -out $(BENCH_OUT)

clean:
	rm -rf $(BIN) data bench.out $(BENCH_TMP)
