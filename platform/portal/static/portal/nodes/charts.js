// The charts of a node's page (portal.views.nodes.node_chart_data), drawn with the vendored
// uPlot. Loaded as a file, never inline: the portal's Content-Security-Policy allows no inline
// script. Each chart is a <div data-chart="key [key]"> of the #charts section; a figure the node
// did not measure is a gap in its line, never a zero.
"use strict";

(function () {
  const section = document.getElementById("charts");
  if (!section || typeof uPlot === "undefined") {
    return;
  }
  const status = document.getElementById("charts-status");
  const LABELS = {
    ops_per_cycle: "ops/cycle",
    throughput_gops: "G ops/s",
    cache_hit_rate: "cache hit rate",
    ppt_hit_rate: "PPT hit rate",
    power_watts: "power (W)",
    mops_per_watt: "Mops/W",
    up: "up",
  };
  const COLORS = ["#0a4fa6", "#a40000"];
  // Rates share one axis; other pairs (watts and Mops/W) get an axis each.
  const SCALE = { cache_hit_rate: "rate", ppt_hit_rate: "rate" };

  function chart(box, data) {
    const keys = box.dataset.chart.split(" ");
    const xs = keys[0] === "up" ? data.up.t : data.t;
    const columns = keys[0] === "up" ? [data.up.v] : keys.map((key) => data[key]);
    box.textContent = "";
    if (!xs.length) {
      box.textContent = "No data yet.";
      box.dataset.points = "0";
      return 0;
    }
    const scales = {};
    const axes = [{}];
    const series = [{}];
    keys.forEach((key, i) => {
      const scale = SCALE[key] || key;
      const line = { label: LABELS[key], stroke: COLORS[i % 2], width: 2, scale };
      if (key === "up") {
        line.paths = uPlot.paths.stepped({ align: 1 });
        scales[scale] = { range: [0, 1.05] };
      }
      series.push(line);
      if (!axes.some((axis) => axis.scale === scale)) {
        axes.push({ scale, side: axes.length === 1 ? 3 : 1, grid: { show: axes.length === 1 } });
      }
    });
    const width = Math.max(box.clientWidth, 240);
    new uPlot({ width, height: 200, series, axes, scales }, [xs].concat(columns), box);
    box.dataset.points = String(xs.length);
    return xs.length;
  }

  function draw(data) {
    let points = 0;
    section.querySelectorAll("[data-chart]").forEach((box) => {
      points += chart(box, data);
    });
    const note = data.self_reported ? "Figures reported by your machine. " : "";
    status.textContent = points
      ? `${note}The last ${data.t.length} telemetry samples.`
      : `${note}No figures yet: they appear once the node reports.`;
  }

  fetch(section.dataset.url, { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then((response) => {
      if (!response.ok) {
        throw new Error(`the server answered ${response.status}`);
      }
      return response.json();
    })
    .then(draw)
    .catch((err) => {
      status.textContent = `The charts could not be loaded (${err.message}); reload the page to try again.`;
    });
})();
