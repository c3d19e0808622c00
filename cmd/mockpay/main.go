// Command mockpay runs a mock payment provider for demos and load tests: it
// signs and delivers notifies to LiveEdge's webhook with Alipay's retry rhythm,
// answers active status queries and closes unpaid orders at LiveEdge's signed
// request (a closed order can no longer be paid). See edge/pay/mockpay.
//
//	mockpay -addr 127.0.0.1:8090 -secret liveedge-dev-pay-secret-change-me -factor 0.001
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/liveedge/liveedge/edge/pay/mockpay"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8090", "listen address")
	secret := flag.String("secret", "liveedge-dev-pay-secret-change-me", "signing secret of notifies, answers and closes (LiveEdge pay.secrets)")
	factor := flag.Float64("factor", 0.001, "retry schedule factor (1 = Alipay's real 25 h rhythm)")
	dup := flag.Int("dup", 0, "extra concurrent copies of every delivery")
	badsig := flag.Int("badsig", 0, "first N attempts per payment signed wrongly")
	delay := flag.Duration("delay", 0, "delay before the first delivery")
	reorder := flag.Bool("reorder", false, "random extra delay per attempt")
	lost := flag.Bool("lost", false, "never deliver notifies (only the active query answers)")
	flag.Parse()
	p := mockpay.New(mockpay.Config{Secret: *secret, Factor: *factor, Duplicates: *dup, BadSigs: *badsig,
		Delay: *delay, Reorder: *reorder, Lost: *lost})
	fmt.Printf("mockpay on http://%s (factor %g, dup %d, badsig %d, lost %v)\n", *addr, *factor, *dup, *badsig, *lost)
	srv := &http.Server{Addr: *addr, Handler: p.Handler(), ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
