//go:build race

package gateway_test

// raceEnabled: this test binary runs under the race detector, which slows
// every goroutine of the process — the node and the test's own clients — 5–20×.
const raceEnabled = true
