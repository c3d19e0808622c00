// Command wrkwebhook measures the payment webhook over real HTTP with wrk
// (package loadtest, RunWebhook): it creates real orders through a node's
// HTTP API, writes one signed SUCCESS notify per order, has wrk post each
// exactly once (a Lua script rotates the pre-signed bodies), then checks
// that every order is PAYED and every buyer was credited exactly once, and
// reports notifies/s.
//
//	wrkwebhook -liveedge bin/liveedge -orders 50000 -json webhook.json   # a fresh node of its own
//	wrkwebhook -http http://127.0.0.1:8080 -secret "$SECRET" -orders 5000 # a running node (its pay limits apply)
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/liveedge/liveedge/loadtest"
)

// benchSecret is the webhook secret of the node -liveedge starts (a
// throwaway node: not a secret of any real deployment).
const benchSecret = "wrkwebhook-bench-secret-0123456789abcdef"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("wrkwebhook", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg loadtest.WebhookConfig
	bin := fs.String("liveedge", "", "start a fresh node from this binary (free loopback ports, data under -data, order limits off)")
	data := fs.String("data", "data", "parent directory of the -liveedge node's data")
	fs.StringVar(&cfg.HTTP, "http", "", "HTTP base of a running node (loopback) instead of -liveedge")
	fs.StringVar(&cfg.Secret, "secret", "", "one of the running node's pay.secrets (with -http)")
	fs.IntVar(&cfg.Orders, "orders", 50_000, "orders, each notified exactly once")
	fs.IntVar(&cfg.Users, "users", 0, "buyers (default orders/100)")
	fs.IntVar(&cfg.Threads, "threads", 2, "wrk threads")
	fs.IntVar(&cfg.Conns, "conns", 64, "wrk connections")
	fs.DurationVar(&cfg.MaxTime, "max-time", time.Minute, "wrk -d: the longest the notifies may take")
	fs.StringVar(&cfg.Wrk, "wrk", "wrk", "the wrk binary")
	jsonPath := fs.String("json", "", "write the result to this JSON file")
	quiet := fs.Bool("q", false, "no progress lines")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if !*quiet {
		cfg.Log = stderr
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.MaxTime+10*time.Minute) // order creation and checks included
	defer cancel()
	if *bin != "" {
		if _, err := loadtest.RaiseFileLimit(); err != nil {
			fmt.Fprintln(stderr, "wrkwebhook: raise the file limit:", err)
		}
		node, err := loadtest.StartNode(ctx, *bin, *data, []string{
			"LIVEEDGE_PAY_SECRETS=" + benchSecret,
			"LIVEEDGE_PAY_MAX_OPEN_ORDERS_PER_USER=0",
			"LIVEEDGE_PAY_ORDERS_PER_MINUTE=0",
			"LIVEEDGE_PAY_RECONCILE_AFTER=1h", // no provider runs: nothing to query
		}, stderr)
		if err != nil {
			fmt.Fprintln(stderr, "wrkwebhook:", err)
			return 1
		}
		defer node.Stop()
		cfg.HTTP, cfg.Secret, cfg.NodePID = node.HTTP, benchSecret, node.PID
	}
	if cfg.HTTP == "" || cfg.Secret == "" {
		fmt.Fprintln(stderr, "wrkwebhook: give -liveedge, or -http and -secret")
		return 2
	}
	res, err := loadtest.RunWebhook(ctx, cfg)
	if err != nil {
		fmt.Fprintln(stderr, "wrkwebhook:", err)
		return 1
	}
	fmt.Fprintf(stdout, "webhook over HTTP (wrk, %d threads, %d connections): %d notifies in %.2f s = %.0f notifies/s; latency p50 %.2f ms, p99 %.2f ms\n",
		res.Threads, res.Conns, res.Answered, res.Seconds, res.NotifiesPerS, res.LatencyP50Ms, res.LatencyP99Ms)
	fmt.Fprintf(stdout, "  %d of %d orders PAYED; coins credited %d, expected %d; exactly once: %v (orders created in %.1f s beforehand)\n",
		res.Paid, res.Orders, res.CreditedCoins, res.ExpectedCoins, res.ExactlyOnce, res.CreateSeconds)
	if res.NodeCPUus > 0 || res.WrkCPUus > 0 {
		fmt.Fprintf(stdout, "  CPU per notify: node %.1f µs, wrk %.1f µs (2 cores: at most %.0f notifies/s if both had them to themselves)\n",
			res.NodeCPUus, res.WrkCPUus, 2e6/(res.NodeCPUus+res.WrkCPUus))
	}
	if res.Error != "" {
		fmt.Fprintln(stdout, "  error:", res.Error)
	}
	if *jsonPath != "" {
		if err := res.WriteJSON(*jsonPath); err != nil {
			fmt.Fprintln(stderr, "wrkwebhook:", err)
			return 1
		}
	}
	if !res.ExactlyOnce {
		return 1
	}
	return 0
}
