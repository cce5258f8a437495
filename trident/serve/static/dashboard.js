// trident /dashboard: polls /metrics, keeps a rolling window, draws canvas line charts. No external resources.
//
// Query parameters: interval_ms (default 2000), window_s (default 300), rate_window_s (default
// max(20, 4 scrape intervals)): rates and histogram quantiles at time t are taken over (t - rate_window_s, t],
// like PromQL's rate(x[rate_window_s]) and histogram_quantile(q, rate(x_bucket[rate_window_s])).
//
// Test hook, window.tridentDashboard:
//   samples       number of successful scrapes so far
//   renders       number of times the charts were drawn
//   errors        messages of failed scrapes and of errors while drawing, oldest first (the last 100)
//   lastUpdated   time of the last successful scrape (ms since the epoch), or null
//   series(name)  the latest scrape's samples of one metric: [{labels, value}]
//   charts()      what each shown chart drew last: [{id, title, series: [{label, points, last}]}] (the MoE charts
//                 are shown only while some model reports expert load, the adaptive one under serve --adaptive)
//                 (points: finite points plotted; last: the latest finite value, or null)
//   config        {intervalMs, windowS, rateWindowS}
"use strict";

(() => {
  // Every metric the page reads (tests/serve/test_dashboard.py checks that /metrics serves each one).
  const METRICS = {
    requests: "trident_requests_total",
    ttft: "trident_time_to_first_token_seconds",
    tpot: "trident_time_per_output_token_seconds",
    e2e: "trident_e2e_request_latency_seconds",
    promptTokens: "trident_prompt_tokens_total",
    generationTokens: "trident_generation_tokens_total",
    running: "trident_num_requests_running",
    waiting: "trident_num_requests_waiting",
    kvCacheUsage: "trident_kv_cache_usage_ratio",
    prefixCacheHitRatio: "trident_prefix_cache_hit_ratio",
    preemptions: "trident_num_preemptions_total",
    modelLoads: "trident_model_loads_total",
    modelUnloads: "trident_model_unloads_total",
    modelLoaded: "trident_model_loaded",
    modelMemory: "trident_model_memory_bytes",
    modelLoadSeconds: "trident_model_load_seconds",
    memoryBudget: "trident_memory_budget_bytes",
    moeExpertTokens: "trident_moe_expert_tokens_total",
    moeImbalance: "trident_moe_layer_imbalance_ratio",
    moeEntropy: "trident_moe_layer_entropy_term",
    adaptiveLimit: "trident_adaptive_running_limit",
    adaptiveWaves: "trident_adaptive_waves",
    adaptiveDecisions: "trident_adaptive_decisions_total",
  };
  const UNROUTED = "unrouted"; // how the page names model="": requests refused before a model was chosen

  const params = new URLSearchParams(location.search);
  const numberParam = (name, fallback, min) => {
    const v = Number(params.get(name));
    return params.has(name) && Number.isFinite(v) && v >= min ? v : fallback;
  };
  const INTERVAL_MS = numberParam("interval_ms", 2000, 100);
  const WINDOW_S = numberParam("window_s", 300, 10);
  const RATE_WINDOW_S = numberParam("rate_window_s", Math.max(20, (4 * INTERVAL_MS) / 1000), 0.1);
  const MIN_SPAN_S = Math.min(WINDOW_S, Math.max(10, (20 * INTERVAL_MS) / 1000));

  // ---- Prometheus text exposition format ------------------------------------------------------------------
  const seriesKey = (name, labels) =>
    name + "{" + Object.keys(labels).sort().map((k) => `${k}=${JSON.stringify(labels[k])}`).join(",") + "}";

  function parseValue(text, line) {
    if (text === "+Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    if (text === "NaN") return NaN;
    const v = Number(text);
    if (text === undefined || text === "" || Number.isNaN(v)) throw new Error(`bad value in: ${line}`);
    return v;
  }

  function parseSample(line) {
    let i = 0;
    while (i < line.length && /[A-Za-z0-9_:]/.test(line[i])) i++;
    const name = line.slice(0, i);
    if (!name) throw new Error(`bad sample line: ${line}`);
    const labels = {};
    if (line[i] === "{") {
      i++;
      for (;;) {
        while (line[i] === " " || line[i] === ",") i++;
        if (line[i] === "}") { i++; break; }
        const eq = line.indexOf("=", i);
        if (eq < 0 || line[eq + 1] !== '"') throw new Error(`bad labels in: ${line}`);
        const key = line.slice(i, eq).trim();
        let value = "";
        for (i = eq + 2; i < line.length && line[i] !== '"'; i++) {
          if (line[i] === "\\") { i++; value += line[i] === "n" ? "\n" : line[i]; } else value += line[i];
        }
        if (i >= line.length) throw new Error(`unterminated label value in: ${line}`);
        i++;
        labels[key] = value;
      }
    }
    return { name, labels, value: parseValue(line.slice(i).trim().split(/\s+/)[0], line) };
  }

  function parseExposition(text) {
    const samples = [];
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (line && line[0] !== "#") samples.push(parseSample(line));
    }
    return samples;
  }

  // ---- the rolling window ---------------------------------------------------------------------------------
  const scrapes = []; // {t: seconds, values: Map(series key -> value)}, oldest first
  const known = new Map(); // metric name -> Map(series key -> {labels, lastSeen})

  function addScrape(t, samples) {
    const values = new Map();
    for (const s of samples) {
      const key = seriesKey(s.name, s.labels);
      values.set(key, s.value);
      if (!known.has(s.name)) known.set(s.name, new Map());
      known.get(s.name).set(key, { labels: s.labels, lastSeen: t });
    }
    scrapes.push({ t, values });
    if (scrapes[0].t >= t - WINDOW_S - RATE_WINDOW_S) return;
    while (scrapes[0].t < t - WINDOW_S - RATE_WINDOW_S) scrapes.shift();
    for (const series of known.values()) { // forget label sets (models) no longer in the window
      for (const [key, s] of series) if (s.lastSeen < scrapes[0].t) series.delete(key);
    }
  }

  const seriesOf = (name, since) =>
    [...(known.get(name) || new Map())].filter(([, s]) => s.lastSeen >= since).map(([key, s]) => ({ key, labels: s.labels }));

  // A counter made monotonic: a drop (a server restart) adds the value before it, as PromQL's rate() does.
  function monotonic(key) {
    const out = new Array(scrapes.length).fill(null);
    let offset = 0, prev = null;
    scrapes.forEach((s, k) => {
      const v = s.values.get(key);
      if (v === undefined || !Number.isFinite(v)) return;
      if (prev !== null && v < prev) offset += prev;
      out[k] = v + offset;
      prev = v;
    });
    return out;
  }

  // Prometheus' histogram_quantile over cumulative buckets [{le, count}].
  function histogramQuantile(q, buckets) {
    buckets.sort((a, b) => a.le - b.le);
    const n = buckets.length;
    if (n < 2 || buckets[n - 1].le !== Infinity) return null;
    for (let k = 1; k < n; k++) buckets[k].count = Math.max(buckets[k].count, buckets[k - 1].count);
    const total = buckets[n - 1].count;
    if (!(total > 0)) return null;
    const rank = q * total;
    const b = buckets.findIndex((x) => x.count >= rank);
    if (b === n - 1) return buckets[n - 2].le;
    if (b === 0 && buckets[0].le <= 0) return buckets[0].le;
    const start = b > 0 ? buckets[b - 1].le : 0, below = b > 0 ? buckets[b - 1].count : 0;
    return start + (buckets[b].le - start) * ((rank - below) / (buckets[b].count - below));
  }

  // What the charts read: series over the visible part of the window, one per label set (so one per model).
  function windowView() {
    const n = scrapes.length, tNow = scrapes[n - 1].t;
    const first = scrapes.findIndex((s) => s.t >= tNow - WINDOW_S);
    const since = scrapes[first].t;
    const indices = [];
    for (let i = first; i < n; i++) indices.push(i);
    const starts = []; // starts[i]: the first scrape inside (t_i - RATE_WINDOW_S, t_i]
    for (let i = 0, j = 0; i < n; i++) {
      while (scrapes[j].t <= scrapes[i].t - RATE_WINDOW_S) j++;
      starts.push(j);
    }
    const models = new Set([...known.values()].flatMap((m) =>
      [...m.values()].filter((s) => s.lastSeen >= since && s.labels.model).map((s) => s.labels.model)));
    // a line's label: what it measures, after its model's name where that is needed to tell lines apart
    const label = (labels, parts) => {
      const model = labels.model === "" ? UNROUTED : labels.model;
      const named = model !== undefined && (models.size > 1 || model === UNROUTED || !parts.length);
      return (named ? [model, ...parts] : parts).join(" ");
    };
    const increase = (mono, i) => {
      if (mono[i] === null) return null;
      for (let k = starts[i]; k < i; k++) if (mono[k] !== null) return { inc: mono[i] - mono[k], dt: scrapes[i].t - scrapes[k].t };
      return null;
    };
    // A chart's line. kind: what it measures when a chart has several ("prompt", "p90", a status), else null.
    // Lines of different kinds differ by colour and the models by dash, unless byModel asks for the other way
    // round. model: the model label ("" for unrouted requests, undefined for a series of the whole server).
    const make = (labels, kind, values, byModel = false) => {
      const model = labels.model;
      return {
        label: label(labels, kind ? [kind] : []), model, values,
        colorKey: kind && !byModel ? kind : model ?? kind,
        dashKey: kind && model !== undefined ? (byModel ? kind : model) : null,
      };
    };
    const plain = (name, kindOf = () => null) => seriesOf(name, since).map(({ key, labels }) =>
      make(labels, kindOf(labels), indices.map((i) => scrapes[i].values.get(key) ?? null)));
    return {
      times: indices.map((i) => scrapes[i].t), tStart: since, tEnd: tNow,
      gauges: plain,
      totals: plain,
      rates: (name, kindOf = () => null) => seriesOf(name, since).map(({ key, labels }) => {
        const mono = monotonic(key);
        return make(labels, kindOf(labels), indices.map((i) => { const d = increase(mono, i); return d && d.inc / d.dt; }));
      }),
      quantiles: (name, qs = [0.5, 0.9]) => {
        const groups = new Map(); // series key without le -> {labels, buckets: [{le, mono}]}
        for (const { key, labels } of seriesOf(`${name}_bucket`, since)) {
          const { le, ...rest } = labels;
          const g = seriesKey(name, rest);
          if (!groups.has(g)) groups.set(g, { labels: rest, buckets: [] });
          groups.get(g).buckets.push({ le: parseValue(le, key), mono: monotonic(key) });
        }
        return [...groups.values()].flatMap(({ labels, buckets }) => qs.map((q) =>
          make(labels, `p${Math.round(q * 100)}`, indices.map((i) => {
            const counts = buckets.map((b) => ({ le: b.le, d: increase(b.mono, i) }));
            if (counts.some((c) => c.d === null)) return null;
            return histogramQuantile(q, counts.map((c) => ({ le: c.le, count: c.d.inc })));
          }), true)));
      },
    };
  }

  // ---- formatting -----------------------------------------------------------------------------------------
  function fmtNumber(v) {
    const a = Math.abs(v);
    for (const [scale, suffix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
      if (a >= scale) return (v / scale).toFixed(a >= 10 * scale ? 0 : 1) + suffix;
    }
    if (a >= 100 || Number.isInteger(v)) return v.toFixed(0);
    return a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
  }
  const fmtRate = (v) => fmtNumber(v) + "/s";
  const fmtPercent = (v) => (v * 100).toFixed(v > 0 && v < 0.1 ? 1 : 0) + "%";
  const fmtSeconds = (v) =>
    v === 0 ? "0" : v >= 1 ? fmtNumber(v) + " s" : v >= 1e-3 ? fmtNumber(v * 1e3) + " ms" : fmtNumber(v * 1e6) + " µs";
  const BYTE_UNITS = [[2 ** 40, "TiB"], [2 ** 30, "GiB"], [2 ** 20, "MiB"], [2 ** 10, "KiB"]];
  const byteUnit = (v) => BYTE_UNITS.find(([k]) => Math.abs(v) >= k) || [1, "B"];
  const fmtBytes = (v) => (v === 0 ? "0" : `${fmtNumber(v / byteUnit(v)[0])} ${byteUnit(v)[1]}`);
  const fmtClock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });

  // ---- the charts -----------------------------------------------------------------------------------------
  const PALETTE = ["#4f9cf9", "#3ecf8e", "#f5a524", "#a78bfa", "#22d3ee", "#f472b6", "#a3e635", "#fb923c", "#e879f9"];
  const STATUS_COLORS = { stop: "#3ecf8e", length: "#4f9cf9", abort: "#f5a524", error: "#f2555a" };
  const DASHES = [[], [7, 4], [2, 3], [10, 3, 2, 3]];
  const CSS_DASHES = ["solid", "dashed", "dotted", "dashed"];
  const byStatus = (l) => l.status;

  const nonZero = (s) => s.values.some((v) => v > 0);
  const byLayer = (l) => `layer ${l.layer}`;
  // lines with the same label added point by point (a layer's experts into one line per layer)
  const summed = (series) => {
    const lines = new Map();
    for (const s of series) {
      const line = lines.get(s.label);
      if (!line) lines.set(s.label, { ...s, values: [...s.values] });
      else line.values = line.values.map((v, i) => (v === null || s.values[i] === null ? null : v + s.values[i]));
    }
    return [...lines.values()];
  };
  const CHARTS = [
    { id: "requests", title: "Request rate by status", unit: "req/s", format: fmtRate, colors: STATUS_COLORS,
      series: (v) => v.rates(METRICS.requests, byStatus).filter((s) => s.model !== "" || nonZero(s)) },
    { id: "tokens", title: "Token throughput", unit: "tokens/s", format: fmtRate,
      series: (v) => [...v.rates(METRICS.promptTokens, () => "prompt"), ...v.rates(METRICS.generationTokens, () => "generation")] },
    { id: "queue", title: "Running / waiting requests", format: fmtNumber, integer: true,
      series: (v) => [...v.gauges(METRICS.running, () => "running"), ...v.gauges(METRICS.waiting, () => "waiting")] },
    { id: "kv-cache", title: "KV-cache usage", format: fmtPercent, yMax: 1, series: (v) => v.gauges(METRICS.kvCacheUsage) },
    { id: "ttft", title: "Time to first token", unit: "p50 / p90", format: fmtSeconds, series: (v) => v.quantiles(METRICS.ttft) },
    { id: "tpot", title: "Time per output token", unit: "p50 / p90", format: fmtSeconds, series: (v) => v.quantiles(METRICS.tpot) },
    { id: "e2e", title: "End-to-end latency", unit: "p50 / p90", format: fmtSeconds, series: (v) => v.quantiles(METRICS.e2e) },
    { id: "prefix-cache", title: "Prefix-cache hit ratio", unit: "since load", format: fmtPercent, yMax: 1,
      series: (v) => v.gauges(METRICS.prefixCacheHitRatio) },
    { id: "preemptions", title: "Preemptions", unit: "total", format: fmtNumber, integer: true,
      series: (v) => v.totals(METRICS.preemptions) },
    { id: "loads", title: "Model loads / unloads", unit: "total", format: fmtNumber, integer: true,
      series: (v) => [...v.totals(METRICS.modelLoads, () => "loads"), ...v.totals(METRICS.modelUnloads, () => "unloads")] },
    { id: "memory", title: "Model memory and budget", format: fmtBytes, unitOf: (max) => byteUnit(max)[0],
      series: (v) => [...v.gauges(METRICS.modelMemory), ...v.gauges(METRICS.memoryBudget, () => "budget").filter(nonZero)] },
    { id: "load-time", title: "Model load time", unit: "latest load", format: fmtSeconds,
      series: (v) => v.gauges(METRICS.modelLoadSeconds) },
    // mixture-of-experts models only (hidden while no model reports expert load)
    { id: "moe-tokens", title: "MoE expert assignments", unit: "per layer", format: fmtRate, optional: true,
      series: (v) => summed(v.rates(METRICS.moeExpertTokens, byLayer)) },
    { id: "moe-imbalance", title: "MoE expert imbalance", unit: "max / mean load", format: fmtNumber, optional: true,
      series: (v) => v.gauges(METRICS.moeImbalance, byLayer) },
    { id: "moe-entropy", title: "MoE entropy balance term", unit: "α Σ p log p", format: fmtNumber, optional: true,
      series: (v) => v.gauges(METRICS.moeEntropy, byLayer) },
    // trident serve --adaptive only (hidden otherwise)
    { id: "adaptive", title: "Adaptive running limit", unit: "sequences; decisions", format: fmtNumber, integer: true,
      optional: true,
      series: (v) => [...v.gauges(METRICS.adaptiveLimit, () => "limit"),
                      ...v.totals(METRICS.adaptiveDecisions, (l) => l.action)] },
    { id: "adaptive-waves", title: "Adaptive admission in waves", unit: "1 = in waves", format: fmtNumber,
      integer: true, optional: true, series: (v) => v.gauges(METRICS.adaptiveWaves) },
  ];

  const el = (tag, props = {}, children = []) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };

  for (const chart of CHARTS) {
    chart.canvas = el("canvas");
    chart.legend = el("div", { className: "legend" });
    chart.colorOf = new Map(); // kept across renders, so a line keeps its colour when a model appears
    chart.dashOf = new Map();
    chart.drawn = [];
    const title = el("h2", {}, [chart.title, ...(chart.unit ? [el("small", { textContent: chart.unit })] : [])]);
    chart.section = el("section", { className: "card", id: `chart-${chart.id}` }, [title, chart.legend, el("div", { className: "plot" }, [chart.canvas])]);
    chart.shown = !chart.optional; // an optional chart's section is in the page only while it has lines
    if (chart.shown) document.getElementById("charts").append(chart.section);
  }

  const pick = (map, key, count) => {
    if (!map.has(key)) map.set(key, map.size % count);
    return map.get(key);
  };

  function niceStep(x, integer) {
    if (!(x > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(x)), m = x / p;
    const step = (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
    return integer ? Math.max(1, Math.round(step)) : step;
  }

  function drawChart(chart, view, series) {
    const canvas = chart.canvas, dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (w < 20 || h < 20) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "10.5px system-ui, 'DejaVu Sans', sans-serif";
    const left = 50, right = 8, top = 6, bottom = 18, pw = w - left - right, ph = h - top - bottom;
    let max = 0;
    for (const s of series) for (const v of s.values) if (Number.isFinite(v)) max = Math.max(max, v);
    const unit = chart.unitOf ? chart.unitOf(max) : 1; // steps are round numbers of this unit
    const step = chart.yMax ? chart.yMax / 4 : unit * niceStep(max / 4 / unit, chart.integer);
    const yMax = chart.yMax || Math.max(step, step * Math.ceil((max * 1.05) / step));
    const y = (v) => top + ph * (1 - Math.min(v, yMax) / yMax);
    const tEnd = view.tEnd, tStart = Math.min(view.tStart, tEnd - MIN_SPAN_S); // now is at the right edge
    const x = (t) => left + (pw * (t - tStart)) / (tEnd - tStart);

    g.strokeStyle = "#252e3a"; g.fillStyle = "#8893a2"; g.lineWidth = 1; g.setLineDash([]);
    g.textAlign = "right"; g.textBaseline = "middle";
    for (let v = 0; v <= yMax + step / 1e6; v += step) {
      g.beginPath(); g.moveTo(left, Math.round(y(v)) + 0.5); g.lineTo(w - right, Math.round(y(v)) + 0.5); g.stroke();
      g.fillText(chart.format(v), left - 6, y(v));
    }
    const tStep = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800].find((s) => (tEnd - tStart) / s <= Math.max(1, pw / 75)) || 3600;
    g.textAlign = "center"; g.textBaseline = "top";
    for (let t = Math.ceil(tStart / tStep) * tStep; t <= tEnd; t += tStep) {
      const half = g.measureText(fmtClock(t)).width / 2;
      if (x(t) - half >= 0 && x(t) + half <= w) g.fillText(fmtClock(t), x(t), h - bottom + 5); // whole labels only
    }

    g.save();
    g.beginPath(); g.rect(left, top - 1, pw + 1, ph + 2); g.clip();
    g.lineWidth = 1.7; g.lineJoin = "round";
    for (const s of series) {
      g.strokeStyle = s.color; g.fillStyle = s.color; g.setLineDash(DASHES[s.dash]);
      let open = false;
      g.beginPath();
      s.values.forEach((v, k) => {
        if (!Number.isFinite(v)) { open = false; return; }
        const px = x(view.times[k]), py = y(v);
        if (open) g.lineTo(px, py); else g.moveTo(px, py);
        const alone = !Number.isFinite(s.values[k - 1]) && !Number.isFinite(s.values[k + 1]);
        if (alone) g.fillRect(px - 1.5, py - 1.5, 3, 3);
        open = true;
      });
      g.stroke();
    }
    g.restore();
    if (!series.some((s) => s.values.some(Number.isFinite))) {
      g.fillStyle = "#8893a2"; g.textAlign = "center"; g.textBaseline = "middle";
      g.fillText("no data in the window yet", left + pw / 2, top + ph / 2);
    }
  }

  function drawLegend(chart, series) {
    chart.legend.replaceChildren(...series.map((s) => {
      const last = s.values.findLast(Number.isFinite) ?? null;
      const swatch = el("i", { style: `border-top: 2px ${CSS_DASHES[s.dash]} ${s.color}` });
      return el("span", {}, [swatch, s.label, el("b", { textContent: last === null ? "–" : chart.format(last) })]);
    }));
  }

  // ---- header, banner, polling ----------------------------------------------------------------------------
  const state = {
    samples: 0, renders: 0, errors: [], lastUpdated: null,
    config: { intervalMs: INTERVAL_MS, windowS: WINDOW_S, rateWindowS: RATE_WINDOW_S },
    series(name) {
      const latest = scrapes[scrapes.length - 1];
      if (!latest) return [];
      return [...(known.get(name) || new Map())].filter(([key]) => latest.values.has(key))
        .map(([key, s]) => ({ labels: s.labels, value: latest.values.get(key) }));
    },
    charts: () => CHARTS.filter((c) => c.shown).map((c) => ({ id: c.id, title: c.title, series: c.drawn.map((s) => ({ ...s })) })),
  };
  window.tridentDashboard = state;

  const total = (name, keep = () => true) => state.series(name).filter((s) => keep(s.labels)).reduce((a, s) => a + s.value, 0);
  const STATS = [
    ["requests", "requests", () => total(METRICS.requests)],
    ["errors", "errors", () => total(METRICS.requests, (l) => l.status === "error")],
    ["prompt-tokens", "prompt tokens", () => total(METRICS.promptTokens)],
    ["generation-tokens", "generated tokens", () => total(METRICS.generationTokens)],
    ["running", "running", () => total(METRICS.running)],
    ["waiting", "waiting", () => total(METRICS.waiting)],
  ];
  for (const [id, caption] of STATS) {
    document.getElementById("stats").append(el("div", { className: "stat", id: `stat-${id}` }, [el("b", { textContent: "–" }), el("small", { textContent: caption })]));
  }

  function render() {
    if (!scrapes.length) return;
    const view = windowView();
    for (const chart of CHARTS) {
      const series = chart.series(view).map((s) => ({
        ...s,
        color: (chart.colors && chart.colors[s.colorKey]) || PALETTE[pick(chart.colorOf, s.colorKey, PALETTE.length)],
        dash: s.dashKey === null ? 0 : pick(chart.dashOf, s.dashKey, DASHES.length),
      }));
      if (chart.optional && chart.shown !== series.length > 0) {
        chart.shown = series.length > 0;
        if (chart.shown) document.getElementById("charts").append(chart.section);
        else chart.section.remove();
      }
      if (!chart.shown) continue;
      drawChart(chart, view, series);
      drawLegend(chart, series);
      chart.drawn = series.map((s) => ({
        label: s.label, points: s.values.filter(Number.isFinite).length, last: s.values.findLast(Number.isFinite) ?? null,
      }));
    }
    for (const [id, , value] of STATS) {
      const b = document.querySelector(`#stat-${id} b`), v = value();
      b.textContent = v.toLocaleString("en-US", { maximumFractionDigits: 0 });
      b.dataset.value = String(v);
    }
    const models = [...new Set(Object.values(METRICS).flatMap((name) =>
      [...state.series(name), ...state.series(`${name}_count`)].map((s) => s.labels.model)))].filter((m) => m);
    const loaded = new Map(state.series(METRICS.modelLoaded).map((s) => [s.labels.model, s.value > 0]));
    document.getElementById("models").replaceChildren(...models.map((m) => el("span", {
      className: "chip" + (loaded.get(m) === false ? " unloaded" : ""), textContent: m,
      title: loaded.get(m) === false ? "not loaded" : "loaded" })));
    state.renders++;
  }

  function recordError(message) {
    state.errors.push(message);
    if (state.errors.length > 100) state.errors.shift();
  }

  function showStatus(error) {
    const banner = document.getElementById("banner"), updated = document.getElementById("updated");
    banner.hidden = !error;
    banner.textContent = error ? `Cannot read /metrics: ${error} (${fmtClock(Date.now() / 1000)}). ` +
      `The charts keep the data they have; retrying every ${fmtNumber(INTERVAL_MS / 1000)} s.` : "";
    updated.className = error ? "stale" : "live";
    if (state.lastUpdated !== null) {
      updated.textContent = `updated ${fmtClock(state.lastUpdated / 1000)} · ${state.samples} scrapes, every ${fmtNumber(INTERVAL_MS / 1000)} s`;
    }
  }

  async function poll() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), Math.max(5000, 2 * INTERVAL_MS));
    let error = null;
    try {
      const response = await fetch("/metrics", { cache: "no-store", signal: controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status} ${response.statusText}`.trim());
      addScrape(Date.now() / 1000, parseExposition(await response.text()));
      state.samples++;
      state.lastUpdated = Date.now();
    } catch (err) {
      error = err.name === "AbortError" ? "no answer in time" : err.message;
      recordError(`scrape: ${error}`);
    } finally {
      clearTimeout(timer);
    }
    showStatus(error);
    try {
      render();
    } catch (err) {
      recordError(`drawing: ${err.message}`);
      console.error(err);
    }
    setTimeout(poll, INTERVAL_MS);
  }

  window.addEventListener("resize", () => { try { render(); } catch (err) { recordError(`drawing: ${err.message}`); } });
  poll();
})();
