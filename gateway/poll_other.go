//go:build !linux

package gateway

// parkPoller: no epoll here; readers wait in the runtime's poller for as
// long as their connection lives.
func parkPoller() readPoller { return nil }
