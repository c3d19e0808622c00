// Package benchreport turns one `make bench` run into a report: it parses
// the `go test -bench` output (golang.org/x/perf/benchfmt), the loadgen JSON
// files and the wrk webhook result, puts every headline figure beside its
// baseline from the same run, and writes latest.json, latest.md and PNG plots
// (gonum/plot). It runs nothing itself: cmd/benchreport is its command and
// the Makefile's bench target produces its inputs.
package benchreport

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/liveedge/liveedge/loadtest"
)

// Machine is where the run happened.
type Machine struct {
	CPU       string `json:"cpu"`
	Cores     int    `json:"cores"`
	GoVersion string `json:"go_version"`
	Kernel    string `json:"kernel"`
	OS        string `json:"os"`
	// Load: the machine's 1-minute load average sampled during the run
	// (make bench: at its start and every 10 s), and how long the run took
	// — other work on the same cores moves every figure.
	Load       []float64 `json:"load_average,omitempty"`
	RunSeconds float64   `json:"run_seconds,omitempty"`
}

// Figure is one headline number beside its baseline from the same run.
type Figure struct {
	Group    string   `json:"group"`
	What     string   `json:"what"`
	Value    float64  `json:"value"`
	Unit     string   `json:"unit"`
	Baseline string   `json:"baseline,omitempty"` // what the baseline is
	Base     *float64 `json:"baseline_value,omitempty"`
	Ratio    *float64 `json:"ratio,omitempty"` // value ÷ baseline
	Target   string   `json:"target,omitempty"`
	Met      *bool    `json:"met,omitempty"` // nil: no target
	Source   string   `json:"source"`        // the benchmark or file it comes from
}

// Report is latest.json.
type Report struct {
	Date    string       `json:"date"` // RFC 3339, UTC
	Commit  string       `json:"commit"`
	Dirty   bool         `json:"dirty,omitempty"`
	Machine Machine      `json:"machine"`
	Figures []Figure     `json:"figures"`
	Missing []string     `json:"missing,omitempty"` // figures whose benchmark did not run or failed
	Plots   []Plot       `json:"plots"`
	Bench   *BenchRun    `json:"bench"`
	Loadgen []LoadgenRun `json:"loadgen"`
	Webhook *Webhook     `json:"webhook,omitempty"`
	// ClusterIdle: summaries of idle holds over several node processes
	// (loadtest/scripts/cluster-idle.sh's summary.txt, kept under
	// docs/bench/): too long and too heavy for make bench, shown as written.
	ClusterIdle []ClusterIdle `json:"cluster_idle,omitempty"`
	Sources     []Source      `json:"sources,omitempty"` // the input files and when each was written
}

// ClusterIdle is one cluster-idle.sh summary.
type ClusterIdle struct {
	File    string `json:"file"`
	Summary string `json:"summary"`
}

// Source is one input file of the report.
type Source struct {
	File    string `json:"file"`
	Written string `json:"written"` // RFC 3339, UTC
}

// Plot is one PNG written beside the report.
type Plot struct {
	File  string `json:"file"`
	Title string `json:"title"`
}

// Inputs are what Build reads.
type Inputs struct {
	Bench       *BenchRun
	Loadgen     []LoadgenRun
	Webhook     *Webhook
	ClusterIdle []ClusterIdle
	Machine     Machine
	Commit      string
	Dirty       bool
	Date        time.Time
	Sources     []Source
}

// rule names a headline figure: a metric of a benchmark, optionally a
// baseline metric of another, and a target on the value or on the ratio.
type rule struct {
	group, what string
	bench, unit string
	baseline    string // description
	baseBench   string
	baseUnit    string
	target      string
	ok          func(v, ratio float64) bool
}

func atLeastRatio(x float64) func(v, r float64) bool {
	return func(_, r float64) bool { return r >= x }
}
func atMostRatio(x float64) func(v, r float64) bool {
	return func(_, r float64) bool { return r > 0 && r <= x }
}
func atLeast(x float64) func(v, r float64) bool { return func(v, _ float64) bool { return v >= x } }
func atMost(x float64) func(v, r float64) bool  { return func(v, _ float64) bool { return v <= x } }

var rules = []rule{
	{group: "fan-out", what: "room fan-out, 1,000 viewers: pushes/s delivered to every viewer", bench: "RoomFanout_1k", unit: "pushes/s",
		baseline: "bare gws loop, one frame per push per viewer", baseBench: "BareGwsLoop_1k", baseUnit: "pushes/s", target: "≥ 20×", ok: atLeastRatio(20)},
	{group: "fan-out", what: "room fan-out, 10,000 viewers: pushes/s", bench: "RoomFanout_10k", unit: "pushes/s",
		baseline: "bare gws loop", baseBench: "BareGwsLoop_10k", baseUnit: "pushes/s", target: "≥ 20×", ok: atLeastRatio(20)},
	{group: "fan-out", what: "fan-out p50 at light load (paced), 1,000 viewers, ms", bench: "RoomFanout_1k", unit: "paced-p50-ms",
		baseline: "bare gws loop, same pace", baseBench: "BareGwsLoop_1k", baseUnit: "paced-p50-ms", target: "≤ 1.1×", ok: atMostRatio(1.1)},
	{group: "fan-out", what: "fan-out p99 at light load (paced), 1,000 viewers, ms", bench: "RoomFanout_1k", unit: "paced-p99-ms",
		baseline: "bare gws loop, same pace", baseBench: "BareGwsLoop_1k", baseUnit: "paced-p99-ms", target: "≤ 1.1×", ok: atMostRatio(1.1)},
	{group: "fan-out", what: "fan-out p50 at light load (paced), 10,000 viewers, ms", bench: "RoomFanout_10k", unit: "paced-p50-ms",
		baseline: "bare gws loop, same pace", baseBench: "BareGwsLoop_10k", baseUnit: "paced-p50-ms", target: "≤ 1.1×", ok: atMostRatio(1.1)},
	{group: "fan-out", what: "fan-out p99 at light load (paced), 10,000 viewers, ms", bench: "RoomFanout_10k", unit: "paced-p99-ms",
		baseline: "bare gws loop, same pace", baseBench: "BareGwsLoop_10k", baseUnit: "paced-p99-ms", target: "≤ 1.1×", ok: atMostRatio(1.1)},
	{group: "fan-out", what: "cluster fan-out: 10,000 viewers of one room over 3 cluster nodes (one process, the same 2 cores), deliveries/s", bench: "ClusterFanout_10k/3nodes", unit: "deliveries/s",
		baseline: "the same 10,000 on 1 cluster node", baseBench: "ClusterFanout_10k/1node", baseUnit: "deliveries/s", target: "≥ 0.7×", ok: atLeastRatio(0.7)},
	{group: "gifts", what: "durable gifts/s, hot workload (10 combo senders, 10 % hot)", bench: "GiftDebit_Hot/liveedge", unit: "gifts/s",
		baseline: "seed re-creation (Redis SETNX lock, sleep, DECRBY, async DB write)", baseBench: "GiftDebit_Hot/seed", baseUnit: "gifts/s", target: "≥ 50×", ok: atLeastRatio(50)},
	{group: "gifts", what: "durable gifts/s, hot mix served by a pool of 512 clients", bench: "GiftDebit_HotPool/liveedge", unit: "gifts/s",
		baseline: "seed re-creation", baseBench: "GiftDebit_HotPool/seed", baseUnit: "gifts/s"},
	{group: "gifts", what: "durable gifts/s, spread over 10,000 senders", bench: "GiftDebit_Spread/liveedge", unit: "gifts/s",
		baseline: "seed re-creation", baseBench: "GiftDebit_Spread/seed", baseUnit: "gifts/s", target: "≥ 2×", ok: atLeastRatio(2)},
	{group: "gifts", what: "gifts/s over WebSocket end to end (500 conns), plain frames", bench: "GiftWS/liveedge", unit: "gifts/s",
		baseline: "bare gws echo of the same frame size", baseBench: "GiftWS/echo", baseUnit: "gifts/s", target: "≥ 0.8×", ok: atLeastRatio(0.8)},
	{group: "gifts", what: "gifts/s over WebSocket, ?batch=1", bench: "GiftWS/liveedge_batch", unit: "gifts/s",
		baseline: "bare gws echo", baseBench: "GiftWS/echo", baseUnit: "gifts/s", target: "≥ 0.8×", ok: atLeastRatio(0.8)},
	{group: "gifts", what: "gift p99 over WebSocket at half that rate, ms", bench: "GiftWS/liveedge_half", unit: "p99-ms",
		baseline: "bare echo offered the same rate", baseBench: "GiftWS/echo_at_liveedge_half", baseUnit: "p99-ms", target: "≤ 20 ms", ok: atMost(20)},
	{group: "gifts", what: "gift p99 at half rate vs the echo at the same load", bench: "GiftWS/liveedge_half", unit: "p99-ms",
		baseline: "bare echo offered the same rate", baseBench: "GiftWS/echo_at_liveedge_half", baseUnit: "p99-ms", target: "≤ 5×", ok: atMostRatio(5)},
	{group: "gifts", what: "gift p99 at a quarter of the max rate, ms", bench: "GiftWS/liveedge_quarter", unit: "p99-ms",
		baseline: "bare echo offered the same rate", baseBench: "GiftWS/echo_at_liveedge_quarter", baseUnit: "p99-ms", target: "≤ 5×", ok: atMostRatio(5)},
	{group: "gifts", what: "gift p99 at a tenth of the max rate, ms", bench: "GiftWS/liveedge_tenth", unit: "p99-ms",
		baseline: "bare echo offered the same rate", baseBench: "GiftWS/echo_at_liveedge_tenth", baseUnit: "p99-ms", target: "≤ 5×", ok: atMostRatio(5)},
	{group: "gifts", what: "gift p99 at half rate, ?batch=1, ms", bench: "GiftWS/liveedge_batch_half", unit: "p99-ms",
		baseline: "bare echo offered the same rate", baseBench: "GiftWS/echo_at_liveedge_batch_half", baseUnit: "p99-ms", target: "≤ 20 ms", ok: atMost(20)},
	{group: "payments", what: "webhook: verified, exactly-once notifies/s in process (256 concurrent)", bench: "NotifyVerified", unit: "notifies/s",
		target: "≥ 20k/s", ok: atLeast(20000)},
	{group: "payments", what: "webhook over HTTP, Go client in the same process", bench: "NotifyHTTP", unit: "notifies/s",
		target: "≥ 20k/s", ok: atLeast(20000)},
	// Issue 13's baseline is "Redis RPOP, then a durable event publish per
	// grab acknowledged before the reply": JetStream with an fsync per
	// message (its default ack is not an fsync). The default-ack variant is
	// shown too, without a target.
	{group: "red packets", what: "red-packet grabs/s in process (pop + fsynced grant-and-credit), 256 grabbers", bench: "Grab_50k", unit: "liveedge-memory_grabs/s",
		baseline: "seed re-creation: Redis RPOP + a durable JetStream publish (fsync per message) acked before the reply", baseBench: "Grab_50k", baseUnit: "seed-rpop-jetstream-fsync_grabs/s", target: "≥ 10×", ok: atLeastRatio(10)},
	{group: "red packets", what: "red-packet grabs/s, the same", bench: "Grab_50k", unit: "liveedge-memory_grabs/s",
		baseline: "the seed with JetStream's default ack (not an fsync: not durable)", baseBench: "Grab_50k", baseUnit: "seed-rpop-jetstream_grabs/s"},
	{group: "red packets", what: "red-packet grabs/s over WebSocket, clients in another process", bench: "RedPacketGrabWS/liveedge", unit: "grabs/s",
		baseline: "bare gws echo of the same reply size", baseBench: "RedPacketGrabWS/echo", baseUnit: "grabs/s", target: "≥ 0.8×", ok: atLeastRatio(0.8)},
}

// Build computes the report's figures from its inputs.
func Build(in Inputs) *Report {
	rep := &Report{Date: in.Date.UTC().Format(time.RFC3339), Commit: in.Commit, Dirty: in.Dirty,
		Machine: in.Machine, Bench: in.Bench, Loadgen: in.Loadgen, Webhook: in.Webhook, ClusterIdle: in.ClusterIdle, Sources: in.Sources}
	if rep.Machine.CPU == "" && in.Bench != nil {
		rep.Machine.CPU = in.Bench.CPU
	}
	if rep.Bench == nil {
		rep.Bench = &BenchRun{}
	}
	for _, r := range rules {
		v, ok := in.Bench.Metric(r.bench, r.unit)
		if !ok {
			rep.Missing = append(rep.Missing, r.what+" ("+r.bench+")")
			continue
		}
		f := Figure{Group: r.group, What: r.what, Value: v, Unit: r.unit, Target: r.target, Source: r.bench}
		ratio := 0.0
		if r.baseBench != "" {
			f.Baseline = r.baseline
			if bv, ok := in.Bench.Metric(r.baseBench, r.baseUnit); ok {
				f.Base = &bv
				if bv != 0 {
					ratio = v / bv
					f.Ratio = &ratio
				}
			}
		}
		// a ratio target needs the baseline of this run
		if r.ok != nil && (f.Ratio != nil || !strings.HasSuffix(r.target, "×")) {
			met := r.ok(v, ratio)
			f.Met = &met
		}
		rep.Figures = append(rep.Figures, f)
	}
	for _, lg := range in.Loadgen {
		res := lg.Result
		switch lg.Scenario {
		case "idle":
			if strings.HasPrefix(lg.File, compareBare) {
				continue // the baseline of its liveedge- twin
			}
			if bare := compareTwin(in.Loadgen, lg.File); bare != nil {
				rep.Figures = append(rep.Figures, idleCompared(lg, bare)...)
				continue
			}
			if res.NodeRSSPerConn > 0 {
				client := "Go SDK client"
				if res.Client == "raw" {
					client = "raw idle client"
				}
				rep.Figures = append(rep.Figures, Figure{Group: "connections",
					What:  fmt.Sprintf("node RSS per idle joined connection, %s connections (heartbeats on; node CPU while holding them %.3f cores)", thousands(float64(res.Conns)), res.NodeCPUCores),
					Value: res.NodeRSSPerConn / 1024, Unit: "KiB", Baseline: "the loadgen (" + client + ") per connection, same run",
					Base: ptr(res.LoadgenRSSPerConn / 1024), Ratio: ratioOf(res.NodeRSSPerConn, res.LoadgenRSSPerConn), Source: lg.File})
			}
		case "fanout", "gift", "grab", "chat":
			what := fmt.Sprintf("%s: %s connections, deliveries/s (p50 %.1f ms, p99 %.1f ms)", lg.Scenario, thousands(float64(res.Conns)), res.P50Ms, res.P99Ms)
			v := res.DeliveriesPerSec
			unit := "deliveries/s"
			switch lg.Scenario {
			case "gift":
				what = fmt.Sprintf("gift storm (loadgen): %s senders, offered %s/s, gifts/s answered (p50 %.1f ms, p99 %.1f ms)", thousands(float64(res.Conns)), thousands(res.OfferedRate), res.P50Ms, res.P99Ms)
				v, unit = res.RepliesPerSec, "gifts/s"
			case "grab":
				what = fmt.Sprintf("grab storm (loadgen): %s grabbers, %s packets, grabs/s granted (p50 %.1f ms, p99 %.1f ms)", thousands(float64(res.Conns)), thousands(float64(res.Packets)), res.P50Ms, res.P99Ms)
				v, unit = res.RepliesPerSec, "grabs/s"
			}
			rep.Figures = append(rep.Figures, Figure{Group: "loadgen", What: what, Value: v, Unit: unit, Source: lg.File})
		}
	}
	if w := in.Webhook; w != nil {
		f := Figure{Group: "payments", What: fmt.Sprintf("webhook over real HTTP with wrk (%d conns, pre-signed bodies of %s real orders): verified, exactly-once notifies/s", w.Conns, thousands(float64(w.Orders))),
			Value: w.NotifiesPerS, Unit: "notifies/s", Target: "≥ 20k/s", Source: "wrk"}
		met := w.NotifiesPerS >= 20000 && w.ExactlyOnce
		f.Met = &met
		rep.Figures = append(rep.Figures, f)
	}
	return rep
}

// loadtest/idle-compare.sh writes liveedge-N.json and bare-N.json: a node
// and a bare gws server holding N idle joined connections, one after the
// other in one invocation (make bench-idle-large).
const (
	compareNode = "liveedge-"
	compareBare = "bare-"
)

// compareTwin is the bare server's run beside the idle-compare node run
// file, or nil.
func compareTwin(runs []LoadgenRun, file string) *loadtest.Result {
	if !strings.HasPrefix(file, compareNode) {
		return nil
	}
	want := compareBare + strings.TrimPrefix(file, compareNode)
	for _, r := range runs {
		if r.File == want {
			return r.Result
		}
	}
	return nil
}

// idleCompared is issue 16's item 1 figure: the node's RSS per idle joined
// connection (the run's highest sample, then at the hold's end) against a
// bare gws server's in the same invocation, target ≤ 8 KiB.
func idleCompared(lg LoadgenRun, bare *loadtest.Result) []Figure {
	res := lg.Result
	var out []Figure
	add := func(when string, v, base float64) {
		if v <= 0 {
			return
		}
		met := v <= 8<<10
		out = append(out, Figure{Group: "connections",
			What: fmt.Sprintf("node RSS per idle joined connection, %s connections in one process, %s (heartbeats on; node CPU while holding them %.3f cores, bare %.3f)",
				thousands(float64(res.Conns)), when, res.NodeCPUCores, bare.NodeCPUCores),
			Value: v / 1024, Unit: "KiB", Baseline: "bare gws server (goroutine per connection), same invocation",
			Base: basePtr(base / 1024), Ratio: ratioOf(v, base), Target: "≤ 8 KiB", Met: &met, Source: lg.File})
	}
	add("highest sample of the run", res.NodeRSSPerConn, bare.NodeRSSPerConn)
	add("at the hold's end", res.NodeRSSEndPerConn, bare.NodeRSSEndPerConn)
	return out
}

func ptr(v float64) *float64 { return &v }

// basePtr is a baseline's value, or nil if it was not measured.
func basePtr(v float64) *float64 {
	if v <= 0 {
		return nil
	}
	return &v
}

func ratioOf(a, b float64) *float64 {
	if b == 0 {
		return nil
	}
	return ptr(a / b)
}

// WriteJSON writes the report to path.
func (rep *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// DetectMachine reads this machine's CPU model (/proc/cpuinfo), cores, Go
// version (of `go`, else of this binary) and kernel release.
func DetectMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), OS: runtime.GOOS + "/" + runtime.GOARCH}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("go", "env", "GOVERSION").Output(); err == nil && len(out) > 0 {
		m.GoVersion = strings.TrimSpace(string(out))
	}
	return m
}

// GitCommit is HEAD's short hash and whether the tree has changes.
func GitCommit(dir string) (string, bool) {
	out, err := exec.Command("git", "-C", dir, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown", false
	}
	st, _ := exec.Command("git", "-C", dir, "status", "--porcelain", "--untracked-files=no").Output()
	return strings.TrimSpace(string(out)), len(strings.TrimSpace(string(st))) > 0
}

// thousands formats v with thousands separators and no decimals (or 3
// significant digits below 100).
func thousands(v float64) string {
	if v < 100 && v != float64(int64(v)) {
		return strconv.FormatFloat(v, 'g', 3, 64)
	}
	s := strconv.FormatInt(int64(v+0.5), 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}
