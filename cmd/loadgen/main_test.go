package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/liveedge/liveedge/gateway/nodetest"
	"github.com/liveedge/liveedge/loadtest"
)

// TestMain lets -procs re-execute the test binary as loadgen.
func TestMain(m *testing.M) {
	if os.Getenv("LOADGEN_AS_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func TestFanoutProcs(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	t.Setenv("LOADGEN_AS_MAIN", "1")
	out := filepath.Join(t.TempDir(), "out.json")
	var stdout, stderr bytes.Buffer
	code := run([]string{"-scenario=fanout", "-ws=" + nodetest.WSURL(n), "-http=" + nodetest.HTTPURL(n),
		"-conns=40", "-procs=2", "-ramp=400", "-duration=1s", "-rate=4", "-drain=3s", "-json=" + out}, &stdout, &stderr)
	t.Log(stdout.String(), stderr.String())
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	res, err := loadtest.ReadJSON(out)
	if err != nil {
		t.Fatal(err)
	}
	if res.Procs != 2 || res.Conns != 40 || res.Viewers != 39 || res.PushesSent < 2 {
		t.Fatalf("procs %d conns %d viewers %d sent %d", res.Procs, res.Conns, res.Viewers, res.PushesSent)
	}
	if res.Gaps != 0 || res.Duplicates != 0 || res.Deliveries != res.Viewers*res.PushesSent || res.Errors != 0 {
		t.Fatalf("gaps %d dups %d deliveries %d of %d errors %d %v", res.Gaps, res.Duplicates, res.Deliveries, res.Expected, res.Errors, res.ErrorSamples)
	}
	// both processes accounted their viewers against the publisher's record
	if res.Published != res.PushesSent || res.Expected != res.Viewers*res.PushesSent || res.Missing != 0 || res.NotExpected != 0 {
		t.Fatalf("published %d, expected %d, lost %d, not expected %d", res.Published, res.Expected, res.Missing, res.NotExpected)
	}
	if !strings.Contains(stdout.String(), "latency") {
		t.Fatalf("no summary: %q", stdout.String())
	}
}

func TestRefusesRemoteAndBadFlags(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"-ws=ws://10.1.2.3:8081/ws"}, &stdout, &stderr); code == 0 {
		t.Fatal("non-loopback accepted")
	}
	if code := run([]string{"-scenario=chat", "-chat-rate=10"}, &stdout, &stderr); code == 0 {
		t.Fatal("chat rate above the limit accepted")
	}
	if code := run([]string{"-scenario=gift", "-conns=10", "-rate=1000"}, &stdout, &stderr); code == 0 {
		t.Fatal("100 gifts/s per sender accepted without -no-gift-limit")
	}
	if code := run([]string{"-scenario=grab", "-conns=30000", "-procs=2"}, &stdout, &stderr); code == 0 {
		t.Fatal("grab over -procs accepted")
	}
	if code := run([]string{"-scenario=idle", "-src-ips=300"}, &stdout, &stderr); code == 0 {
		t.Fatal("-src-ips beyond 127.0.0.254 accepted")
	}
}
