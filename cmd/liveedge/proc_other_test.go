//go:build !linux

package main

import "syscall"

// procAttr puts a test's child in a process group of its own.
func procAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }
