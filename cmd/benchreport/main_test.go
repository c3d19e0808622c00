package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The command writes the three files and the plots from a sample run.
func TestRunOnSample(t *testing.T) {
	out := t.TempDir()
	td := "../../loadtest/benchreport/testdata/"
	var stdout, stderr bytes.Buffer
	code := run([]string{"-bench", td + "bench.out", "-loadgen", td + "idle-*.json," + td + "gift-*.json",
		"-webhook", td + "webhook.json", "-out", out, "-commit", "abc1234"}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	for _, f := range []string{"latest.json", "latest.md", "gift_latency.png", "fanout_latency.png", "idle_rss.png"} {
		if st, err := os.Stat(filepath.Join(out, f)); err != nil || st.Size() == 0 {
			t.Fatalf("%s: %v", f, err)
		}
	}
	md, _ := os.ReadFile(filepath.Join(out, "latest.md"))
	if !strings.Contains(string(md), "commit `abc1234`") || !strings.Contains(string(md), "Inputs (written): `bench.out`") {
		t.Fatalf("latest.md:\n%s", md)
	}
	// a missing webhook file is skipped, a missing bench output is an error
	if code := run([]string{"-bench", td + "bench.out", "-webhook", filepath.Join(out, "none.json"), "-out", out}, &stdout, &stderr); code != 0 {
		t.Fatalf("missing webhook file: exit %d", code)
	}
	if code := run([]string{"-bench", filepath.Join(out, "none.out"), "-out", out}, &stdout, &stderr); code == 0 {
		t.Fatal("missing bench output accepted")
	}
}
