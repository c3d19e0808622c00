package nodetest

import (
	"errors"
	"io"
	"net/http"

	"github.com/liveedge/liveedge/gateway/proto"
)

func decodeBody(resp *http.Response, out any) error {
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	return proto.Unmarshal(b, out)
}

// CodeOf is the protocol error code of err (a reply's *proto.Error), -1 if
// it is not one.
func CodeOf(err error) int {
	var pe *proto.Error
	if errors.As(err, &pe) {
		return pe.Code
	}
	return -1
}
