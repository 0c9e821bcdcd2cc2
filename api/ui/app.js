/* The nstudent dashboard: generations (list, lineage, accuracy chart), one generation, one dataset.
 *
 * Contract: every request goes to this server's REST API with the token from sessionStorage as a bearer
 * header (credentials "omit": no cookie is ever sent or set), and shows exactly what the API returns for that
 * token. API text reaches the page only through textContent (never innerHTML): URIs and error messages are
 * data, not markup. Numbers shown carry their API value in a data-value attribute. Pages of running
 * generations refresh every REFRESH_MS.
 */
"use strict";

const TOKEN_KEY = "nstudent.token";
const REFRESH_MS = 2000;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const STAGE_TITLES = {queued: "queued", training_teacher: "teacher", labeling: "labeling", curating: "curating",
                      training: "training", evaluating: "evaluating"};
const COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d"];
const CLASS_BARS = [["predicted", "predicted"], ["above_floor", "above the floor"], ["kept", "kept"],
                    ["copies", "copies"]];
const MANIFEST_PAGE = 50;
const HISTOGRAMS_PAGE = 24;

let refreshTimer = null;
let routeVersion = 0;  // a page rendered for an older route never touches the DOM
const objectUrls = [];

class AuthError extends Error {}
// The server did not answer, or answered 502, 503 or 504 (a restart, an upgrade, a database failover): the page
// keeps what it shows and asks again at the next refresh.
class Unreachable extends Error {}
const TRANSIENT = new Set([502, 503, 504]);

/* ---- small helpers ---------------------------------------------------------------------------------- */

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function put(el, ...children) {
  // replaceChildren, skipping the null, undefined and false that conditional parts give
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

const fmtInt = (n) => (n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"));
const fmtPct = (x) => (x === null || x === undefined ? "-" : (100 * x).toFixed(2) + "%");
const fmtSec = (s) => (s === null || s === undefined ? "-" : s < 100 ? s.toFixed(1) + " s" : Math.round(s) + " s");

function num(value, text, field) {
  return h("td", {class: "num", "data-field": field, "data-value": value === null || value === undefined ? "" : value},
           text);
}

function badge(stage) {
  const kind = FINISHED.has(stage) ? stage : stage === "queued" ? "" : "running";
  return h("span", {class: "badge " + kind, "data-field": "stage"}, stage);
}

function progressFraction(g) {
  const p = g.progress || {};
  if (p.steps) return (p.step || 0) / p.steps;
  if (p.total) return (p.done || 0) / p.total;
  return null;
}

function progressText(g) {
  const p = g.progress || {};
  const parts = [];
  if (p.steps) {
    parts.push(`step ${fmtInt(p.step || 0)} / ${fmtInt(p.steps)}`);
    if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${p.loss.toFixed(3)}`);
    if (p.images_per_second) parts.push(`${Math.round(p.images_per_second).toLocaleString("en-US")} img/s`);
  } else if (p.total) {
    parts.push(`${fmtInt(p.done || 0)} / ${fmtInt(p.total)} images`);
  }
  return parts.join(" · ");
}

function progressBar(g) {
  if (FINISHED.has(g.stage)) return null;
  const f = progressFraction(g);
  const bar = h("div", {class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                        "aria-valuenow": f === null ? null : Math.round(100 * f)}, h("div", {class: "fill"}));
  bar.firstChild.style.width = f === null ? "0%" : `${(100 * f).toFixed(1)}%`;
  return h("div", {class: "progress", "data-field": "progress"},
           h("span", {class: "muted"}, STAGE_TITLES[g.stage] || g.stage), bar,
           h("span", {class: "text"}, progressText(g)));
}

function totalSeconds(g) {
  let sum = 0, any = false;
  for (const t of Object.values(g.timings || {})) {
    if (t.seconds !== null && t.seconds !== undefined) { sum += t.seconds; any = true; }
  }
  return any ? sum : null;
}

function accuracyMetrics(g) {
  return Object.keys(g.metrics || {}).filter((k) => k.endsWith("accuracy")).sort();
}

function setStatus(text) { document.getElementById("status").textContent = text; }

/* ---- the API ---------------------------------------------------------------------------------------- */

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  let response;
  try {
    response = await fetch(path, {headers: {Authorization: `Bearer ${token}`, Accept: "application/json"},
                                  credentials: "omit", cache: "no-store"});
  } catch (e) {
    throw new Unreachable("the server does not answer");
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new AuthError("The server refused that token: give another one.");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON: keep the status text */ }
    throw new (TRANSIENT.has(response.status) ? Unreachable : Error)(`${response.status}: ${detail}`);
  }
  return parseJson(await response.text());
}

function parseJson(text) {
  // image_id is a 64-bit integer: past 2^53 a JS number would round it, so it is kept as its source text
  // (JSON.parse's source access); a browser without it gets the rounded number, as text.
  return JSON.parse(text, (key, value, context) =>
    key === "image_id" ? (context && context.source !== undefined ? context.source : String(value)) : value);
}

async function imageUrl(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, {headers: {Authorization: `Bearer ${token}`}, credentials: "omit"});
  if (!response.ok) throw new Error(`${response.status}`);
  const url = URL.createObjectURL(await response.blob());
  objectUrls.push(url);
  return url;
}

/* ---- charts (uPlot) --------------------------------------------------------------------------------- */

function chartWidth(el, fallback) { return Math.max(200, Math.floor(el.clientWidth || fallback)); }

function accuracyChart(el, generations) {
  // x: a generation's depth in its lineage (0 = taught by no visible generation); one line per chain.
  const byId = new Map(generations.map((g) => [g.id, g]));
  const depth = (g) => {
    let d = 0, p = g.parent_id;
    while (p && byId.has(p) && d < 1000) { d += 1; p = byId.get(p).parent_id; }
    return d;
  };
  const done = generations.filter((g) => g.stage === "succeeded" && accuracyMetrics(g).length);
  if (!done.length) {
    el.append(h("p", {class: "muted"}, "No generation has finished yet."));
    return;
  }
  const metrics = [...new Set(done.flatMap(accuracyMetrics))].sort();
  const chains = [...new Set(done.map((g) => g.chain_id))];
  const xs = [...new Set(done.map(depth))].sort((a, b) => a - b);
  const series = [{label: "generation"}];
  const data = [xs];
  let colour = 0;
  for (const chain of chains) {
    for (const metric of metrics) {
      const ys = xs.map(() => null);
      for (const g of done.filter((g) => g.chain_id === chain && metric in g.metrics)) {
        ys[xs.indexOf(depth(g))] = g.metrics[metric];
      }
      if (ys.every((y) => y === null)) continue;
      const c = COLORS[colour++ % COLORS.length];
      series.push({label: `${chain} ${metric}`, stroke: c, width: 2, spanGaps: true,
                   points: {show: true, size: 7, fill: c}, value: (u, v) => fmtPct(v)});
      data.push(ys);
    }
  }
  el.setAttribute("data-points", String(done.length));
  new uPlot({
    width: chartWidth(el, 800), height: 260,
    scales: {x: {time: false, range: [xs[0] - 0.5, xs[xs.length - 1] + 0.5]}, y: {auto: true}},
    axes: [{label: "generation (depth in its lineage)", incrs: [1], values: (u, vals) => vals.map((v) => String(v))},
           {label: "accuracy", size: 60, values: (u, vals) => vals.map((v) => (100 * v).toFixed(1) + "%")}],
    series,
  }, data, el);
}

function histogramChart(el, counts, marks, width, height) {
  // counts: bins of 0.01 from 0.00 (the 101st holds 1.00 alone); marks: [{x, colour, dash}] drawn as vertical
  // lines (threshold, floor).
  const xs = counts.map((_, i) => i / 100);
  new uPlot({
    width, height, legend: {show: false}, cursor: {show: false},
    scales: {x: {time: false, range: [0, 1.01]}, y: {range: (u, min, max) => [0, Math.max(1, max)]}},
    axes: [{size: 28, incrs: [0.1, 0.2, 0.5], values: (u, vals) => vals.map((v) => v.toFixed(1))},
           {size: 44, values: (u, vals) => vals.map((v) => (v >= 1000 ? (v / 1000).toFixed(1) + "k" : String(v)))}],
    series: [{}, {fill: "#4c78a8cc", stroke: "#4c78a8", width: 0, points: {show: false},
                  paths: uPlot.paths.bars({size: [1, Infinity], align: 1})}],
    hooks: {draw: [(u) => {
      const ctx = u.ctx;
      for (const m of marks) {
        const x = u.valToPos(m.x, "x", true);
        ctx.save();
        ctx.strokeStyle = m.colour;
        ctx.lineWidth = 2 * (window.devicePixelRatio || 1);
        ctx.setLineDash(m.dash ? [6, 4] : []);
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
        ctx.restore();
      }
    }]},
  }, [xs, counts], el);
}

/* ---- pages ------------------------------------------------------------------------------------------ */

function lineage(generations) {
  const ids = new Set(generations.map((g) => g.id));
  const children = new Map();
  const roots = [];
  for (const g of [...generations].sort((a, b) => a.created_at.localeCompare(b.created_at))) {
    if (g.parent_id && ids.has(g.parent_id)) {
      if (!children.has(g.parent_id)) children.set(g.parent_id, []);
      children.get(g.parent_id).push(g);
    } else {
      roots.push(g);
    }
  }
  const node = (g) => h("li", {"data-generation": g.id},
    h("span", {class: "node"},
      h("a", {href: `#/generations/${g.id}`, class: "mono"}, g.id), badge(g.stage),
      g.metrics && g.metrics.test_accuracy !== undefined
        ? h("span", {"data-field": "test_accuracy", "data-value": g.metrics.test_accuracy}, fmtPct(g.metrics.test_accuracy))
        : null,
      progressBar(g)),
    children.has(g.id) ? h("ul", {class: "tree"}, children.get(g.id).map(node)) : null);
  return h("ul", {class: "tree root", id: "lineage"}, roots.map(node));
}

async function pageGenerations(main, version) {
  const page = await api("/generations?limit=200");
  if (version !== routeVersion) return false;
  const gens = page.data;
  const chart = h("div", {class: "chart", id: "accuracy-chart"});
  const rows = gens.map((g) => h("tr", {"data-generation": g.id},
    h("td", {}, h("a", {href: `#/generations/${g.id}`, class: "mono"}, g.id)),
    h("td", {}, badge(g.stage)),
    h("td", {}, progressBar(g) || h("span", {class: "muted"}, g.error ? g.error.slice(0, 80) : "")),
    num(totalSeconds(g), fmtSec(totalSeconds(g)), "seconds"),
    num(g.metrics.test_accuracy, fmtPct(g.metrics.test_accuracy), "test_accuracy"),
    h("td", {class: "muted"}, g.created_at.slice(0, 19).replace("T", " "))));
  put(main,
    h("h1", {}, "Generations ", h("span", {class: "muted", id: "generation-count", "data-value": page.count},
                                    `(${fmtInt(page.count)})`)),
    h("section", {}, h("h2", {}, "Accuracy across generations"), chart),
    h("section", {}, h("h2", {}, "Lineage"),
      gens.length ? lineage(gens) : h("p", {class: "muted"}, "No generation yet: start one with POST /generations.")),
    h("section", {}, h("h2", {}, "All generations"),
      h("table", {id: "generations"},
        h("thead", {}, h("tr", {}, h("th", {}, "id"), h("th", {}, "stage"), h("th", {}, "progress"),
                                  h("th", {class: "num"}, "time"), h("th", {class: "num"}, "test accuracy"),
                                  h("th", {}, "created (UTC)"))),
        h("tbody", {}, rows)),
      page.count > gens.length ? h("p", {class: "muted"}, `The newest ${gens.length} of ${page.count}.`) : null));
  accuracyChart(chart, gens);
  return gens.some((g) => !FINISHED.has(g.stage));
}

async function pageGeneration(main, version, id) {
  const g = await api(`/generations/${encodeURIComponent(id)}`);
  if (version !== routeVersion) return false;
  const timings = Object.entries(g.timings || {}).sort((a, b) => a[1].started.localeCompare(b[1].started));
  const jobs = Object.entries(g.jobs || {}).flatMap(([kind, attempts]) => attempts.map((a) => [kind, a]));
  const kv = [["chain", `${g.chain_id} #${g.chain_index}`], ["output", g.output], ["teacher", g.teacher_uri || "-"],
              ["model", g.model_uri || "-"], ["retries", String(g.retries)]];
  put(main,
    h("h1", {}, h("span", {class: "mono", id: "generation-id"}, g.id), " ", badge(g.stage),
      g.cancel_requested && !FINISHED.has(g.stage) ? h("span", {class: "muted"}, " cancel requested") : null),
    g.error ? h("div", {class: "box-error", id: "generation-error"}, g.error) : null,
    progressBar(g) ? h("section", {}, h("h2", {}, "Progress"), progressBar(g)) : null,
    h("section", {}, h("h2", {}, "Lineage and artifacts"),
      h("dl", {class: "kv"},
        h("dt", {}, "parent"),
        h("dd", {}, g.parent_id ? h("a", {href: `#/generations/${g.parent_id}`, class: "mono"}, g.parent_id) : "-"),
        h("dt", {}, "dataset"),
        h("dd", {}, g.dataset_id
          ? h("a", {href: `#/datasets/${g.dataset_id}`, class: "mono", id: "dataset-link"}, g.dataset_id) : "-"),
        kv.map(([k, v]) => [h("dt", {}, k), h("dd", {class: "mono"}, v)]))),
    h("section", {}, h("h2", {}, "Timings"),
      h("table", {id: "timings"}, h("thead", {}, h("tr", {}, h("th", {}, "stage"), h("th", {}, "started (UTC)"),
                                                          h("th", {class: "num"}, "seconds"))),
        h("tbody", {}, timings.map(([stage, t]) => h("tr", {"data-stage": stage},
          h("td", {}, stage), h("td", {class: "muted"}, t.started.slice(0, 19).replace("T", " ")),
          num(t.seconds, t.seconds === null || t.seconds === undefined ? "running" : fmtSec(t.seconds), "seconds")))))),
    h("section", {}, h("h2", {}, "Metrics"),
      Object.keys(g.metrics || {}).length
        ? h("table", {id: "metrics"}, h("tbody", {}, Object.entries(g.metrics).sort().map(([k, v]) =>
            h("tr", {"data-metric": k}, h("td", {}, k),
              num(v, k.endsWith("accuracy") ? fmtPct(v)
                : Number(v).toLocaleString("en-US", {maximumFractionDigits: 2}), "value")))))
        : h("p", {class: "muted"}, "None yet: the student's evaluation shows here when it finishes.")),
    h("section", {}, h("h2", {}, "Ray jobs"),
      h("table", {id: "jobs"},
        h("thead", {}, h("tr", {}, ["job", "submission id", "status", "cause", "message"].map((t) => h("th", {}, t)))),
        h("tbody", {}, jobs.map(([kind, a]) => h("tr", {"data-attempt": a.id},
          h("td", {}, kind), h("td", {class: "mono"}, a.id), h("td", {"data-field": "status"}, a.status),
          h("td", {}, a.cause || ""), h("td", {class: "muted"}, a.message || "")))))));
  return !FINISHED.has(g.stage);
}

function classBars(d) {
  const max = Math.max(1, ...d.classes.flatMap((c) => CLASS_BARS.map(([k]) => c[k])));
  const legend = h("div", {class: "legend"}, CLASS_BARS.map(([k, title]) =>
    h("span", {}, h("span", {class: `swatch ${k}`}), title)));
  const rows = d.classes.map((c) => h("tr", {"data-class": c.class_index},
    h("td", {}, c.class_name),
    h("td", {class: "bars"}, CLASS_BARS.map(([k]) => {
      const fill = h("div", {class: `fill ${k}`});
      fill.style.width = `${(100 * c[k] / max).toFixed(2)}%`;
      return h("div", {class: "classbar", title: `${k}: ${c[k]}`}, h("div", {class: "bar"}, fill));
    })),
    num(c.predicted, fmtInt(c.predicted), "predicted"), num(c.above_floor, fmtInt(c.above_floor), "above_floor"),
    num(c.threshold, c.threshold.toFixed(2), "threshold"), num(c.kept, fmtInt(c.kept), "kept"),
    num(c.copies, fmtInt(c.copies), "copies")));
  return [legend, h("table", {class: "classbars", id: "classes"},
    h("thead", {}, h("tr", {}, h("th", {}, "class"), h("th", {}, ""), h("th", {class: "num"}, "predicted"),
                              h("th", {class: "num"}, "above floor"), h("th", {class: "num"}, "threshold"),
                              h("th", {class: "num"}, "kept"), h("th", {class: "num"}, "copies"))),
    h("tbody", {}, rows))];
}

function histograms(container, d, start) {
  const floor = d.config.confidence_floor;
  const classes = d.classes.filter((c) => c.confidence_histogram && c.confidence_histogram.length);
  const shown = classes.slice(start, start + HISTOGRAMS_PAGE);
  const grid = h("div", {class: "grid"});
  const pager = classes.length > HISTOGRAMS_PAGE ? h("div", {class: "pager"},
    h("button", {type: "button", disabled: start === 0,
                 onclick: () => histograms(container, d, Math.max(0, start - HISTOGRAMS_PAGE))}, "previous"),
    h("span", {}, `classes ${start + 1}-${start + shown.length} of ${classes.length}`),
    h("button", {type: "button", disabled: start + HISTOGRAMS_PAGE >= classes.length,
                 onclick: () => histograms(container, d, start + HISTOGRAMS_PAGE)}, "next")) : null;
  put(container,
    h("div", {class: "legend"}, h("span", {}, h("span", {class: "swatch threshold"}), "threshold"),
      h("span", {}, h("span", {class: "swatch floor"}), "confidence floor (dashed)")),
    pager, grid);
  if (!classes.length) {
    grid.append(h("p", {class: "muted"}, "These statistics hold no per-class histogram (written by an older version)."));
    return;
  }
  for (const c of shown) {
    const el = h("div", {class: "histogram chart", "data-class": c.class_index, "data-threshold": c.threshold});
    grid.append(h("div", {}, h("h3", {}, `${c.class_name}: threshold ${c.threshold.toFixed(2)}`), el));
    histogramChart(el, c.confidence_histogram, [{x: floor, colour: "#888", dash: true}, {x: c.threshold, colour: "#d62728"}],
                   chartWidth(el, 250), 150);
  }
}

async function samples(container, d, version) {
  const byClass = await api(`/datasets/${d.dataset_id}/samples?per_class=8`);
  if (version !== routeVersion) return;
  const names = new Map(d.classes.map((c) => [String(c.class_index), c.class_name]));
  const rows = Object.entries(byClass).map(([c, rows]) => h("div", {class: "row", "data-class": c},
    h("div", {class: "label"}, names.get(c) || c),
    rows.map((r) => h("figure", {"data-image-id": r.image_id},
      h("img", {class: "thumb", alt: `${names.get(c) || c}, confidence ${r.confidence.toFixed(3)}`, title: r.uri}),
      h("figcaption", {"data-field": "confidence", "data-value": r.confidence}, r.confidence.toFixed(3))))));
  put(container, ...(rows.length ? rows : [h("p", {class: "muted"}, "No kept image.")]));
  // Thumbnails need the bearer header, so they are fetched, not linked; a few at a time.
  const figures = [...container.querySelectorAll("figure")];
  const load = async () => {
    while (figures.length && version === routeVersion) {
      const fig = figures.shift();
      try {
        fig.querySelector("img").src = await imageUrl(`/datasets/${d.dataset_id}/images/${fig.dataset.imageId}/thumbnail`);
      } catch (e) {
        fig.querySelector("figcaption").textContent = "unreadable";
      }
    }
  };
  await Promise.all([load(), load(), load(), load()]);
}

async function manifestPage(container, d, offset, version) {
  const page = await api(`/datasets/${d.dataset_id}/manifest?offset=${offset}&limit=${MANIFEST_PAGE}`);
  if (version !== routeVersion) return;
  const names = new Map(d.classes.map((c) => [c.class_index, c.class_name]));
  const last = offset + page.data.length;
  put(container,
    h("div", {class: "pager"},
      h("button", {type: "button", id: "manifest-previous", disabled: offset === 0,
                   onclick: () => manifestPage(container, d, Math.max(0, offset - MANIFEST_PAGE), version)}, "previous"),
      h("span", {id: "manifest-range", "data-offset": offset, "data-count": page.count},
        `rows ${fmtInt(page.data.length ? offset + 1 : 0)}-${fmtInt(last)} of ${fmtInt(page.count)}`),
      h("button", {type: "button", id: "manifest-next", disabled: last >= page.count,
                   onclick: () => manifestPage(container, d, offset + MANIFEST_PAGE, version)}, "next")),
    h("table", {id: "manifest"},
      h("thead", {}, h("tr", {}, h("th", {class: "num"}, "image_id"), h("th", {}, "label"),
                                h("th", {class: "num"}, "confidence"), h("th", {class: "num"}, "copies"), h("th", {}, "uri"))),
      h("tbody", {}, page.data.map((r) => h("tr", {"data-image-id": r.image_id},
        h("td", {class: "num mono"}, String(r.image_id)),
        h("td", {"data-field": "label", "data-value": r.label}, names.get(r.label) ?? String(r.label)),
        num(r.confidence, r.confidence.toFixed(3), "confidence"), num(r.copies, String(r.copies), "copies"),
        h("td", {class: "mono muted"}, r.uri))))));
}

async function pageDataset(main, version, id) {
  const d = await api(`/datasets/${encodeURIComponent(id)}`);
  if (version !== routeVersion) return false;
  const rejected = Object.entries(d.rejected).sort((a, b) => b[1] - a[1]);
  const totalRejected = rejected.reduce((s, [, n]) => s + n, 0);
  const summary = [["images_seen", "images seen", d.images_seen], ["images_decoded", "decoded", d.images_decoded],
                   ["rejected", "rejected", totalRejected], ["images_per_class", "K (images per class)", d.images_per_class],
                   ["manifest_rows", "manifest rows (kept images)", d.manifest_rows],
                   ["manifest_copies", "rows with copies", d.manifest_copies]];
  const overall = h("div", {class: "chart", id: "overall-histogram"});
  const perClass = h("div", {id: "histograms"});
  const sampleGrid = h("div", {class: "samples", id: "samples"}, h("p", {class: "muted"}, "loading..."));
  const manifest = h("div", {id: "manifest-browser"});
  put(main,
    h("h1", {}, "Dataset ", h("span", {class: "mono", id: "dataset-id"}, d.dataset_id)),
    h("p", {}, "Curated from the predictions of generation ",
      h("a", {href: `#/generations/${d.generation_id}`, class: "mono"}, d.generation_id),
      `; confidence floor ${d.config.confidence_floor}, balance ${d.config.balance ? "on" : "off"}, ` +
      `upsample ${d.config.upsample ? "on" : "off"}.`),
    h("section", {}, h("h2", {}, "Summary"),
      h("table", {id: "summary"}, h("tbody", {}, summary.map(([k, title, v]) =>
        h("tr", {"data-summary": k}, h("td", {}, title), num(v, fmtInt(v), k))))),
      h("p", {class: "muted mono"}, `manifest ${d.manifest_uri} · checksum ${d.manifest_checksum}`)),
    h("section", {}, h("h2", {}, "Per class: predicted, above the floor, kept, copies"), classBars(d)),
    h("section", {}, h("h2", {}, "Rejected images by reason"),
      rejected.length
        ? h("table", {id: "rejects"}, h("tbody", {}, rejected.map(([reason, n]) =>
            h("tr", {"data-reason": reason}, h("td", {}, reason), num(n, fmtInt(n), "count")))))
        : h("p", {id: "rejects", class: "muted", "data-value": 0}, "None: every image decoded.")),
    h("section", {}, h("h2", {}, "Confidence, all predictions"), overall),
    h("section", {}, h("h2", {}, "Confidence per class, with its threshold"), perClass),
    h("section", {}, h("h2", {}, "Sample kept images"), sampleGrid),
    h("section", {}, h("h2", {}, "Manifest"), manifest));
  histogramChart(overall, d.confidence_histogram, [{x: d.config.confidence_floor, colour: "#888", dash: true}],
                 chartWidth(overall, 800), 200);
  histograms(perClass, d, 0);
  await Promise.all([manifestPage(manifest, d, 0, version), samples(sampleGrid, d, version)]);
  return false;
}

/* ---- routing, token, refresh ------------------------------------------------------------------------ */

function showTokenForm(message) {
  document.getElementById("main").replaceChildren();
  document.getElementById("forget").hidden = true;
  const form = document.getElementById("token-form");
  if (message) document.getElementById("token-message").textContent = message;
  form.hidden = false;
  document.getElementById("token").focus();
  setStatus("");
}

async function route() {
  clearTimeout(refreshTimer);
  const version = ++routeVersion;
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  if (!sessionStorage.getItem(TOKEN_KEY)) { showTokenForm(); return; }
  document.getElementById("token-form").hidden = true;
  document.getElementById("forget").hidden = false;
  const main = document.getElementById("main");
  const [, kind, id] = (location.hash.replace(/^#/, "").match(/^\/(generations|datasets)\/([\w-]+)/) || []);
  const render = kind === "generations" ? () => pageGeneration(main, version, id)
    : kind === "datasets" ? () => pageDataset(main, version, id) : () => pageGenerations(main, version);
  const tick = async () => {
    try {
      const again = await render();
      if (version !== routeVersion) return;
      setStatus(again ? `refreshing every ${REFRESH_MS / 1000} s · ${new Date().toLocaleTimeString()}` : "");
      document.body.dataset.loaded = String(version);
      if (again) refreshTimer = setTimeout(tick, REFRESH_MS);
    } catch (e) {
      if (version !== routeVersion) return;
      if (e instanceof AuthError) { showTokenForm(e.message); return; }
      if (e instanceof Unreachable) {
        setStatus(`${e.message} · asking again every ${REFRESH_MS / 1000} s · ${new Date().toLocaleTimeString()}`);
        document.body.dataset.loaded = String(version);
        refreshTimer = setTimeout(tick, REFRESH_MS);
        return;
      }
      put(main, h("div", {class: "box-error", id: "page-error"}, e.message));
      document.body.dataset.loaded = String(version);
    }
  };
  await tick();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    document.getElementById("token").value = "";
    route();
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    route();
  });
  window.addEventListener("hashchange", route);
  route();
});
