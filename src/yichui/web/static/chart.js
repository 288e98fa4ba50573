// Line charts (uPlot, vendored: /ui/static/vendor/uPlot.iife.min.js).

/** A line chart in `el`: series [{label, stroke}], x a time axis or a step axis. */
export function lineChart(el, { series, time = true, yLabel = "", xLabel = "", yRange } = {}) {
  const width = () => Math.max(280, el.clientWidth || 600);
  const opts = {
    width: width(),
    height: 220,
    scales: { x: { time }, y: yRange ? { range: yRange } : {} },
    axes: [{ label: xLabel }, { label: yLabel }],
    series: [{}, ...series.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, spanGaps: false,
      points: { show: s.points ?? true, size: 5 } }))],
    legend: { show: true },
  };
  const data = [[], ...series.map(() => [])];
  const plot = new window.uPlot(opts, data, el);
  const resize = () => plot.setSize({ width: width(), height: 220 });
  window.addEventListener("resize", resize);
  return {
    plot,
    set(columns) { plot.setData(columns); },
    destroy() { window.removeEventListener("resize", resize); plot.destroy(); },
  };
}
