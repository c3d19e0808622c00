//go:build !unix

package gateway

import "errors"

// directWrites: room fan-outs always go through the connection's writer here.
const directWrites = false

type nbWrite struct{}

func (c *corkConn) tryWrite([]byte) (int, error) {
	return 0, errors.New("direct writes are not supported on this platform")
}
