// Command liveedge runs one LiveEdge node.
//
//	liveedge [-config configs/single.yaml]
//
// Without -config the embedded single-node default is used. SIGTERM or SIGINT
// drains connections (close 1001) and flushes storage before exit. A storage
// write failure (persist.Store) ends the process at once with status 1: its
// restart replays the WAL.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/gateway"
)

func main() {
	path := flag.String("config", "", "YAML config file (default: embedded configs/single.yaml)")
	flag.Parse()
	if err := run(*path); err != nil {
		fmt.Fprintln(os.Stderr, "liveedge:", err)
		os.Exit(1)
	}
}

func run(path string) error {
	cfg, err := configs.Load(path)
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.Log.Level)); err != nil {
		return fmt.Errorf("log.level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if unknown := configs.UnknownEnv(os.Environ()); len(unknown) > 0 {
		log.Warn("environment names that are no setting (misspelt? they change nothing)", "names", unknown)
	}
	node, err := gateway.New(cfg, log)
	if err != nil {
		return err
	}
	if err := node.Start(); err != nil {
		if node.Store.Failed() == nil { // else no Shutdown: see below
			_ = node.Shutdown(context.Background())
		}
		return err
	}
	printBanner(node)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	// A storage failure ends the process at once, without Shutdown (it
	// would write to a store in an unknown state, or wait on Pebble's locks
	// forever): the restart replays the WAL; clients reconnect elsewhere
	// meanwhile.
	var s os.Signal
	select {
	case s = <-sig:
	case err := <-node.Fatal():
		return fmt.Errorf("stopping at once, storage failed: %w", err)
	}
	if err := node.Store.Failed(); err != nil { // both at once
		return fmt.Errorf("stopping at once, storage failed: %w", err)
	}
	log.Info("shutting down", "signal", s.String(), "drain_timeout", cfg.Shutdown.DrainTimeout.D())
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Shutdown.DrainTimeout.D())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- node.Shutdown(ctx) }()
	select {
	case err := <-done:
		if ferr := node.Store.Failed(); ferr != nil {
			return fmt.Errorf("storage failed while shutting down: %w", ferr)
		}
		return err
	case err := <-node.Fatal():
		return fmt.Errorf("stopping at once, storage failed while shutting down: %w", err)
	}
}

func printBanner(n *gateway.Node) {
	httpAddr, wsAddr := n.API.Addr(), n.WS.Addr()
	var b strings.Builder
	fmt.Fprintf(&b, "LiveEdge node %s is up\n", n.Config.Node.ID)
	fmt.Fprintf(&b, "  HTTP      http://%s   (/healthz /readyz /metrics /api/v1/...)\n", httpAddr)
	fmt.Fprintf(&b, "  WebSocket ws://%s/ws?token=TOKEN\n", wsAddr)
	fmt.Fprintf(&b, "  data      %s\n", n.Config.Node.DataDir)
	if n.Config.HTTP.Demo {
		fmt.Fprintf(&b, "  demo      http://%s/demo/   (open in a browser: a live room over the TS SDK)\n", httpAddr)
	}
	if n.Config.Auth.DevTokens {
		fmt.Fprintf(&b, "Get a dev token:\n  curl -s -X POST http://%s/api/v1/dev/token -d '{\"user_id\":42,\"role\":\"viewer\"}'\n", httpAddr)
	}
	fmt.Print(b.String())
}
