package gateway

import (
	"context"
	"embed"
	"net"
	"path"
	"strconv"

	"github.com/cloudwego/hertz/pkg/app"

	"github.com/liveedge/liveedge/gateway/proto"
)

// demoFiles is the live-room demo page (http.demo): plain HTML, CSS and JS
// over the TypeScript SDK's browser bundle (demo/liveedge.js, built from
// clientsdk/ts by `npm run build` there and committed, so `go build` needs
// no Node).
//
//go:embed demo/*.html demo/*.css demo/*.js
var demoFiles embed.FS

var demoTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
}

// demoRoutes serves GET /demo/ (the page), /demo/<file> (its assets) and
// /demo/config.json (where the page's SDK connects).
func (a *API) demoRoutes() {
	a.h.GET("/demo", func(_ context.Context, c *app.RequestContext) { c.Redirect(302, []byte("/demo/")) })
	a.h.GET("/demo/", func(_ context.Context, c *app.RequestContext) { a.demoFile(c, "index.html") })
	a.h.GET("/demo/config.json", a.demoConfig)
	a.h.GET("/demo/:file", func(_ context.Context, c *app.RequestContext) { a.demoFile(c, c.Param("file")) })
}

func (a *API) demoFile(c *app.RequestContext, name string) {
	ct, known := demoTypes[path.Ext(name)]
	b, err := demoFiles.ReadFile("demo/" + name)
	if !known || err != nil {
		a.fail(c, proto.Errorf(proto.CodeNotFound, "no such demo file"))
		return
	}
	c.Response.Header.Set("Cache-Control", "no-cache")
	c.Data(200, ct, b)
}

// demoConfig tells the page the WebSocket port (the page uses its own host
// name: the listener may be bound to 0.0.0.0), whether dev tokens work, and
// the node id.
func (a *API) demoConfig(_ context.Context, c *app.RequestContext) {
	port := 0
	if _, p, err := net.SplitHostPort(a.node.WS.Addr()); err == nil {
		port, _ = strconv.Atoi(p)
	}
	ok(c, map[string]any{
		"ws_port":    port,
		"ws_path":    "/ws",
		"node":       a.cfg.Node.ID,
		"dev_tokens": a.cfg.Auth.DevTokens,
	})
}
