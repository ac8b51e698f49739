// The staff dashboard's charts (uPlot), drawn from the economics report the page embeds
// (#economics-data: the same JSON the tables print and GET /api/v1/economics answers).
(function () {
  "use strict";

  const COLOURS = ["#0a4fa6", "#a84300", "#11652a", "#6b2fa3", "#a40000", "#2d6d7a"];
  const HALF_MONTH = 15 * 86400;  // seconds
  const num = (v) => (v === null || v === undefined ? null : Number(v));

  function width(el) {
    return Math.max(280, el.clientWidth || el.parentElement.clientWidth || 600);
  }

  function empty(el, why) {
    el.classList.add("chart-empty");
    el.textContent = why;
    el.dataset.drawn = "empty";
  }

  function draw(el, opts, data) {
    opts.axes = opts.axes || [{}, {}];
    opts.axes[1] = Object.assign({ size: 64 }, opts.axes[1]);  // room for "10,000"
    // The legend names the series; the values are in the tables beside the chart.
    const defaults = { width: width(el), height: 240, legend: { live: false } };
    const plot = new uPlot(Object.assign(defaults, opts), data, el);
    el.dataset.drawn = "chart";
    charts.push([el, plot]);
    return plot;
  }

  const charts = [];

  // Categories (nodes, scenarios) on the x axis: 0..n-1, named by the axis.
  function categories(names) {
    return {
      scales: {
        x: { time: false, range: [-0.5, names.length - 0.5] },
        y: { range: (u, min, max) => [Math.min(0, min), Math.max(0, max) * 1.1 || 1] },  // bars from 0
      },
      axes: [
        { values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) ? names[t] || "" : "")),
          splits: () => names.map((_, i) => i) },
        {},
      ],
    };
  }

  function bars() {
    return uPlot.paths.bars({ size: [0.6, 80] });
  }

  function months(history) {
    return history.map((row) => Date.parse(row.month + "-01T00:00:00Z") / 1000);
  }

  function mrr(el, report) {
    const h = report.mrr_history;
    draw(el, {
      series: [
        {},
        { label: "MRR (USD)", stroke: COLOURS[0], width: 2 },
        { label: "Paid (USD)", stroke: COLOURS[1], width: 2, dash: [6, 4] },
      ],
    }, [months(h), h.map((r) => num(r.mrr_usd)), h.map((r) => num(r.paid_usd))]);
  }

  function paying(el, report) {
    const h = report.mrr_history;
    draw(el, {
      series: [{}, { label: "Paying accounts", stroke: COLOURS[2], width: 2,
                     paths: uPlot.paths.stepped({ align: 1 }) }],
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max + 1)] } },
    }, [months(h), h.map((r) => r.paying_accounts)]);
  }

  function burn(el, report) {
    const h = report.mrr_history;
    const burnUsd = num(report.assumptions.burn_usd_per_month);
    draw(el, {
      series: [
        {},
        { label: "MRR (USD)", stroke: COLOURS[0], fill: "rgba(10,79,166,0.35)", paths: bars() },
        { label: "Monthly burn (USD)", stroke: COLOURS[4], width: 2 },
      ],
      scales: {
        x: { range: (u, min, max) => [min - HALF_MONTH, max + HALF_MONTH] },  // whole bars
        y: { range: (u, min, max) => [0, Math.max(max, burnUsd) * 1.1] },
      },
    }, [months(h), h.map((r) => num(r.mrr_usd)), h.map(() => burnUsd)]);
  }

  function cost(el, report) {
    const nodes = report.cost_per_trillion_ops.nodes;
    const fleet = num(report.cost_per_trillion_ops.fleet.value);
    const values = nodes.map((n) => num(n.cost_per_trillion_ops.value));
    if (!values.some((v) => v !== null)) {
      return empty(el, "No node has a cost per trillion ops yet: " +
        report.cost_per_trillion_ops.fleet.reason);
    }
    const names = nodes.map((n) => n.name);
    draw(el, Object.assign(categories(names), {
      series: [
        {},
        { label: "Node (USD per 10^12 ops)", stroke: COLOURS[0], fill: "rgba(10,79,166,0.35)",
          paths: bars() },
        { label: "Fleet-wide", stroke: COLOURS[4], width: 2 },
      ],
    }), [names.map((_, i) => i), values, names.map(() => fleet)]);
  }

  function breakEven(el, report) {
    const rows = report.break_even;
    if (!rows.length) return empty(el, "No active host.");
    const upfront = num(report.assumptions.host_hardware_cost_usd);
    const perHour = rows.map((r) => num(r.hours_to_repay_from_revenue.inputs.net_usd_per_hour));
    const savedPerHour = rows.map(
      (r) => num(r.hours_to_repay_vs_cloud_tpu.inputs.saving_usd_per_hour));
    const reach = rows.map((r) => num(r.hours_to_repay_from_revenue.value))
      .concat(rows.map((r) => num(r.hours_to_repay_vs_cloud_tpu.value)))
      .concat(rows.map((r) => num(r.hours_to_repay_from_revenue.inputs.hours_in_service)))
      .filter((v) => v !== null && v > 0);
    const end = Math.max(24, ...reach) * 1.25;
    const steps = 60;
    const xs = Array.from({ length: steps + 1 }, (_, i) => (end * i) / steps);
    const series = [{ label: "Hours in service" }];
    const data = [xs];
    rows.forEach((r, i) => {
      series.push({ label: r.host + " (USD net)", stroke: COLOURS[i % COLOURS.length], width: 2,
                    points: { show: false } });
      data.push(xs.map((x) => perHour[i] * x));
      series.push({ label: r.host + " vs cloud TPU (USD saved)", stroke: COLOURS[i % COLOURS.length],
                    width: 1, dash: [2, 2], points: { show: false } });
      data.push(xs.map((x) => savedPerHour[i] * x));
    });
    series.push({ label: "Upfront cost (USD)", stroke: "#111", width: 2, dash: [8, 4],
                  points: { show: false } });
    data.push(xs.map(() => upfront));
    // Where each host is now: a thin vertical line at its hours in service.
    const nowAt = rows.map((r) => num(r.hours_to_repay_from_revenue.inputs.hours_in_service));
    const markNow = (u) => {
      const ctx = u.ctx;
      ctx.save();
      nowAt.forEach((hours, i) => {
        if (hours === null || hours > end) return;
        const x = u.valToPos(hours, "x", true);
        ctx.strokeStyle = COLOURS[i % COLOURS.length];
        ctx.lineWidth = 1;
        ctx.setLineDash([2, 3]);
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
      });
      ctx.restore();
    };
    draw(el, { scales: { x: { time: false } }, series: series, hooks: { draw: [markNow] },
               axes: [{ label: "hours in service" }, {}] }, data);
  }

  function roi(el, report) {
    const keys = Object.keys(report.roi_3_years);
    const values = keys.map((k) => num(report.roi_3_years[k].value));
    if (!values.some((v) => v !== null)) {
      return empty(el, "No scenario has a figure yet: " +
        keys.map((k) => k.replace("_", " ") + ": " + report.roi_3_years[k].reason).join("; "));
    }
    const names = keys.map((k) => k.replace("_", " "));
    draw(el, Object.assign(categories(names), {
      series: [{}, { label: "ROI over 3 years (%)", stroke: COLOURS[2],
                     fill: "rgba(17,101,42,0.35)", paths: bars() }],
    }), [names.map((_, i) => i), values]);
  }

  function start() {
    const source = document.getElementById("economics-data");
    if (!source || typeof uPlot === "undefined") return;
    const report = JSON.parse(source.textContent);
    const all = { "chart-mrr": mrr, "chart-paying": paying, "chart-burn": burn,
                  "chart-cost": cost, "chart-break-even": breakEven, "chart-roi": roi };
    for (const [id, fn] of Object.entries(all)) {
      const el = document.getElementById(id);
      if (el) fn(el, report);
    }
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        for (const [el, plot] of charts) plot.setSize({ width: width(el), height: 240 });
      }, 150);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
