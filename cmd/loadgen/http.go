package main

import (
	"io"
	"net/http"
	"sync"
	"time"
)

func httpClient() *http.Client { return &http.Client{Timeout: 10 * time.Second} }

// lockedWriter serialises writes from several children's output copiers.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}
