// Command benchreport writes the benchmark report of one `make bench` run:
// it reads the `go test -bench` output, loadgen JSON files and the wrk
// webhook result, and writes latest.json, latest.md and PNG plots
// (package loadtest/benchreport).
//
//	benchreport -bench bench.out -loadgen 'bench-tmp/idle-*.json' -webhook bench-tmp/webhook.json -out docs/bench
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/liveedge/liveedge/loadtest/benchreport"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("benchreport", flag.ContinueOnError)
	fs.SetOutput(stderr)
	benchOut := fs.String("bench", "bench.out", "`go test -bench` output")
	loadgen := fs.String("loadgen", "", "loadgen -json files, comma-separated globs")
	webhook := fs.String("webhook", "", "the wrk webhook result (cmd/wrkwebhook -json); a missing file is skipped")
	out := fs.String("out", "docs/bench", "directory for latest.json, latest.md and the plots")
	commit := fs.String("commit", "", "commit to name (default: git rev-parse --short HEAD)")
	clusterIdle := fs.String("cluster-idle", "", "cluster-idle.sh summaries to include as written, comma-separated globs")
	load := fs.String("load", "", "samples of the run: lines \"<unix s> <1-min load average> ...\" (make bench writes them); a missing file is skipped")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintln(stderr, "benchreport:", err)
		return 1
	}
	in := benchreport.Inputs{Machine: benchreport.DetectMachine(), Date: time.Now()}
	if *load != "" {
		if b, err := os.ReadFile(*load); err == nil {
			in.Machine.Load, in.Machine.RunSeconds = benchreport.ParseLoad(string(b))
		}
	}
	f, err := os.Open(*benchOut)
	if err != nil {
		return fail(err)
	}
	in.Bench, err = benchreport.ParseBench(f, *benchOut)
	f.Close()
	if err != nil {
		return fail(err)
	}
	if *loadgen != "" {
		if in.Loadgen, err = benchreport.ReadLoadgen(strings.Split(*loadgen, ",")); err != nil {
			return fail(err)
		}
	}
	if in.Webhook, err = benchreport.ReadWebhook(*webhook); err != nil {
		return fail(err)
	}
	if *clusterIdle != "" {
		for _, g := range strings.Split(*clusterIdle, ",") {
			paths, _ := filepath.Glob(g)
			for _, p := range paths {
				b, err := os.ReadFile(p)
				if err != nil {
					return fail(err)
				}
				in.ClusterIdle = append(in.ClusterIdle, benchreport.ClusterIdle{File: filepath.Base(p), Summary: string(b)})
			}
		}
	}
	files := []string{*benchOut}
	for _, lg := range in.Loadgen {
		files = append(files, lg.Path)
	}
	if in.Webhook != nil {
		files = append(files, *webhook)
	}
	for _, f := range files {
		if st, err := os.Stat(f); err == nil {
			in.Sources = append(in.Sources, benchreport.Source{File: filepath.Base(f), Written: st.ModTime().UTC().Format(time.RFC3339)})
		}
	}
	in.Commit, in.Dirty = benchreport.GitCommit(".")
	if *commit != "" {
		in.Commit, in.Dirty = *commit, false
	}
	rep := benchreport.Build(in)
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return fail(err)
	}
	if err := rep.WritePlots(*out); err != nil {
		return fail(err)
	}
	if err := rep.WriteJSON(filepath.Join(*out, "latest.json")); err != nil {
		return fail(err)
	}
	if err := rep.WriteMarkdown(filepath.Join(*out, "latest.md")); err != nil {
		return fail(err)
	}
	fmt.Fprintf(stdout, "benchreport: %d figures (%d missing), %d benchmark results, %d loadgen runs, %d plots → %s\n",
		len(rep.Figures), len(rep.Missing), len(rep.Bench.Results), len(rep.Loadgen), len(rep.Plots), *out)
	return 0
}
