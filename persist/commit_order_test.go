package persist_test

import (
	"bufio"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// crashChildEnv makes the test binary, started by a crash test, run the
// ledger scenario it names in the data directory of crashDirEnv and wait to
// be killed.
const (
	crashChildEnv = "LIVEEDGE_PERSIST_CRASH_SCENARIO"
	crashDirEnv   = "LIVEEDGE_PERSIST_CRASH_DIR"
)

// The scenarios' ops: a credit of 100 to user 1 and a debit of 60 reserved
// against it (user 1 has nothing else).
var (
	orderCredit = persist.Op{User: 1, ReqID: "credit", Postings: []persist.Posting{{User: 1, Delta: 100, Reason: persist.ReasonDev}}}
	orderDebit  = persist.Op{User: 1, ReqID: "debit", Postings: []persist.Posting{{User: 1, Delta: -60, Reason: persist.ReasonGift}},
		Tallies: []persist.Tally{{Name: "recv", User: 2, Delta: 60}}}
)

// kill -9 of a ledger process stopped between the group commit of a credit
// and that of a debit reserved against it: after the restart no acknowledged
// debit is without its credit and conservation holds (no durable negative
// balance).
//
//   - groups: the credit's group is taken by one committer and stopped just
//     before it enters the WAL; the debit goes into the next group, taken by
//     the other committer. The debit's group must not become durable (nor be
//     acknowledged) before the credit's.
//   - reserved: the credit's caller is stopped right after its reservation;
//     the debit, reserved against it, must not commit without it.
func TestKill9BetweenDependentGroups(t *testing.T) {
	if sc := os.Getenv(crashChildEnv); sc != "" {
		persist.RunOrderCrashChild(sc, os.Getenv(crashDirEnv), orderCredit, orderDebit)
		return
	}
	for _, sc := range []string{"groups", "reserved"} {
		t.Run(sc, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(os.Args[0], "-test.run=^TestKill9BetweenDependentGroups$", "-test.count=1")
			cmd.Env = append(os.Environ(), crashChildEnv+"="+sc, crashDirEnv+"="+dir)
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			lines := make(chan string, 16)
			go func() {
				s := bufio.NewScanner(out)
				for s.Scan() {
					lines <- s.Text()
				}
				close(lines)
			}()
			// The child says when it is as far as it can get: the debit
			// acknowledged, or its group waiting for the credit's.
			acked := map[string]bool{}
			deadline := time.After(60 * time.Second)
		wait:
			for {
				select {
				case l, ok := <-lines:
					if !ok {
						t.Fatal("child exited before its crash point")
					}
					t.Logf("child: %s", l)
					switch {
					case strings.HasPrefix(l, "acked "):
						acked[strings.TrimPrefix(l, "acked ")] = true
						if acked["debit"] {
							break wait
						}
					case l == "debit waits for the credit's group":
						break wait
					case strings.HasPrefix(l, "error"):
						t.Fatal(l)
					}
				case <-deadline:
					_ = cmd.Process.Kill()
					t.Fatal("child did not reach its crash point")
				}
			}
			if err := cmd.Process.Kill(); err != nil { // SIGKILL
				t.Fatal(err)
			}
			_ = cmd.Wait()

			st, err := persist.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			l, err := persist.NewLedger(st, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			trades, err := l.Trades(1, 0, 10)
			if err != nil {
				t.Fatal(err)
			}
			has := map[string]bool{}
			for _, tr := range trades {
				has[tr.ReqID] = true
			}
			t.Logf("acknowledged %v, durable %v", acked, has)
			for req := range acked {
				if !has[req] {
					t.Errorf("acknowledged %s is not in the ledger", req)
				}
			}
			if has["debit"] && !has["credit"] {
				t.Errorf("the debit is durable without the credit it was reserved against")
			}
			persisttest.CheckConservation(t, l)
		})
	}
}
