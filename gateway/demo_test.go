package gateway_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/liveedge/liveedge/configs"
	"github.com/liveedge/liveedge/edge/pay/mockpay"
	"github.com/liveedge/liveedge/gateway/nodetest"
)

// TestDemoServedByConfig: /demo/ and its assets are served when http.demo is
// on (the single-node default) and not at all when it is off (the production
// cluster config).
func TestDemoServedByConfig(t *testing.T) {
	// The production cluster config has no secrets of its own: they come from the environment.
	t.Setenv("LIVEEDGE_AUTH_JWT_SECRET", "demo-test-jwt-secret-0123456789abcdef")
	t.Setenv("LIVEEDGE_PAY_SECRETS", "demo-test-pay-secret-0123456789abcdef")
	t.Setenv("LIVEEDGE_CLUSTER_TRUSTED_NETWORK", "true") // no Redis or NATS credentials here
	cl, err := configs.Load("../configs/cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cl.HTTP.Demo || !configs.Default().HTTP.Demo {
		t.Fatalf("http.demo: cluster %v (want false), single %v (want true)", cl.HTTP.Demo, configs.Default().HTTP.Demo)
	}
	get := func(url string) (int, string, string) {
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header.Get("Content-Type"), string(b)
	}
	on := nodetest.Start(t, nodetest.Config(t))
	base := nodetest.HTTPURL(on)
	for path, want := range map[string]string{
		"/demo/":            "text/html",
		"/demo/demo.js":     "text/javascript",
		"/demo/liveedge.js": "text/javascript",
		"/demo/demo.css":    "text/css",
	} {
		status, ct, body := get(base + path)
		if status != 200 || !strings.HasPrefix(ct, want) || body == "" {
			t.Errorf("GET %s: %d %q (%d bytes), want 200 %s", path, status, ct, len(body), want)
		}
	}
	status, _, body := get(base + "/demo/config.json")
	if wantPort := on.WS.Addr()[strings.LastIndexByte(on.WS.Addr(), ':')+1:]; status != 200 || !strings.Contains(body, `"ws_port":`+wantPort) {
		t.Errorf("config.json: %d %s (want ws_port %s)", status, body, wantPort)
	}
	if status, _, _ := get(base + "/demo/nope.js"); status != 404 {
		t.Errorf("unknown asset: %d, want 404", status)
	}

	cfg := nodetest.Config(t)
	cfg.HTTP.Demo = false
	off := nodetest.Start(t, cfg)
	if status, _, _ := get(nodetest.HTTPURL(off) + "/demo/"); status != 404 {
		t.Errorf("demo off: /demo/ answered %d, want 404", status)
	}
}

// chromium finds Debian's chromium (make tools installs it). Without it the
// test is skipped, except under CI where that is a failure.
func chromium(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("chromium not found (make tools installs it with apt-get)")
	}
	t.Skip("chromium not found: run make tools (apt-get install chromium)")
	return ""
}

// TestDemoPageInChromium drives the demo page in headless Chromium: an anchor
// opens a room, two viewers join, chat goes both ways, a viewer recharges
// through the mock provider and sends a gift; every page shows the effect and
// the balances change. Then the anchor makes a red-packet rain: every page
// sees the packets fall, each viewer taps one and sees its amount and its
// balance move, every page shows the totals at the end and the anchor gets
// the rest back. Screenshots go to a temp dir (logged);
// LIVEEDGE_DEMO_SCREENSHOT=path also writes the viewer's page during the rain
// there (docs/demo.png: with fonts-noto-color-emoji and fonts-noto-cjk
// installed, else the gift names and emoji render as boxes).
func TestDemoPageInChromium(t *testing.T) {
	exe := chromium(t)
	prov := mockpay.New(mockpay.Config{Secret: paySecret, Factor: 0.0005})
	psrv := httptest.NewServer(prov.Handler())
	t.Cleanup(func() { prov.Close(); psrv.Close() })
	cfg := nodetest.Config(t)
	cfg.Pay.Secrets = []string{paySecret}
	cfg.Pay.ProviderURL = psrv.URL
	n := nodetest.Start(t, cfg)
	base := nodetest.HTTPURL(n) + "/demo/"

	newPage := startBrowser(t, exe)
	shots := t.TempDir()

	// The anchor opens a room.
	anchor := newPage("anchor")
	anchor.run("open room", chromedp.Navigate(base+"?user=500"),
		chromedp.WaitVisible(chromedp.CSS(`body[data-ready="1"]`)),
		chromedp.Click(chromedp.CSS("#open")),
		chromedp.WaitVisible(chromedp.CSS("#live")))
	room := anchor.text("#room-id")
	if room == "" || anchor.text("#anchor-id") != "500" {
		t.Fatalf("anchor page: room %q anchor %q", room, anchor.text("#anchor-id"))
	}

	// Two viewers join it (one types the room id, one picks it from the list
	// and clicks twice: one connection, not two — online 3 below).
	v1, v2 := newPage("viewer 501"), newPage("viewer 502")
	v1.joinRoom(base, 501, room)
	v2.run("the room list", chromedp.Navigate(base+"?user=502"),
		chromedp.WaitVisible(chromedp.CSS(`body[data-ready="1"]`)),
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`#rooms button[data-room="%s"]`, room))))
	v2.eval(fmt.Sprintf(`(() => { const b = document.querySelector('#rooms button[data-room="%s"]'); b.click(); b.click(); return "clicked twice"; })()`, room))
	v2.run("join from the room list", chromedp.WaitVisible(chromedp.CSS("#live")))
	for _, p := range []*tab{anchor, v1, v2} {
		p.waitJS("online 3", `document.getElementById('online').textContent === '3'`)
		p.waitJS("connected", `document.getElementById('state').textContent.startsWith('connected')`)
	}

	// Chat both ways.
	say := func(p *tab, msg string) {
		t.Helper()
		p.run("chat", chromedp.SetValue(chromedp.CSS("#chat-input"), msg), chromedp.Click(chromedp.CSS("#chat-send")))
	}
	seen := func(msg string) string {
		return fmt.Sprintf(`[...document.querySelectorAll('#chat-log li')].some(li => li.textContent.includes(%q))`, msg)
	}
	say(anchor, "welcome, viewers")
	say(v1, "hi anchor!")
	for _, p := range []*tab{anchor, v1, v2} {
		p.waitJS("anchor's chat", seen("anchor 500welcome, viewers"))
		p.waitJS("viewer's chat", seen("user 501hi anchor!"))
	}

	// The viewer recharges through the mock provider: its webhook credits 300 coins (biz 5570).
	if b := v1.text("#balance"); b != "0" {
		t.Fatalf("viewer balance before recharge: %q", b)
	}
	// Clicked twice: one order, paid once (the second click while the first
	// runs is ignored). Both clicks in one task, so the second surely comes
	// while the first runs: two chromedp.Clicks are two DevTools round trips
	// apart, and on a loaded machine the first recharge (order, provider)
	// could end in between — two orders, two payments, and the test flaked.
	v1.run("recharge", chromedp.SetValue(chromedp.CSS("#product"), "1"))
	v1.eval(`(() => { const b = document.getElementById('recharge'); b.click(); b.click(); return "clicked"; })()`)
	v1.waitJS("balance 300 after the provider's webhook", `document.getElementById('balance').textContent === '300'`)
	if note := v1.text("#credit-note"); !strings.Contains(note, "+300 coins (recharge)") {
		t.Errorf("credit note: %q", note)
	}
	// The webhook's push can beat the provider's HTTP reply to the page: the
	// note is written once that reply is in.
	v1.waitJS("the recharge's note", `document.getElementById('pay-note').dataset.path !== undefined`)
	if via := v1.eval(`document.getElementById('pay-note').dataset.path`); via != "provider" {
		t.Errorf("recharge went through %q, want the mock provider", via)
	}
	time.Sleep(time.Second) // a second order's webhook would have come by now
	if b := v1.text("#balance"); b != "300" {
		t.Fatalf("viewer balance after a double click on Recharge: %s, want 300 (one order)", b)
	}

	// A gift (皇冠, 20 coins): every page shows the effect; the sender's balance
	// and the anchor's received total move.
	if anchor.text("#received") != "0" {
		t.Fatalf("anchor received before the gift: %q", anchor.text("#received"))
	}
	// The anchor invites another room to a PK; nothing runs until that room's
	// anchor (user 600, over HTTP) accepts. Then the gift scores for this room.
	other := nodetest.OpenRoom(t, n, 600, 1)
	anchor.run("invite to PK", chromedp.SetValue(chromedp.CSS("#pk-room"), strconv.FormatInt(other, 10)),
		chromedp.Click(chromedp.CSS("#pk-go")))
	anchor.waitJS("PK invitation sent", `document.getElementById('pk-note').dataset.status === 'invited'`)
	if anchor.eval(`String(document.getElementById('pk').hidden)`) != "true" {
		t.Fatal("PK bar shown before the other anchor accepted")
	}
	pkID := anchor.eval(`document.getElementById('pk-note').dataset.pkId`)
	var acc struct {
		Code int `json:"code"`
	}
	if st := nodetest.DoJSON(t, "POST", nodetest.HTTPURL(n)+"/api/v1/pk/"+pkID+"/accept",
		nodetest.Token(t, n, 600, "anchor"), `{}`, &acc); st != 200 || acc.Code != 0 {
		t.Fatalf("accept PK %s: status %d code %d", pkID, st, acc.Code)
	}
	anchor.waitJS("PK bar shown", `!document.getElementById('pk').hidden`)
	v1.run("send gift", chromedp.Click(chromedp.CSS(`#gifts button[data-gift="23"]`)))
	v1.waitJS("balance 280", `document.getElementById('balance').textContent === '280'`)
	for _, p := range []*tab{anchor, v1, v2} {
		p.waitJS("gift effect", `!!document.querySelector('#effects .effect[data-gift="23"][data-from="501"]')`)
	}
	anchor.waitJS("anchor received 20", `document.getElementById('received').textContent === '20'`)
	for _, p := range []*tab{anchor, v1, v2} {
		p.waitJS("PK progress", fmt.Sprintf(`document.getElementById('pk-left').textContent === 'this room 20' &&
			document.getElementById('pk-right').textContent === 'room %d 0' &&
			document.getElementById('pk-ours').style.width === '100%%'`, other))
	}
	if e := v2.text("#effects .effect .text"); !strings.Contains(e, "user 501") || !strings.Contains(e, "×1") {
		t.Errorf("effect text on the other viewer: %q", e)
	}
	if anchor.eval(`String(document.querySelector('#gifts button').disabled)`) != "true" {
		t.Error("the anchor can click gift buttons (gifts to yourself are refused)")
	}

	for _, p := range []*tab{anchor, v1, v2} {
		t.Logf("screenshot %s: %s", p.name, p.shot(shots, strings.ReplaceAll(p.name, " ", "-")+".png"))
	}

	// A red-packet rain. The anchor recharges (300 coins through the mock
	// provider) and makes it rain 10 coins in 3 packets for 5 s: the page
	// creates, prepares (debits 10) and starts it. Every page sees the packets
	// fall (biz 5560); each viewer taps one with the mouse and sees its amount,
	// and its balance moves by the 5570 that follows; at the end (5561) every
	// page shows the totals and the anchor gets the third packet back (refund).
	anchor.run("anchor recharges", chromedp.SetValue(chromedp.CSS("#product"), "1"), chromedp.Click(chromedp.CSS("#recharge")))
	anchor.waitJS("anchor balance 300", `document.getElementById('balance').textContent === '300'`)
	if anchor.eval(`String(document.getElementById('rain-start').hidden)`) != "false" ||
		v1.eval(`String(document.getElementById('rain-start').hidden)`) != "true" {
		t.Fatal("the rain control must show on the anchor's page only")
	}
	anchor.run("make it rain", chromedp.SetValue(chromedp.CSS("#rain-total"), "10"),
		chromedp.SetValue(chromedp.CSS("#rain-count"), "3"), chromedp.SetValue(chromedp.CSS("#rain-seconds"), "5"),
		chromedp.Click(chromedp.CSS("#rain-go")))
	anchor.waitJS("rain running", `document.getElementById('rain-note').dataset.state === 'RUNNING'`)
	anchor.waitJS("anchor debited 10", `document.getElementById('balance').textContent === '290'`)
	code := anchor.eval(`document.getElementById('rain-note').dataset.code`)
	for _, p := range []*tab{anchor, v1, v2} {
		p.waitJS("packets falling", fmt.Sprintf(`document.querySelectorAll('#rain .packet').length === 3 &&
			document.getElementById('rain-status').dataset.code === %q`, code))
	}
	grab := func(p *tab) int {
		t.Helper()
		p.tapPacket()
		p.waitJS("grab result", `document.getElementById('rain-result').dataset.outcome === 'granted'`)
		amount, err := strconv.Atoi(p.eval(`document.getElementById('rain-result').dataset.amount`))
		if got := p.text("#rain-result"); err != nil || amount < 1 || amount > 8 || got != fmt.Sprintf("+%d coins!", amount) {
			t.Fatalf("%s: grab result %q, amount %d (%v)", p.name, got, amount, err)
		}
		if n := p.eval(`String(document.querySelectorAll('#rain .packet').length)`); n != "2" {
			t.Errorf("%s: %s packets left on screen after the tap, want 2", p.name, n)
		}
		return amount
	}
	a1, a2 := grab(v1), grab(v2)
	v1.waitJS("viewer 501 credited", fmt.Sprintf(`document.getElementById('balance').textContent === '%d' &&
		document.getElementById('credit-note').textContent === '+%d coins (redpacket)'`, 280+a1, a1))
	v2.waitJS("viewer 502 credited", fmt.Sprintf(`document.getElementById('balance').textContent === '%d'`, a2))
	for _, p := range []*tab{anchor, v1, v2} {
		t.Logf("screenshot %s: %s", p.name, p.shot(shots, strings.ReplaceAll(p.name, " ", "-")+"-rain.png"))
	}
	refund := 10 - a1 - a2
	for _, p := range []*tab{anchor, v1, v2} {
		p.waitJS("rain over (5561)", fmt.Sprintf(`document.getElementById('rain-status').dataset.state === 'over' &&
			document.getElementById('rain').hidden && document.querySelectorAll('#rain .packet').length === 0 &&
			document.getElementById('rain-status').textContent ===
			'Rain over: 2 of 3 packets grabbed, %d coins, %d back to the anchor'`, a1+a2, refund))
	}
	anchor.waitJS("anchor refunded", fmt.Sprintf(`document.getElementById('balance').textContent === '%d' &&
		document.getElementById('credit-note').textContent === '+%d coins (refund)'`, 290+refund, refund))
	if got := v1.text("#rain-result"); got != fmt.Sprintf("+%d coins!", a1) {
		t.Errorf("viewer 501's result after the rain: %q", got)
	}

	if out := os.Getenv("LIVEEDGE_DEMO_SCREENSHOT"); out != "" {
		src, _ := os.ReadFile(filepath.Join(shots, "viewer-501-rain.png"))
		if err := os.WriteFile(out, src, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// tab is one page of a headless Chromium; its methods fail the test with the
// page's connection state and error texts.
type tab struct {
	t    *testing.T
	name string
	ctx  context.Context
}

// startBrowser starts Chromium for t and returns a function that opens tabs.
func startBrowser(t *testing.T, exe string) func(name string) *tab {
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe), chromedp.NoSandbox, chromedp.Headless, chromedp.DisableGPU,
		chromedp.WindowSize(1280, 860))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelA)
	bctx, cancelB := chromedp.NewContext(actx)
	t.Cleanup(cancelB)
	if err := chromedp.Do(bctx); err != nil { // starts the browser
		t.Fatalf("start chromium: %v", err)
	}
	return func(name string) *tab {
		ctx, cancel := chromedp.NewContext(bctx)
		t.Cleanup(cancel)
		// The first run opens the tab and ties it to the context it is given:
		// this one, not a per-step timeout.
		if err := chromedp.Do(ctx); err != nil {
			t.Fatalf("open tab: %v", err)
		}
		return &tab{t, name, ctx}
	}
}

func (p *tab) fail(what string, err error) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 3*time.Second)
	defer cancel()
	state, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById('state').textContent`))
	errs, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`[...document.querySelectorAll('.error')].map(e => e.textContent).join(' | ')`))
	p.t.Fatalf("%s: %s: %v (state %q, errors %q)", p.name, what, err, state, errs)
}

func (p *tab) bounded() (context.Context, context.CancelFunc) {
	return context.WithTimeout(p.ctx, 20*time.Second)
}

func (p *tab) run(what string, steps ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	ctx, cancel := p.bounded()
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		p.fail(what, err)
	}
}

// waitJS polls a JS condition on the page (no fixed sleeps).
func (p *tab) waitJS(what, cond string) {
	p.t.Helper()
	p.run(what, func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		_, err := chromedp.Poll[chromedp.Void](cond, chromedp.WithPollingTimeout(15*time.Second),
			chromedp.WithPollingInterval(20*time.Millisecond))(ctx, tg)
		return chromedp.Void{}, err
	})
}

func (p *tab) eval(expr string) string {
	p.t.Helper()
	ctx, cancel := p.bounded()
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[string](expr))
	if err != nil {
		p.fail(expr, err)
	}
	return v
}

func (p *tab) text(sel string) string {
	p.t.Helper()
	ctx, cancel := p.bounded()
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		p.fail("read "+sel, err)
	}
	return strings.TrimSpace(v)
}

// shot saves a PNG screenshot of the whole page under dir and returns its path.
func (p *tab) shot(dir, file string) string {
	p.t.Helper()
	ctx, cancel := p.bounded()
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)) // quality 100 = PNG
	if err != nil {
		p.fail("screenshot", err)
	}
	path := filepath.Join(dir, file)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		p.t.Fatal(err)
	}
	return path
}

// tapPacket clicks, with the mouse, a red packet that is inside the rain's
// screen: the pointer first moves onto it (a hovered packet holds still),
// then clicks it.
func (p *tab) tapPacket() {
	p.t.Helper()
	const pick = `(() => {
		const box = document.getElementById('rain').getBoundingClientRect();
		for (const b of document.querySelectorAll('#rain .packet')) {
			const r = b.getBoundingClientRect();
			if (r.top >= box.top + 2 && r.bottom <= box.bottom - 40 && r.left >= box.left && r.right <= box.right) {
				b.dataset.pick = '1';
				return [r.left + r.width / 2, r.top + r.height / 2];
			}
		}
		return null;
	})()`
	p.run("tap a packet", func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		xy, err := chromedp.Poll[[]float64](pick, chromedp.WithPollingTimeout(10*time.Second),
			chromedp.WithPollingInterval(20*time.Millisecond))(ctx, tg)
		if err != nil {
			return chromedp.Void{}, err
		}
		if _, err := chromedp.MouseEvent("mouseMoved", xy[0], xy[1])(ctx, tg); err != nil {
			return chromedp.Void{}, err
		}
		return chromedp.Click(chromedp.CSS(`#rain .packet[data-pick]`))(ctx, tg)
	})
}

// joinRoom opens the demo as a viewer and joins room.
func (p *tab) joinRoom(base string, user int, room string) {
	p.t.Helper()
	p.run("join", chromedp.Navigate(fmt.Sprintf("%s?user=%d&room=%s", base, user, room)),
		chromedp.WaitVisible(chromedp.CSS(`body[data-ready="1"]`)),
		chromedp.Click(chromedp.CSS("#join")),
		chromedp.WaitVisible(chromedp.CSS("#live")))
}

// TestDemoRechargeWithoutProvider: with no mock provider listening, the
// page's recharge falls back to dev credit and says so.
func TestDemoRechargeWithoutProvider(t *testing.T) {
	exe := chromium(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String() // nothing listens here once closed
	ln.Close()
	cfg := nodetest.Config(t)
	cfg.Pay.ProviderURL = dead
	n := nodetest.Start(t, cfg)
	base := nodetest.HTTPURL(n) + "/demo/"
	room := strconv.FormatInt(nodetest.OpenRoom(t, n, 700, 1), 10)
	v := startBrowser(t, exe)("viewer 701")
	v.joinRoom(base, 701, room)
	v.run("recharge", chromedp.SetValue(chromedp.CSS("#product"), "2"), chromedp.Click(chromedp.CSS("#recharge")))
	v.waitJS("balance 500 by dev credit", `document.getElementById('balance').textContent === '500'`)
	v.waitJS("dev credit push", `document.getElementById('credit-note').textContent === '+500 coins (dev)'`)
	// The credit's push can beat the HTTP reply of /dev/credit to the page: the
	// note is written once that reply is in.
	v.waitJS("the recharge's note", `document.getElementById('pay-note').dataset.path !== undefined`)
	if via := v.eval(`document.getElementById('pay-note').dataset.path`); via != "dev" {
		t.Errorf("recharge path %q, want dev", via)
	}
	if note := v.text("#pay-note"); !strings.Contains(note, "mock provider is not running") || !strings.Contains(note, "dev credit") {
		t.Errorf("pay note does not say which path: %q", note)
	}
}
