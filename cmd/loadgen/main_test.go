package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
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
	if code := run([]string{"-scenario=grab", "-conns=20", "-procs=2", "-rain-count=10", "-rain-total=5"}, &stdout, &stderr); code == 0 {
		t.Fatal("a rain of 5 coins in 10 packets accepted over -procs")
	}
	if code := run([]string{"-scenario=fanout", "-client=raw"}, &stdout, &stderr); code == 0 {
		t.Fatal("-client raw accepted for fanout")
	}
	if code := run([]string{"-scenario=idle", "-money-share"}, &stdout, &stderr); code == 0 {
		t.Fatal("a money share of an idle run accepted")
	}
	if code := run([]string{"-scenario=idle", "-src-ips=300"}, &stdout, &stderr); code == 0 {
		t.Fatal("-src-ips beyond 127.0.0.254 accepted")
	}
}

// A gift storm over two processes: each checks its own senders' debits, the
// parent the receiver's `received` against the sum.
func TestGiftProcs(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	t.Setenv("LOADGEN_AS_MAIN", "1")
	out := filepath.Join(t.TempDir(), "out.json")
	var stdout, stderr bytes.Buffer
	code := run([]string{"-scenario=gift", "-ws=" + nodetest.WSURL(n), "-http=" + nodetest.HTTPURL(n),
		"-conns=21", "-procs=2", "-ramp=400", "-rate=105", "-duration=1500ms", "-src-ips=2", "-json=" + out}, &stdout, &stderr)
	t.Log(stdout.String(), stderr.String())
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	res, err := loadtest.ReadJSON(out)
	if err != nil {
		t.Fatal(err)
	}
	if res.Procs != 2 || res.Conns != 21 || res.Errors != 0 || res.OfferedRate != 105 {
		t.Fatalf("procs %d conns %d errors %d %v offered %v", res.Procs, res.Conns, res.Errors, res.ErrorSamples, res.OfferedRate)
	}
	if res.Requests < 105 || res.Replies != res.Requests || res.Refused != 0 || res.RepliesPerSec <= 0 {
		t.Fatalf("sent %d, answered %d (%.0f/s), refused %d %v", res.Requests, res.Replies, res.RepliesPerSec, res.Refused, res.RefusedCodes)
	}
	if res.Conserved == nil || !*res.Conserved || !strings.Contains(res.ConservationNote, "over 2 processes") ||
		res.UsersCoins != res.Replies { // price 1
		t.Fatalf("conservation: %v %q, users' coins %d", res.Conserved, res.ConservationNote, res.UsersCoins)
	}
}

// A grab storm over two processes from one rain the parent makes and starts:
// 30 grabbers, 20 packets; the parent checks granted + refunded = T, the
// grabbers' balances against the rain's grants and the anchor's refund. The
// rain lasts 4 s: it starts at the processes' planned start, and a process
// whose ramp ran late on a busy machine still finds it running.
func TestGrabProcs(t *testing.T) {
	n := nodetest.Start(t, nodetest.Config(t))
	t.Setenv("LOADGEN_AS_MAIN", "1")
	for _, tc := range []struct {
		name              string
		anchor            int64
		packets, total    int
		granted, noneLeft int64
		grantedAmount     int64
	}{
		{"storm", 7, 20, 1000, 20, 10, 1000}, // 10 find none left
		{"refund", 8, 40, 4000, 30, 0, -1},   // 10 packets refunded
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out.json")
			var stdout, stderr bytes.Buffer
			code := run([]string{"-scenario=grab", "-ws=" + nodetest.WSURL(n), "-http=" + nodetest.HTTPURL(n),
				"-conns=30", "-procs=2", "-ramp=600", "-duration=4s", "-anchor=" + strconv.FormatInt(tc.anchor, 10),
				"-rain-count=" + strconv.Itoa(tc.packets), "-rain-total=" + strconv.Itoa(tc.total), "-json=" + out}, &stdout, &stderr)
			t.Log(stdout.String(), stderr.String())
			if code != 0 {
				t.Fatalf("exit %d", code)
			}
			res, err := loadtest.ReadJSON(out)
			if err != nil {
				t.Fatal(err)
			}
			if res.Procs != 2 || res.Conns != 30 || res.Packets != int64(tc.packets) || res.TotalAmount != int64(tc.total) {
				t.Fatalf("procs %d conns %d packets %d total %d", res.Procs, res.Conns, res.Packets, res.TotalAmount)
			}
			if res.Replies != tc.granted || res.RefusedCodes[30003] != tc.noneLeft ||
				(tc.grantedAmount >= 0 && res.GrantedAmount != tc.grantedAmount) || res.UsersCoins != res.GrantedAmount {
				t.Fatalf("granted %d packets / %d coins (balances %d), refused %v", res.Replies, res.GrantedAmount, res.UsersCoins, res.RefusedCodes)
			}
			if res.Conserved == nil || !*res.Conserved || !strings.Contains(res.ConservationNote, "over 2 processes") {
				t.Fatalf("conservation: %v %q", res.Conserved, res.ConservationNote)
			}
		})
	}
}
