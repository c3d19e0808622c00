package persist

import (
	"fmt"
	"time"
)

// RunOrderCrashChild runs a crash scenario of TestKill9BetweenDependentGroups
// in a child process: it opens the ledger in dir, stops at the scenario's
// crash point and prints how far it got (the parent kill -9s it then). It
// never returns.
func RunOrderCrashChild(scenario, dir string, credit, debit Op) {
	fail := func(err error) {
		fmt.Printf("error %v\n", err)
		park()
	}
	st, err := Open(dir)
	if err != nil {
		fail(err)
	}
	l, err := NewLedger(st, nil)
	if err != nil {
		fail(err)
	}
	isOp := func(entries []*commitEntry, op Op) bool {
		for _, e := range entries {
			for _, p := range e.postings {
				if p == op.Postings[0] {
					return true
				}
			}
		}
		return false
	}
	stopped := make(chan struct{})
	l.commit.crashAt = func(point string, entries []*commitEntry) {
		switch {
		case point == map[string]string{"groups": "write", "reserved": "reserved"}[scenario] && isOp(entries, credit):
			close(stopped)
			park() // the crash point: this goroutine goes no further
		case point == "wait" && isOp(entries, debit):
			fmt.Println("debit waits for the credit's group")
		}
	}
	ack := func(name string) func(Result, error) {
		return func(_ Result, err error) {
			if err != nil {
				fmt.Printf("error %s: %v\n", name, err)
				return
			}
			fmt.Printf("acked %s\n", name)
		}
	}
	go l.ApplyAsync(credit, ack("credit"))
	<-stopped
	l.ApplyAsync(debit, ack("debit"))
	park()
}

// park blocks the calling goroutine until the process is killed.
func park() {
	for {
		time.Sleep(time.Hour)
	}
}
