package loadtest

import (
	"bufio"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/liveedge/liveedge/configs"
)

// RaiseFileLimit raises RLIMIT_NOFILE's soft limit to its hard limit and
// returns the new soft limit.
func RaiseFileLimit() (uint64, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, err
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			return 0, err
		}
	}
	return rl.Cur, nil
}

// RSS is the resident set size of process pid (0 = this process) in bytes,
// from /proc/<pid>/status VmRSS.
func RSS(pid int) (int64, error) {
	p := "/proc/self/status"
	if pid > 0 {
		p = fmt.Sprintf("/proc/%d/status", pid)
	}
	f, err := os.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			fs := strings.Fields(rest)
			if len(fs) < 1 {
				break
			}
			kb, err := strconv.ParseInt(fs[0], 10, 64)
			if err != nil {
				return 0, err
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("loadtest: no VmRSS in %s", p)
}

// CheckLoopback refuses a URL whose host is not a loopback address
// (127.0.0.0/8, ::1 or localhost): the load generator only targets this machine.
func CheckLoopback(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("loadtest: bad URL %q: %w", raw, err)
	}
	host := u.Hostname()
	if host == "" {
		return fmt.Errorf("loadtest: URL %q has no host", raw)
	}
	if !configs.LoopbackHost(host) {
		return fmt.Errorf("loadtest: %q is not a loopback address (refused: loopback only)", host)
	}
	return nil
}

// CPUTime is the user + system CPU time process pid (0 = this process) has
// used, from /proc/<pid>/stat (clock ticks of 1/100 s, Linux's USER_HZ).
func CPUTime(pid int) (time.Duration, error) {
	p := "/proc/self/stat"
	if pid > 0 {
		p = fmt.Sprintf("/proc/%d/stat", pid)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	// the command name (field 2) may hold spaces: count from the last ')'
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("loadtest: bad %s", p)
	}
	fs := strings.Fields(string(b[i+1:]))
	if len(fs) < 13 {
		return 0, fmt.Errorf("loadtest: short %s", p)
	}
	// fs[0] is field 3 (state): utime is field 14, stime field 15
	ut, err1 := strconv.ParseInt(fs[11], 10, 64)
	st, err2 := strconv.ParseInt(fs[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("loadtest: bad %s", p)
	}
	return time.Duration(ut+st) * 10 * time.Millisecond, nil
}
