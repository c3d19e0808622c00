package main

import "syscall"

// procAttr puts a test's child (a node, make run) in a process group of its
// own — cleanup kills the group — and kills it when the test process dies
// (a timeout's panic skips the cleanup).
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
