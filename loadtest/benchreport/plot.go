package benchreport

import (
	"fmt"
	"image/color"
	"path/filepath"
	"sort"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// series is one line of a plot.
type series struct {
	name   string
	pts    plotter.XYs
	color  int  // palette index
	dashed bool // p99 lines are dashed, p50 solid
}

var palette = []color.Color{
	color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff}, // LiveEdge: red
	color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}, // baseline: blue
	color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff}, // LiveEdge batch / loadgen: orange
	color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	color.RGBA{R: 0x94, G: 0x67, B: 0xbd, A: 0xff}, // bare gws server (idle-compare): purple
}

// WritePlots draws the report's plots into dir and records them in rep.
// A plot whose data is absent from this run is skipped.
func (rep *Report) WritePlots(dir string) error {
	rep.Plots = nil
	type plotDef struct {
		file, title, x, y string
		logX, logY        bool
		ss                []series
	}
	defs := []plotDef{
		{"gift_latency.png", "Gift reply latency vs offered load (WebSocket, 500 conns)", "offered gifts/s (the rightmost point of each: closed loop, max)", "latency (ms, log)", false, true, rep.giftSeries()},
		{"fanout_latency.png", "Fan-out push latency at light load vs viewers (paced)", "viewers in the room (log)", "push latency (ms, log)", true, true, rep.fanoutSeries()},
		{"idle_rss.png", "Memory per idle joined connection vs connections (loadgen idle)", "connections", "RSS per connection (KiB)", false, false, rep.idleSeries()},
	}
	for _, d := range defs {
		p := plot.New()
		p.Title.Text = d.title
		p.X.Label.Text = d.x
		p.Y.Label.Text = d.y
		p.Legend.Top = true
		p.Legend.Left = true
		p.Add(plotter.NewGrid())
		if d.logX {
			p.X.Scale, p.X.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
		}
		if d.logY {
			p.Y.Scale, p.Y.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
		}
		drawn := 0
		for _, s := range d.ss {
			pts := positive(s.pts, d.logX, d.logY)
			if len(pts) == 0 {
				continue
			}
			drawn++
			l, sc, err := plotter.NewLinePoints(pts)
			if err != nil {
				return err
			}
			c := palette[s.color%len(palette)]
			l.Color, sc.Color = c, c
			l.Width = vg.Points(1.5)
			sc.Shape = draw.CircleGlyph{}
			if s.dashed {
				l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
				sc.Shape = draw.TriangleGlyph{}
			}
			p.Add(l, sc)
			p.Legend.Add(s.name, l, sc)
		}
		if drawn == 0 {
			continue
		}
		// room above the highest point for the legend (top left)
		p.Legend.TextStyle.Font.Size = vg.Points(8)
		if d.logY {
			p.Y.Max *= 20
		} else {
			p.Y.Min = 0
			p.Y.Max *= 1.35
		}
		if err := p.Save(18*vg.Centimeter, 12*vg.Centimeter, filepath.Join(dir, d.file)); err != nil {
			return fmt.Errorf("plot %s: %w", d.file, err)
		}
		rep.Plots = append(rep.Plots, Plot{File: d.file, Title: d.title})
	}
	return nil
}

// positive drops points a log axis cannot show.
func positive(pts plotter.XYs, logX, logY bool) plotter.XYs {
	var out plotter.XYs
	for _, p := range pts {
		if (logX && p.X <= 0) || (logY && p.Y <= 0) {
			continue
		}
		out = append(out, p)
	}
	return out
}

// latencyAt is (offered rate, p50, p99) of an open-loop sub-benchmark, or of
// a closed-loop one at its achieved rate.
func (rep *Report) latencyAt(name string) (x, p50, p99 float64, ok bool) {
	b := rep.Bench.Find(name)
	if b == nil {
		return 0, 0, 0, false
	}
	x, ok = b.Metrics["offered/s"]
	if !ok {
		x, ok = b.Metrics["gifts/s"]
	}
	return x, b.Metrics["p50-ms"], b.Metrics["p99-ms"], ok
}

func (rep *Report) pctSeries(name string, color int, benches []string) []series {
	p50 := series{name: name + " p50", color: color}
	p99 := series{name: name + " p99", color: color, dashed: true}
	for _, bn := range benches {
		if x, a, b, ok := rep.latencyAt(bn); ok {
			p50.pts = append(p50.pts, plotter.XY{X: x, Y: a})
			p99.pts = append(p99.pts, plotter.XY{X: x, Y: b})
		}
	}
	sortXY(p50.pts)
	sortXY(p99.pts)
	return []series{p50, p99}
}

func sortXY(pts plotter.XYs) { sort.Slice(pts, func(i, j int) bool { return pts[i].X < pts[j].X }) }

// giftSeries: LiveEdge at a tenth, a quarter and half of its max and at its
// max; the bare echo at half its own max, at LiveEdge's open-loop rates and
// at its max; and the gift loadgen runs (one point per offered rate) when
// there are any.
func (rep *Report) giftSeries() []series {
	var ss []series
	ss = append(ss, rep.pctSeries("LiveEdge", 0, []string{"GiftWS/liveedge_tenth", "GiftWS/liveedge_quarter", "GiftWS/liveedge_half", "GiftWS/liveedge"})...)
	ss = append(ss, rep.pctSeries("bare gws echo", 1, []string{"GiftWS/echo_at_liveedge_tenth", "GiftWS/echo_at_liveedge_quarter",
		"GiftWS/echo_half", "GiftWS/echo_at_liveedge_half", "GiftWS/echo_at_liveedge_batch_half", "GiftWS/echo"})...)
	p50 := series{name: "LiveEdge, loadgen gift p50", color: 2}
	p99 := series{name: "LiveEdge, loadgen gift p99", color: 2, dashed: true}
	for _, lg := range rep.Loadgen {
		if lg.Scenario == "gift" && lg.Result.OfferedRate > 0 {
			p50.pts = append(p50.pts, plotter.XY{X: lg.Result.OfferedRate, Y: lg.Result.P50Ms})
			p99.pts = append(p99.pts, plotter.XY{X: lg.Result.OfferedRate, Y: lg.Result.P99Ms})
		}
	}
	sortXY(p50.pts)
	sortXY(p99.pts)
	return append(ss, p50, p99)
}

func (rep *Report) fanoutSeries() []series {
	mk := func(name string, color int, kind string) []series {
		p50 := series{name: name + " p50", color: color}
		p99 := series{name: name + " p99", color: color, dashed: true}
		for _, v := range []struct {
			suffix  string
			viewers float64
		}{{"_1k", 1000}, {"_10k", 10000}} {
			b := rep.Bench.Find(kind + v.suffix)
			if b == nil {
				continue
			}
			p50.pts = append(p50.pts, plotter.XY{X: v.viewers, Y: b.Metrics["paced-p50-ms"]})
			p99.pts = append(p99.pts, plotter.XY{X: v.viewers, Y: b.Metrics["paced-p99-ms"]})
		}
		return []series{p50, p99}
	}
	return append(mk("LiveEdge", 0, "RoomFanout"), mk("bare gws loop", 1, "BareGwsLoop")...)
}

func (rep *Report) idleSeries() []series {
	node := series{name: "node (LiveEdge)", color: 0}
	gen := series{name: "loadgen client (Go SDK)", color: 1, dashed: true}
	raw := series{name: "loadgen client (raw idle, -client raw)", color: 3, dashed: true}
	bare := series{name: "bare gws server (idle-compare)", color: 4}
	for _, lg := range rep.Loadgen {
		r := lg.Result
		if lg.Scenario != "idle" || r.Conns == 0 {
			continue
		}
		if strings.HasPrefix(lg.File, compareBare) {
			if r.NodeRSSPerConn > 0 {
				bare.pts = append(bare.pts, plotter.XY{X: float64(r.Conns), Y: r.NodeRSSPerConn / 1024})
			}
			continue
		}
		if r.NodeRSSPerConn > 0 {
			node.pts = append(node.pts, plotter.XY{X: float64(r.Conns), Y: r.NodeRSSPerConn / 1024})
		}
		if r.LoadgenRSSPerConn > 0 {
			g := &gen
			if r.Client == "raw" {
				g = &raw
			}
			g.pts = append(g.pts, plotter.XY{X: float64(r.Conns), Y: r.LoadgenRSSPerConn / 1024})
		}
	}
	sortXY(node.pts)
	sortXY(gen.pts)
	sortXY(raw.pts)
	if len(bare.pts) == 0 {
		return []series{node, gen, raw}
	}
	sortXY(bare.pts)
	return []series{node, gen, raw, bare}
}
