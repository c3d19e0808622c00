package loadtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
)

// NodeProc is a LiveEdge node process started for one measurement (loadgen
// -liveedge, wrkwebhook): its own data directory, free loopback ports,
// environment overrides (LIVEEDGE_<SECTION>_<KEY>), stopped with SIGTERM.
type NodeProc struct {
	HTTP, WS string // http://127.0.0.1:port, ws://127.0.0.1:port/ws
	PID      int
	cmd      *exec.Cmd
	dir      string
	exited   chan struct{}
}

// StartNode starts bin (the liveedge binary) with a fresh data directory
// under dataParent ("" = the system's temp dir) and env on top of the
// process's, and waits until /readyz answers 200 (30 s at most). Its output
// goes to logw (nil: discarded).
func StartNode(ctx context.Context, bin, dataParent string, env []string, logw io.Writer) (*NodeProc, error) {
	if dataParent != "" {
		if err := os.MkdirAll(dataParent, 0o755); err != nil {
			return nil, err
		}
	}
	dir, err := os.MkdirTemp(dataParent, "liveedge-bench-")
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(2)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	httpAddr := "127.0.0.1:" + strconv.Itoa(ports[0])
	wsAddr := "127.0.0.1:" + strconv.Itoa(ports[1])
	cmd := exec.Command(bin)
	cmd.Env = append(append(os.Environ(),
		"LIVEEDGE_NODE_DATA_DIR="+dir,
		"LIVEEDGE_HTTP_ADDR="+httpAddr,
		"LIVEEDGE_WS_ADDR="+wsAddr,
		"LIVEEDGE_LOG_LEVEL=warn"), env...)
	if logw == nil {
		logw = io.Discard
	}
	cmd.Stdout, cmd.Stderr = logw, logw
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	n := &NodeProc{HTTP: "http://" + httpAddr, WS: "ws://" + wsAddr + "/ws", PID: cmd.Process.Pid, cmd: cmd, dir: dir, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(n.exited)
	}()
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", n.HTTP+"/readyz", nil)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return n, nil
			}
		}
		select {
		case <-n.exited:
			os.RemoveAll(dir)
			return nil, fmt.Errorf("loadtest: node %s exited before it was ready: %v", bin, cmd.ProcessState)
		case <-ctx.Done():
			n.Stop()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			n.Stop()
			return nil, errors.New("loadtest: node not ready within 30 s")
		}
	}
}

// Stop sends SIGTERM, waits up to 20 s (then SIGKILL) and removes the data.
func (n *NodeProc) Stop() {
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(20 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.exited
	}
	os.RemoveAll(n.dir)
}

// freePorts asks the kernel for count free loopback ports (a port may be
// taken by someone else between this and the node's listen: StartNode then
// fails, it does not hang).
func freePorts(count int) ([]int, error) {
	var out []int
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for range count {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}
