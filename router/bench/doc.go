// Package bench holds LiveEdge's room fan-out benchmarks (see README.md in
// this directory). Everything lives in _test.go files: the benchmarks start a
// real node in process, re-execute the test binary as a client-fleet child
// process (so 10k client sockets do not count against the server's open-file
// limit) and compare against a bare gws broadcast loop measured in the same run.
//
//	go test -run '^$' -bench 'Fanout|Bare' -benchtime 2000x -timeout 30m ./router/bench/
package bench
