package benchreport

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/perf/benchfmt"

	"github.com/liveedge/liveedge/loadtest"
)

// Bench is one benchmark result line of `go test -bench` output.
type Bench struct {
	Pkg     string             `json:"pkg"`
	Name    string             `json:"name"` // without "Benchmark" and the -GOMAXPROCS suffix: "GiftWS/echo"
	Procs   string             `json:"gomaxprocs,omitempty"`
	Iters   int                `json:"iters"`
	Metrics map[string]float64 `json:"metrics"` // unit → value: "ns/op", "pushes/s", "p99-ms", ...
}

// BenchRun is what a `go test -bench` output says: its results, the CPU
// named in its header, and the packages that failed.
type BenchRun struct {
	CPU     string   `json:"cpu,omitempty"`
	Results []Bench  `json:"results"`
	Failed  []string `json:"failed,omitempty"` // "FAIL <pkg>" lines
}

// ParseBench reads `go test -bench` output (several packages concatenated,
// log lines interleaved) with golang.org/x/perf/benchfmt.
func ParseBench(r io.Reader, name string) (*BenchRun, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	out := &BenchRun{}
	bareFail := false
	for _, line := range strings.Split(string(data), "\n") {
		if pkg, ok := strings.CutPrefix(line, "FAIL\t"); ok {
			out.Failed = append(out.Failed, strings.Fields(pkg)[0])
		}
		bareFail = bareFail || strings.TrimSpace(line) == "FAIL"
	}
	if bareFail && len(out.Failed) == 0 {
		out.Failed = append(out.Failed, "(a package)")
	}
	br := benchfmt.NewReader(strings.NewReader(string(data)), name)
	for br.Scan() {
		res, ok := br.Result().(*benchfmt.Result)
		if !ok {
			continue // a syntax error (a log line that looks like a result) or unit metadata
		}
		base, parts := res.Name.Parts()
		b := Bench{Pkg: res.GetConfig("pkg"), Iters: res.Iters, Metrics: map[string]float64{}}
		full := string(base)
		for _, p := range parts {
			if strings.HasPrefix(string(p), "-") {
				b.Procs = string(p[1:])
				continue
			}
			full += string(p)
		}
		b.Name = full
		for _, v := range res.Values {
			// the unit as written: benchfmt may tidy "ns/op" to "sec/op"
			if v.OrigUnit != "" {
				b.Metrics[v.OrigUnit] = v.OrigValue
			} else {
				b.Metrics[v.Unit] = v.Value
			}
		}
		if cpu := strings.TrimSpace(res.GetConfig("cpu")); cpu != "" && out.CPU == "" {
			out.CPU = cpu
		}
		out.Results = append(out.Results, b)
	}
	if err := br.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// Find is the last result named name (exact, without -GOMAXPROCS).
func (r *BenchRun) Find(name string) *Bench {
	if r == nil {
		return nil
	}
	for i := len(r.Results) - 1; i >= 0; i-- {
		if r.Results[i].Name == name {
			return &r.Results[i]
		}
	}
	return nil
}

// Metric is name's metric unit, if both are there.
func (r *BenchRun) Metric(name, unit string) (float64, bool) {
	b := r.Find(name)
	if b == nil {
		return 0, false
	}
	v, ok := b.Metrics[unit]
	return v, ok
}

// LoadgenRun is one loadgen -json file, with the figures the report uses.
type LoadgenRun struct {
	File     string           `json:"file"`
	Path     string           `json:"-"`
	Scenario string           `json:"scenario"`
	Result   *loadtest.Result `json:"result"`
}

// ReadLoadgen reads loadgen JSON files (globs allowed), sorted by scenario
// then connections.
func ReadLoadgen(patterns []string) ([]LoadgenRun, error) {
	var out []LoadgenRun
	for _, pat := range patterns {
		files, err := filepath.Glob(pat)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			res, err := loadtest.ReadJSON(f)
			if err != nil {
				return nil, err
			}
			res.LatencyBuckets, res.ReconnectBuckets = nil, nil // bulky, merged already
			out = append(out, LoadgenRun{File: filepath.Base(f), Path: f, Scenario: res.Scenario, Result: res})
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Scenario != out[j].Scenario {
			return out[i].Scenario < out[j].Scenario
		}
		return out[i].Result.Conns < out[j].Result.Conns
	})
	return out, nil
}

// Webhook is the result of the wrk webhook run (cmd/wrkwebhook -json).
type Webhook = loadtest.WebhookResult

// ReadWebhook reads a webhook result; a missing file is (nil, nil).
func ReadWebhook(path string) (*Webhook, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var w Webhook
	if err := jsonUnmarshal(b, &w); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &w, nil
}

// ParseLoad reads the load samples make bench writes, one line each:
// "<unix seconds> <1-min load> <5-min> <15-min> ..." (date +%s and
// /proc/loadavg); it returns the 1-minute loads and the seconds from the
// first sample to the last. Lines that do not parse are skipped.
func ParseLoad(s string) (load []float64, seconds float64) {
	var first, last float64
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		t, err1 := strconv.ParseFloat(f[0], 64)
		l, err2 := strconv.ParseFloat(f[1], 64)
		if err1 != nil || err2 != nil {
			continue
		}
		if len(load) == 0 {
			first = t
		}
		last = t
		load = append(load, l)
	}
	return load, last - first
}
