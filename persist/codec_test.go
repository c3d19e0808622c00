package persist

import (
	"reflect"
	"testing"

	"github.com/bytedance/sonic"
)

func TestRowCodecRoundTripAndLegacyJSON(t *testing.T) {
	tr := Trade{ID: 1 << 40, User: 42, Delta: -300, Reason: ReasonGift, Ref: "gift 24 x3 to 7 in room 9",
		ReqID: "gift:r-1", Balance: 1_000_000_000_000, At: 1_790_000_000_000}
	got, err := decodeTrade(encodeTrade(tr))
	if err != nil || got != tr {
		t.Fatalf("trade: %+v %v", got, err)
	}
	res := Result{TradeIDs: []int64{5, 6}, Balances: []int64{0, -1}, At: 1_790_000_000_001}
	gr, err := decodeResult(encodeResult(res))
	if err != nil || !reflect.DeepEqual(gr, res) {
		t.Fatalf("result: %+v %v", gr, err)
	}
	// Rows written as JSON by earlier versions still decode.
	j, _ := sonic.Marshal(tr)
	if got, err := decodeTrade(j); err != nil || got != tr {
		t.Fatalf("legacy trade: %+v %v", got, err)
	}
	j, _ = sonic.Marshal(res)
	if gr, err := decodeResult(j); err != nil || !reflect.DeepEqual(gr, res) {
		t.Fatalf("legacy result: %+v %v", gr, err)
	}
	// Every truncation is an error, never a panic or a silent zero row.
	for _, v := range [][]byte{encodeTrade(tr), encodeResult(res)} {
		for n := 0; n < len(v); n++ {
			_, e1 := decodeTrade(v[:n])
			_, e2 := decodeResult(v[:n])
			if e1 == nil && e2 == nil {
				t.Fatalf("truncated to %d of %d decoded without error", n, len(v))
			}
		}
	}
	if _, err := decodeResult([]byte{codecV1, 0xff, 0xff, 0xff, 0x0f}); err == nil {
		t.Fatal("huge count accepted")
	}
}
