//go:build pprof

package main

import (
	"net/http"
	_ "net/http/pprof" // the profiles, on LIVEEDGE_PPROF_ADDR
	"os"
	"runtime"
	"strconv"
)

// Built with -tags pprof, the node serves net/http/pprof on
// $LIVEEDGE_PPROF_ADDR (a loopback address) for memory and CPU profiling
// (docs/performance.md); $LIVEEDGE_MEMPROFILERATE sets
// runtime.MemProfileRate (1: every allocation, for an exact account of the
// heap per connection). A normal build has no profiling endpoint.
func init() {
	if r, err := strconv.Atoi(os.Getenv("LIVEEDGE_MEMPROFILERATE")); err == nil && r > 0 {
		runtime.MemProfileRate = r
	}
	if addr := os.Getenv("LIVEEDGE_PPROF_ADDR"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
}
