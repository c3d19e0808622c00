// Command loadgen runs a LiveEdge load scenario (package loadtest) against
// nodes on this machine and prints a summary; -json writes the figures.
//
//	loadgen -scenario idle -conns 2000 -node-pid $(pgrep -n liveedge)
//	loadgen -scenario fanout -conns 1000 -rate 5 -duration 30s -json out.json
//
// -procs N runs N copies of itself, each with a share of -conns (a process
// may hold at most 20,000 files here), and merges their results.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/liveedge/liveedge/loadtest"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg loadtest.Config
	var ws, httpURLs, jsonPath string
	var procs int
	var startAt int64
	var quiet bool
	fs.StringVar(&cfg.Scenario, "scenario", "idle", "idle | fanout | chat | reconnect-storm | gift | grab")
	fs.StringVar(&cfg.Client, "client", "sdk", "sdk (the Go SDK) | raw (idle only: a minimal gws idle viewer, for 100k connections on few cores)")
	fs.StringVar(&ws, "ws", "ws://127.0.0.1:8081/ws", "WebSocket URLs of the nodes, comma-separated (loopback only)")
	fs.StringVar(&httpURLs, "http", "http://127.0.0.1:8080", "HTTP bases of the nodes, same order (dev tokens, room)")
	fs.IntVar(&cfg.Conns, "conns", 100, "connections in all (viewers + publishers)")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, "hold / publish time after the ramp")
	fs.IntVar(&cfg.Ramp, "ramp", 500, "connections opened per second (in all)")
	fs.Int64Var(&cfg.Room, "room", 0, "room id (0: open, or get back, the anchor's room)")
	fs.Int64Var(&cfg.Anchor, "anchor", 1, "anchor user id for -room 0")
	fs.Int64Var(&cfg.UserBase, "user-base", 0, "first user id (0: derived from the time, fresh users each run)")
	fs.Float64Var(&cfg.Rate, "rate", 0, "fanout / reconnect-storm: pushes per second through one publisher (fanout default 5, at most 5 without -no-chat-limit); gift: gifts per second offered in all (0: closed loop, needs -no-gift-limit)")
	fs.Int64Var(&cfg.GiftID, "gift-id", loadtest.DefaultGiftID, "gift: the gift sent to the room's anchor")
	fs.BoolVar(&cfg.NoGiftLimit, "no-gift-limit", false, "gift: the node runs with LIVEEDGE_LIMITS_GIFT_PER_SECOND=0 (allow more than 20 gifts/s per sender)")
	fs.BoolVar(&cfg.NoChatLimit, "no-chat-limit", false, "fanout / chat / reconnect-storm: the node runs with LIVEEDGE_LIMITS_CHAT_PER_SECOND=0 (allow more than 5 chats/s per publisher)")
	fs.DurationVar(&cfg.Warmup, "warmup", time.Second, "gift: gifts scheduled in this first part of the run are sent and checked but not timed")
	fs.Int64Var(&cfg.RainTotal, "rain-total", 0, "grab: coins in the rain (default 100 per packet)")
	fs.IntVar(&cfg.RainCount, "rain-count", 0, "grab: packets in the rain (default -conns)")
	fs.IntVar(&cfg.SrcIPs, "src-ips", 1, "dial connection i from 127.0.0.(1 + i mod N): N source addresses, so ephemeral ports do not run out")
	fs.IntVar(&cfg.Talkers, "talkers", 0, "chat: talking connections (default 5)")
	fs.Float64Var(&cfg.ChatRate, "chat-rate", 0, "chat: chats per second per talker, at most 5 (default 2)")
	fs.IntVar(&cfg.Payload, "payload", 100, "chat text bytes")
	fs.DurationVar(&cfg.Heartbeat, "heartbeat", 0, "client heartbeat interval (0: half the server's; negative: none)")
	fs.IntVar(&cfg.NodePID, "node-pid", 0, "pid of the node process: report its RSS per connection")
	fs.StringVar(&cfg.TokenSecret, "token-secret", "", "the nodes' JWT secret (a dev or test node's): sign viewers' tokens here, as an app backend would, instead of asking /api/v1/dev/token")
	fs.IntVar(&cfg.KillPID, "kill-pid", 0, "reconnect-storm: SIGKILL this node process")
	fs.DurationVar(&cfg.KillAfter, "kill-after", 2*time.Second, "reconnect-storm: kill this long into the run")
	fs.DurationVar(&cfg.Drain, "drain", 0, "wait this long at most for late pushes / reconnects (default 3s, storm 30s)")
	fs.StringVar(&jsonPath, "json", "", "write the figures to this JSON file")
	fs.IntVar(&procs, "procs", 1, "spread the connections over this many processes")
	fs.BoolVar(&quiet, "q", false, "no progress lines on stderr")
	var cpuProfile string
	fs.StringVar(&cpuProfile, "cpuprofile", "", "write this process's CPU profile here (-procs: each process's to FILE.<i>)")
	fs.StringVar(&cfg.Trace, "trace", "", "write one JSON line per connection (join position, offsets received, nodes) and per chat sent to this file (-procs: FILE.0, FILE.1, …)")
	var nodeBin, nodeData, nodeEnv string
	fs.StringVar(&nodeBin, "liveedge", "", "start a fresh node from this binary for the run (free loopback ports, data under -data; sets -ws, -http and -node-pid)")
	fs.StringVar(&nodeData, "data", "data", "parent directory of the -liveedge node's data")
	fs.StringVar(&nodeEnv, "node-env", "", "-liveedge: extra KEY=VALUE settings for the node, comma-separated (e.g. LIVEEDGE_LIMITS_GIFT_PER_SECOND=0)")
	// internal: set by the parent for its children
	fs.BoolVar(&cfg.NoPublish, "no-publish", false, "internal (-procs): this process has no publishers")
	fs.Int64Var(&startAt, "start-at", 0, "internal (-procs): unix ms when publishing starts")
	fs.BoolVar(&cfg.MoneyShare, "money-share", false, "internal (-procs, gift / grab): check only this process's users; the parent checks the totals")
	fs.StringVar(&cfg.RainCode, "rain-code", "", "internal (-procs, grab): the parent's rain")
	fs.StringVar(&cfg.PublishedFile, "published", "", "internal (-procs): the publishing process writes what it published to this file, the others read it")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg.WS, cfg.HTTP = split(ws), split(httpURLs)
	if !quiet {
		cfg.Log = stderr
	}
	if startAt > 0 {
		cfg.StartAt = time.UnixMilli(startAt)
	}
	if cpuProfile != "" && procs <= 1 {
		f, err := os.Create(cpuProfile)
		if err != nil {
			fmt.Fprintln(stderr, "loadgen:", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(stderr, "loadgen:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	limit, err := loadtest.RaiseFileLimit()
	if err != nil {
		fmt.Fprintln(stderr, "loadgen: raise the file limit:", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if nodeBin != "" {
		node, err := loadtest.StartNode(ctx, nodeBin, nodeData, split(nodeEnv), nil)
		if err != nil {
			fmt.Fprintln(stderr, "loadgen:", err)
			return 1
		}
		defer node.Stop()
		cfg.WS, cfg.HTTP, cfg.NodePID = []string{node.WS}, []string{node.HTTP}, node.PID
		// the children of -procs are given the node's addresses, not -liveedge
		_ = fs.Set("ws", node.WS)
		_ = fs.Set("http", node.HTTP)
		_ = fs.Set("node-pid", strconv.Itoa(node.PID))
	}

	var res *loadtest.Result
	if procs > 1 {
		res, err = runProcs(ctx, fs, cfg, procs, stderr)
	} else {
		if limit > 0 && uint64(cfg.Conns)+64 > limit {
			fmt.Fprintf(stderr, "loadgen: %d connections need more than the %d files a process may open: use -procs\n", cfg.Conns, limit)
			return 2
		}
		// bounded in time: the ramp, the run, the drain and a margin
		bound := time.Duration(cfg.Conns)*time.Second/time.Duration(max(cfg.Ramp, 1)) + cfg.Duration + max(cfg.Drain, 30*time.Second) + time.Minute
		if !cfg.StartAt.IsZero() {
			bound += time.Until(cfg.StartAt)
		}
		rctx, cancel := context.WithTimeout(ctx, bound)
		defer cancel()
		res, err = loadtest.Run(rctx, cfg)
	}
	if err != nil {
		fmt.Fprintln(stderr, "loadgen:", err)
		return 1
	}
	res.WriteSummary(stdout)
	if jsonPath != "" {
		if err := res.WriteJSON(jsonPath); err != nil {
			fmt.Fprintln(stderr, "loadgen:", err)
			return 1
		}
	}
	if res.Conserved != nil && !*res.Conserved {
		fmt.Fprintln(stderr, "loadgen: the money check failed:", res.ConservationNote)
		return 1
	}
	if res.FailedProcs > 0 {
		// Their connections are not in the figures (an RSS per connection
		// over fewer connections, deliveries short): not a result.
		fmt.Fprintf(stderr, "loadgen: %d of %d processes failed: the figures above are partial\n", res.FailedProcs, res.Procs)
		return 1
	}
	return 0
}

func split(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// runProcs re-executes this program procs times with a share of the
// connections each (the first also runs the publishers), one room and one
// start time for all, and merges the JSON results.
func runProcs(ctx context.Context, fs *flag.FlagSet, cfg loadtest.Config, procs int, stderr io.Writer) (*loadtest.Result, error) {
	if err := cfg.Normalize(); err != nil {
		return nil, err
	}
	stderr = &lockedWriter{w: stderr}
	room := cfg.Room
	if room == 0 {
		var err error
		if room, err = loadtest.OpenRoom(ctx, httpClient(), cfg.HTTP[0], cfg.Anchor); err != nil {
			return nil, err
		}
	}
	// gift / grab: the parent holds what is run-wide (the receiver's
	// `received` before the run; the anchor's credit and the rain) and checks
	// the totals once every process has checked its own users.
	money := cfg.Scenario == loadtest.Gift || cfg.Scenario == loadtest.Grab
	var totals *loadtest.MoneyTotals
	if money {
		var err error
		if totals, err = loadtest.NewMoneyTotals(ctx, cfg, room); err != nil {
			return nil, err
		}
	}
	var nodeBefore int64
	if cfg.NodePID > 0 {
		nodeBefore, _ = loadtest.RSS(cfg.NodePID)
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "loadgen-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	// Every child ramps at Ramp/procs; publishing starts for all at once, 3 s
	// after the slowest ramp should be done.
	rampTime := time.Duration(cfg.Conns) * time.Second / time.Duration(cfg.Ramp)
	start := time.Now().Add(rampTime + 3*time.Second)
	// flags given on the command line, minus those set per child
	perChild := map[string]bool{"conns": true, "procs": true, "json": true, "ramp": true, "room": true,
		"user-base": true, "no-publish": true, "start-at": true, "liveedge": true, "data": true, "node-env": true, "trace": true, "published": true,
		"money-share": true, "rain-code": true, "cpuprofile": true}
	if money { // the gift rate is shared out; every share grabs from the one rain
		perChild["rate"], perChild["rain-count"], perChild["rain-total"] = true, true, true
	}
	var common []string
	fs.Visit(func(f *flag.Flag) {
		if !perChild[f.Name] {
			common = append(common, "-"+f.Name+"="+f.Value.String())
		}
	})
	var wg sync.WaitGroup
	parts := make([]*loadtest.Result, procs)
	errs := make([]error, procs)
	// The parent samples the node's RSS every 500 ms while the children run
	// and keeps the highest: with every connection held (a child whose ramp
	// runs late still counts; a single sample at the planned start did not).
	// Idle: it also keeps the last sample before the hold ends (every
	// connection still held): the RSS the node settles at.
	var nodePeak, nodeEnd int64
	holdEnd := start.Add(cfg.Duration - 500*time.Millisecond)
	sampleDone := make(chan struct{})
	childrenDone := make(chan struct{})
	if cfg.NodePID > 0 {
		go func() {
			defer close(sampleDone)
			t := time.NewTicker(500 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-t.C:
				case <-childrenDone:
					return
				case <-ctx.Done():
					return
				}
				v, err := loadtest.RSS(cfg.NodePID)
				if err != nil {
					continue
				}
				nodePeak = max(nodePeak, v)
				if cfg.Scenario == loadtest.Idle && time.Now().Before(holdEnd) {
					nodeEnd = v
				}
			}
		}()
	} else {
		close(sampleDone)
	}
	offset := 0 // the users of the children before: each child's are the next share of the run's
	for i := range procs {
		share := cfg.Conns / procs
		if i < cfg.Conns%procs {
			share++
		}
		base := cfg.UserBase + int64(offset)
		offset += share
		out := filepath.Join(dir, strconv.Itoa(i)+".json")
		args := append([]string{}, common...)
		args = append(args,
			"-conns="+strconv.Itoa(share),
			"-ramp="+strconv.Itoa(max(cfg.Ramp/procs, 1)),
			"-room="+strconv.FormatInt(room, 10),
			// Within the run's block of users (a million from UserBase, one
			// block per second of the start): 10,000,000 apart they fell in
			// the block of a run started ten seconds later, whose users then
			// replayed these ones' credits and gifts.
			"-user-base="+strconv.FormatInt(base, 10),
			"-start-at="+strconv.FormatInt(start.UnixMilli(), 10),
			"-json="+out, "-q", "-published="+filepath.Join(dir, "published.json"))
		if cfg.Trace != "" {
			args = append(args, "-trace="+cfg.Trace+"."+strconv.Itoa(i))
		}
		if i > 0 {
			args = append(args, "-no-publish")
		}
		if f := fs.Lookup("cpuprofile").Value.String(); f != "" {
			args = append(args, "-cpuprofile="+f+"."+strconv.Itoa(i))
		}
		if money {
			args = append(args, "-money-share",
				"-rate="+strconv.FormatFloat(cfg.Rate*float64(share)/float64(cfg.Conns), 'f', -1, 64),
				"-rain-count="+strconv.Itoa(cfg.RainCount), "-rain-total="+strconv.FormatInt(cfg.RainTotal, 10))
			if code := totals.RainCode(); code != "" {
				args = append(args, "-rain-code="+code)
			}
		}
		cmd := exec.CommandContext(ctx, self, args...)
		cmd.Stdout, cmd.Stderr = io.Discard, stderr
		// interrupted (SIGINT / SIGTERM to this process): the children stop
		// too and still write what they measured (killed after 20 s)
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = 20 * time.Second
		fmt.Fprintf(stderr, "loadgen: process %d: %d connections\n", i, share)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = cmd.Run()
			if errs[i] != nil {
				errs[i] = fmt.Errorf("process %d: %w", i, errs[i])
			}
			// figures written before a failed check are kept (the money
			// check then fails: the share says its users did not add up)
			if p, err := loadtest.ReadJSON(out); err == nil {
				parts[i] = p
			} else if errs[i] == nil {
				errs[i] = err
			}
		}()
	}
	// grab: the rain starts just before the shares start grabbing (a share
	// that grabs before the start is answered 30001 and tries again)
	rainErr := make(chan error, 1)
	if money && cfg.Scenario == loadtest.Grab {
		go func() {
			select {
			case <-time.After(time.Until(start.Add(-500 * time.Millisecond))):
			case <-ctx.Done():
				rainErr <- ctx.Err()
				return
			}
			rainErr <- totals.StartRain(ctx)
		}()
	}
	wg.Wait()
	close(childrenDone)
	<-sampleDone
	var ok []*loadtest.Result
	missing := 0
	for i, p := range parts {
		if errs[i] != nil {
			fmt.Fprintln(stderr, "loadgen:", errs[i])
		}
		if p == nil {
			missing++
			continue
		}
		ok = append(ok, p) // a share whose own check failed exited 1 but wrote its figures
	}
	if money && cfg.Scenario == loadtest.Grab {
		if err := <-rainErr; err != nil {
			fmt.Fprintln(stderr, "loadgen: start the rain:", err)
			cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := totals.Abandon(cctx); err != nil {
				fmt.Fprintln(stderr, "loadgen: cancel the rain:", err)
			}
			cancel()
		}
	}
	if len(ok) == 0 {
		return nil, fmt.Errorf("every process failed")
	}
	res := loadtest.Merge(ok, nodeBefore, nodePeak, nodeEnd)
	res.Procs, res.FailedProcs = procs, missing
	if money {
		totals.Check(ctx, res, ok, missing)
	}
	return res, nil
}
