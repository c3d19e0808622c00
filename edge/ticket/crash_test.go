package ticket

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/liveedge/liveedge/persist"
	"github.com/liveedge/liveedge/persist/persisttest"
)

// Env of the crash child (TestSagaCrashChild).
const (
	crashDirEnv   = "TICKET_CRASH_DIR"
	crashPointEnv = "TICKET_CRASH_POINT" // the point where the child kills itself
	crashFailEnv  = "TICKET_CRASH_FAIL"  // a step to fail first (to crash inside the compensation)
	crashRedisEnv = "TICKET_CRASH_REDIS" // coupons in this redis-server (SharedCoupons), else Pebble
	crashPayEnv   = "TICKET_CRASH_PAY"   // the order's payment ("" = coins)
)

// TestSagaCrashChild is the child process of TestSagaKill9BetweenSteps: it
// opens the prepared data directory and places a coins order whose hook
// kills the process with SIGKILL at the named point. It does nothing when
// run on its own.
func TestSagaCrashChild(t *testing.T) {
	dir := os.Getenv(crashDirEnv)
	if dir == "" {
		t.Skip("child of TestSagaKill9BetweenSteps only")
	}
	point, fail := os.Getenv(crashPointEnv), os.Getenv(crashFailEnv)
	cfg := Config{Hook: func(p string) error {
		switch p {
		case point:
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		case fail:
			return errors.New("injected failure at " + p)
		}
		return nil
	}}
	var e *env
	if addr := os.Getenv(crashRedisEnv); addr != "" {
		e = openSharedEnv(t, dir, addr, cfg)
	} else {
		e = openEnv(t, dir, cfg)
	}
	coupon := os.Getenv("TICKET_CRASH_COUPON")
	payBy := os.Getenv(crashPayEnv)
	if payBy == "" {
		payBy = PayCoins
	}
	_, err := e.svc.Place(1, PlaceReq{ProgramID: 1, CategoryID: 1, Count: 2, ReqID: "crash", Pay: payBy, CouponID: coupon})
	t.Fatalf("the child was not killed at %s (place: %v)", point, err)
}

// kill -9 between each pair of saga steps (and inside the compensation):
// the restarted node completes forward what only lacked the confirm and
// compensates the rest, exactly once — balance, coupon and seats as the
// crash table of docs/tickets.md says, the ledger conserves coins, and a
// second restart changes nothing.
func TestSagaKill9BetweenSteps(t *testing.T) { testSagaKill9BetweenSteps(t, "") }

// TestSagaKill9BetweenStepsSharedCoupons is TestSagaKill9BetweenSteps with a
// cluster's coupons (SharedCoupons in a real redis-server that outlives the
// killed process): a kill after Redis took the coupon and before the order
// recorded it ("coupon_unrecorded") is settled at start-up by asking Redis
// who holds the coupon.
func TestSagaKill9BetweenStepsSharedCoupons(t *testing.T) {
	testSagaKill9BetweenSteps(t, startCouponRedis(t))
}

func testSagaKill9BetweenSteps(t *testing.T, redisAddr string) {
	const credit, price, discount = 1000, 100, 30
	cases := []struct {
		point, fail string
		pay         string // "" = coins
		paid        bool   // completed forward
		couponUsed  bool   // the coupon step happened
		debited     bool   // the debit happened
		unrecorded  bool   // the store took the coupon, the order did not record it (given back where that can be: Redis)
	}{
		{point: "crash:coupon_unrecorded", unrecorded: true},
		{point: "crash:coupon_unrecorded", pay: PayMock, unrecorded: true},
		{point: "crash:after_lock"},
		{point: "crash:after_coupon", couponUsed: true},
		{point: "crash:after_debit", paid: true, couponUsed: true, debited: true},
		{point: "crash:after_coupon_back", fail: "fail:debit", couponUsed: true},
		{point: "crash:after_refund", fail: "fail:confirm", couponUsed: true, debited: true},
		{point: "crash:after_coupon_back", fail: "fail:confirm", couponUsed: true, debited: true},
	}
	for _, tc := range cases {
		t.Run(strings.TrimPrefix(tc.point, "crash:")+"/"+tc.fail+tc.pay, func(t *testing.T) {
			dir := t.TempDir()
			var e *env
			if redisAddr != "" {
				e = openSharedEnv(t, dir, redisAddr, Config{})
			} else {
				e = openEnv(t, dir, Config{})
			}
			e.credit(1, credit)
			prog := e.program([]CategoryDef{{ID: 1, Name: "A", Price: price, Rows: 1, Cols: 4}}, 4, 8)
			c, err := e.svc.CreateCoupon(1, discount)
			if err != nil || prog != 1 {
				t.Fatal(prog, err)
			}
			e.close()

			cmd := exec.Command(os.Args[0], "-test.run=^TestSagaCrashChild$", "-test.count=1")
			cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, crashPointEnv+"="+tc.point, crashFailEnv+"="+tc.fail,
				"TICKET_CRASH_COUPON="+c.ID, crashRedisEnv+"="+redisAddr, crashPayEnv+"="+tc.pay)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child not killed by SIGKILL: %v\n%s", err, out)
			}

			check := func(when string) {
				t.Helper()
				e.open()
				defer e.close()
				v, err := e.store.Get(orderReqKey(1, "crash"))
				if err != nil {
					t.Fatalf("%s: no order recorded: %v", when, err)
				}
				o := e.order(strconv.FormatUint(persist.DecodeUint64(v), 10))
				w := e.world(1, c.ID, prog)
				if tc.paid {
					if o.Status != StatusPaid || w.balance != credit-(2*price-discount) || w.couponUsedBy != o.OrderID || w.sold != 2 || w.free != 2 {
						t.Fatalf("%s: want completed forward; order %+v world %+v", when, o, w)
					}
				} else {
					if o.Status != StatusCancelled || o.Saga != SagaCompensated || w.balance != credit || w.couponUsedBy != "" || w.free != 4 ||
						o.Steps.CouponUsed != tc.couponUsed || o.Steps.CouponBack != (tc.couponUsed || (tc.unrecorded && redisAddr != "")) ||
						o.Steps.Debited != tc.debited || o.Steps.Refunded != tc.debited {
						t.Fatalf("%s: want compensated; order %+v world %+v", when, o, w)
					}
				}
				persisttest.CheckConservation(t, e.ledger)
				e.audit()
			}
			check("first restart")
			check("second restart")
		})
	}
}
