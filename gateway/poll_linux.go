//go:build linux

package gateway

import (
	"errors"
	"sync"
	"syscall"
	"time"
)

// epollPoller waits for readable sockets of parked readers: one epoll
// instance and one goroutine for the process (every node of it). Sockets are
// registered one-shot: an event wakes the reader once, and the reader
// re-arms the socket when it parks again. The event carries the reader's key,
// never a file descriptor or a pointer: a key whose reader has ended finds
// nothing (a closed descriptor leaves the epoll set with its last close).
type epollPoller struct {
	epfd   int
	shards [64]struct {
		mu sync.Mutex
		m  map[uint64]*wsReader
	}
}

var (
	pollerOnce sync.Once
	thePoller  *epollPoller
)

// parkPoller is the process's poller, nil when epoll is not available (the
// readers then never park).
func parkPoller() readPoller {
	pollerOnce.Do(func() {
		fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
		if err != nil {
			return
		}
		p := &epollPoller{epfd: fd}
		for i := range p.shards {
			p.shards[i].m = map[uint64]*wsReader{}
		}
		thePoller = p
		go p.loop()
	})
	if thePoller == nil {
		return nil
	}
	return thePoller
}

// track enters r under its key; before r may be woken (park), so that the
// goroutine that ends r, whichever it is, finds the entry to forget.
func (p *epollPoller) track(r *wsReader) {
	sh := &p.shards[r.key%uint64(len(p.shards))]
	sh.mu.Lock()
	sh.m[r.key] = r
	sh.mu.Unlock()
}

// arm registers fd for one wake-up of r (again: it was registered before).
func (p *epollPoller) arm(fd int, r *wsReader, again bool) error {
	ev := syscall.EpollEvent{
		Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT,
		Fd:     int32(uint32(r.key)),
		Pad:    int32(uint32(r.key >> 32)),
	}
	op := syscall.EPOLL_CTL_MOD
	if !again {
		op = syscall.EPOLL_CTL_ADD
	}
	err := syscall.EpollCtl(p.epfd, op, fd, &ev)
	if errors.Is(err, syscall.EEXIST) {
		err = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_MOD, fd, &ev)
	}
	return err
}

// forget drops r (its connection ended).
func (p *epollPoller) forget(r *wsReader) {
	sh := &p.shards[r.key%uint64(len(p.shards))]
	sh.mu.Lock()
	delete(sh.m, r.key)
	sh.mu.Unlock()
}

func (p *epollPoller) loop() {
	events := make([]syscall.EpollEvent, 256)
	for {
		n, err := syscall.EpollWait(p.epfd, events, -1)
		if err != nil {
			if !errors.Is(err, syscall.EINTR) {
				time.Sleep(10 * time.Millisecond) // not expected; do not spin
			}
			continue
		}
		for i := range events[:n] {
			key := uint64(uint32(events[i].Fd)) | uint64(uint32(events[i].Pad))<<32
			sh := &p.shards[key%uint64(len(p.shards))]
			sh.mu.Lock()
			r := sh.m[key]
			sh.mu.Unlock()
			if r != nil {
				r.wake()
			}
		}
	}
}
