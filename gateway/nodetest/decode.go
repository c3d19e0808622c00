package nodetest

import (
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
