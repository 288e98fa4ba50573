// Line charts (uPlot, vendored: /ui/static/vendor/uPlot.iife.min.js).

/** A line chart in `el`: series [{label, stroke}], x a time axis or a step axis. */
export function lineChart(el, { series, time = true, yLabel = "", xLabel = "", yRange } = {}) {
  const width = () => Math.max(280, el.clientWidth || 600);
  const opts = {
    width: width(),
    height: 220,
    scales: {
      x: { time },
      y: yRange ? { range: yRange } : {},
    },
    axes: [{ label: xLabel, ...(time ? {} : { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] }) },
      { label: yLabel }],
    series: [{ label: xLabel || "time" }, ...series.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, spanGaps: false,
      points: { show: s.points ?? true, size: 5 } }))],
    legend: { show: true },
  };
  const data = [[], ...series.map(() => [])];
  const plot = new window.uPlot(opts, data, el);
  const resize = () => plot.setSize({ width: width(), height: 220 });
  window.addEventListener("resize", resize);
  return {
    plot,
    set(columns) {
      plot.setData(columns);
      if (columns[0].length < 2) { // one sample or none: a sensible axis, not uPlot's years
        const at = columns[0][0] ?? (time ? Date.now() / 1000 : 0);
        plot.setScale("x", time ? { min: at - 60, max: at + 60 } : { min: Math.max(0, at - 5), max: at + 5 });
      }
    },
    destroy() { window.removeEventListener("resize", resize); plot.destroy(); },
  };
}
