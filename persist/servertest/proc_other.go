//go:build !linux

package servertest

import "syscall"

// dieWithParent: no parent-death signal here; Stop at cleanup only.
func dieWithParent() *syscall.SysProcAttr { return nil }
