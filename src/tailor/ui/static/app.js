// tailor ui: one page, four views, all data from this server's own API (/api/*, /v1/*). No libraries:
// tables are built from the DOM, charts are inline SVG drawn here.
"use strict";

const COLORS = ["#2f5fd0", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#e67700", "#5c940d"];
const $ = (selector) => document.querySelector(selector);

// --- small helpers -----------------------------------------------------------------------------------
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// digits: a fixed number of decimals for every number (a metric); without, integers print as integers
function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") {
    if (digits !== undefined) return value.toFixed(digits);
    return Number.isInteger(value) ? value.toLocaleString("en") : +value.toPrecision(6) + "";
  }
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("#key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class APIError extends Error {}

// GET or POST a JSON endpoint; an error answer becomes an APIError carrying the server's message.
async function api(path, body) {
  const response = await fetch(path, body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new APIError(errorText(response.status, data));
  return data;
}

function errorText(status, data) {
  const error = data && data.error;
  return error ? `${status} ${error.type || "error"}: ${error.message}` : `${status}: the server gave no details`;
}

function showError(node, error) {
  node.hidden = false;
  node.className = "error";
  node.textContent = error instanceof APIError ? error.message : `${error}`;
}

function table(head, rows, className = "grid") {
  return el("table", { class: className },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
}

// --- SVG charts --------------------------------------------------------------------------------------
function ticks(lo, hi, n = 5) {
  if (hi === lo) { hi = lo + 1; }
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => (hi - lo) / s <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(+v.toPrecision(12));
  return out;
}

// Axes, grid and labels for a plot of [x0, x1] x [y0, y1]; returns the SVG text and the scales.
function frame(box, xlabel, ylabel) {
  const W = 520, H = 280, L = 60, R = 20, T = 16, B = 44;
  const [x0, x1, y0, y1] = box;
  const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (H - T - B);
  let svg = "";
  for (const t of ticks(y0, y1)) {
    svg += `<line class="gridline" x1="${L}" x2="${W - R}" y1="${sy(t)}" y2="${sy(t)}"/>`;
    svg += `<text x="${L - 6}" y="${sy(t) + 4}" text-anchor="end">${esc(+t.toPrecision(4))}</text>`;
  }
  for (const t of ticks(x0, x1)) svg += `<text x="${sx(t)}" y="${H - B + 16}" text-anchor="middle">${esc(+t.toPrecision(4))}</text>`;
  svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/><line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`;
  svg += `<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">${esc(xlabel)}</text>`;
  svg += `<text transform="translate(14 ${(T + H - B) / 2}) rotate(-90)" text-anchor="middle">${esc(ylabel)}</text>`;
  return { W, H, sx, sy, svg };
}

function bounds(values, pad = 0.05) {
  let lo = Math.min(...values), hi = Math.max(...values);
  const margin = (hi - lo) * pad || Math.abs(hi) * pad || 1;
  return [lo - margin, hi + margin];
}

function svgNode(text, width, height, label) {
  const wrap = el("div", { class: "chart" });
  wrap.innerHTML = `<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="${esc(label)}" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">${text}</svg>`;
  return wrap;
}

// series: [{label, points: [[x, y], ...]}]
function lineChart(series, xlabel, ylabel, label) {
  const all = series.flatMap((s) => s.points);
  if (!all.length) return el("p", { class: "hint", text: `no points for ${label}` });
  const [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  const [y0, y1] = bounds(all.map((p) => p[1]));
  const f = frame([x0, x1, y0, y1], xlabel, ylabel);
  let svg = f.svg;
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const path = s.points.map((p) => `${f.sx(p[0]).toFixed(1)},${f.sy(p[1]).toFixed(1)}`).join(" ");
    svg += `<polyline class="series" data-label="${esc(s.label)}" data-points="${s.points.length}" fill="none" stroke="${color}" stroke-width="1.6" points="${path}"/>`;
    if (s.points.length < 40) for (const p of s.points) svg += `<circle cx="${f.sx(p[0])}" cy="${f.sy(p[1])}" r="2.5" fill="${color}"/>`;
    svg += `<rect x="${f.W - 170}" y="${18 + i * 16}" width="10" height="10" fill="${color}"/><text x="${f.W - 155}" y="${27 + i * 16}">${esc(s.label)}</text>`;
  });
  return svgNode(svg, f.W, f.H, label);
}

// points: [{label, x, y}]
function scatterChart(points, xlabel, ylabel, label) {
  if (!points.length) return el("p", { class: "hint", text: `nothing to plot for ${label} (no evaluated runs)` });
  const [x0, x1] = bounds(points.map((p) => p.x), 0.15);
  const [y0, y1] = bounds(points.map((p) => p.y), 0.15);
  const f = frame([x0, x1, y0, y1], xlabel, ylabel);
  let svg = f.svg;
  points.forEach((p, i) => {
    svg += `<circle class="point" data-label="${esc(p.label)}" data-x="${p.x}" data-y="${p.y}" cx="${f.sx(p.x)}" cy="${f.sy(p.y)}" r="5" fill="${COLORS[i % COLORS.length]}"/>`;
    svg += `<text x="${f.sx(p.x) + 8}" y="${f.sy(p.y) - 6}">${esc(p.label)}</text>`;
  });
  return svgNode(svg, f.W, f.H, label);
}

// parts: [{key, label, value}], drawn as one horizontal bar of `total` with a legend below
function stackedBar(parts, total, unit, label) {
  const W = 640, H = 60 + 18 * Math.ceil(parts.length / 2), L = 10, barW = W - 20;
  let x = L, svg = "";
  parts.forEach((p, i) => {
    const w = total > 0 ? (p.value / total) * barW : 0;
    const color = COLORS[i % COLORS.length];
    svg += `<rect class="part" data-part="${esc(p.key)}" data-value="${p.value}" x="${x.toFixed(2)}" y="8" width="${w.toFixed(2)}" height="26" fill="${color}"><title>${esc(p.label)}: ${p.value.toFixed(3)} ${unit}</title></rect>`;
    x += w;
    const lx = L + (i % 2) * (W / 2), ly = 52 + Math.floor(i / 2) * 18;
    svg += `<rect x="${lx}" y="${ly - 9}" width="10" height="10" fill="${color}"/><text x="${lx + 15}" y="${ly}">${esc(p.label)}: ${p.value.toFixed(3)} ${unit}</text>`;
  });
  return svgNode(svg, W, H, label);
}

// --- pages -------------------------------------------------------------------------------------------
const pages = { runs: loadRuns, adapters: loadAdapters, playground: loadPlayground, planner: loadPlanner };
const loaded = new Set();

function route() {
  const name = (location.hash || "#runs").slice(1);
  const page = pages[name] ? name : "runs";
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== page;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === page);
  if (!loaded.has(page)) { loaded.add(page); pages[page](); }
}

// Runs ------------------------------------------------------------------------------------------------
async function loadRuns() {
  const body = $("#runs-table tbody");
  body.replaceChildren();
  let data;
  try { data = await api("/api/runs"); } catch (error) { loaded.delete("runs"); return showError($("#runs-error"), error); }
  $("#runs-error").hidden = true;
  for (const run of data.runs) {
    const box = el("input", { type: "checkbox", value: run.name, "aria-label": `select ${run.name}`, onchange: updateCompareButton });
    const link = el("a", { href: "#runs", text: run.name, onclick: (e) => { e.preventDefault(); showRun(run.name); } });
    body.append(el("tr", { "data-run": run.name }, el("td", {}, box), el("td", { class: "text" }, link),
      el("td", { class: "text", text: fmt(run.method) }), el("td", { class: "text", text: fmt(run.model) }),
      el("td", { text: fmt(run.steps) }), el("td", { text: fmt(run.final_train_loss, 4) }),
      el("td", { text: fmt(run.final_val_loss, 4) }), el("td", { text: fmt(run.quality, 3) })));
  }
  if (!data.runs.length) body.append(el("tr", {}, el("td", { colspan: 8, text: `no runs under ${data.root}` })));
}

function selectedRuns() {
  return [...document.querySelectorAll("#runs-table tbody input:checked")].map((box) => box.value);
}

function updateCompareButton() { $("#compare-button").disabled = selectedRuns().length < 2; }

async function showRun(name) {
  const out = $("#run-detail");
  out.replaceChildren(el("p", { class: "hint", text: "loading…" }));
  let run;
  try { run = await api("/api/runs/" + name.split("/").map(encodeURIComponent).join("/")); } catch (error) {
    return showError(out, error);
  }
  const config = table(["setting", "value"], Object.entries(run.config).map(([k, v]) => [k, fmt(v)]));
  const train = run.points.filter((p) => p.loss !== null && p.loss !== undefined).map((p) => [p.step, p.loss]);
  const val = run.points.filter((p) => p.val_loss !== null && p.val_loss !== undefined).map((p) => [p.step, p.val_loss]);
  const chart = lineChart([{ label: "train loss", points: train }, { label: "val loss", points: val }],
    "optimizer step", "loss", "loss curve");
  chart.id = "loss-curve";
  out.replaceChildren(el("h2", { text: `Run ${name}` }),
    ...run.problems.map((p) => el("div", { class: "error", text: p })),
    el("div", { class: "row" }, el("div", {}, el("h3", { text: "Config" }), config),
      el("div", {}, el("h3", { text: "Loss curve" }), chart)),
    el("h3", { text: "Evaluation" }), evalTable(run.eval));
}

function evalTable(evaluation) {
  if (!evaluation) return el("p", { class: "hint", text: "no eval.json: run `tailor eval RUN_DIR --data HELD_OUT.jsonl`" });
  const base = evaluation.base || {}, tuned = evaluation.tuned || {};
  const metrics = [["field_accuracy", "field accuracy"], ["exact_match", "exact match"], ["json_valid", "valid JSON"],
    ["val_loss", "validation loss"], ["retention_accuracy", "retention"]];
  const rows = metrics.filter(([k]) => k in base || k in tuned).map(([k, label]) => {
    const b = base[k], t = tuned[k];
    const delta = typeof b === "number" && typeof t === "number" ? (t - b >= 0 ? "+" : "") + (t - b).toFixed(3) : "–";
    return [label, fmt(b, 3), fmt(t, 3), delta];
  });
  const node = table(["metric", "base", "tuned", "Δ"], rows);
  node.id = "eval-table";
  return node;
}

async function compareRuns() {
  const out = $("#compare");
  const names = selectedRuns();
  out.replaceChildren(el("p", { class: "hint", text: "comparing…" }));
  let result;
  try { result = await api("/api/compare?" + names.map((n) => "run=" + encodeURIComponent(n)).join("&")); } catch (error) {
    return showError(out, error);
  }
  const chosen = result.decision && result.decision.method;
  const head = result.columns.map((c) => c.header);
  const rows = result.methods.map((row) => result.columns.map((c) => cell(row[c.key], c.format)));
  const grid = table(head, rows);
  grid.id = "compare-table";
  [...grid.tBodies[0].rows].forEach((tr, i) => { if (result.methods[i].method === chosen) tr.classList.add("chosen"); });
  const quality = (r) => (r.field_accuracy !== null && r.field_accuracy !== undefined ? r.field_accuracy : r.exact_match);
  const points = result.methods.filter((r) => quality(r) !== null && quality(r) !== undefined)
    .map((r) => ({ label: r.method, x: r.cost_usd, y: quality(r) }));
  const scatter = scatterChart(points, `training cost, USD at $${result.price_per_hour}/hour`, "task quality (held-out)", "quality against cost");
  scatter.id = "quality-cost";
  const curves = Object.entries(result.curves).map(([label, pts]) => ({
    label, points: pts.filter((p) => p.val_loss !== null && p.val_loss !== undefined).map((p) => [p.step, p.val_loss]) }));
  out.replaceChildren(el("h2", { text: `Comparison of ${names.length} runs` }), grid,
    el("p", { id: "decision" }, el("b", { text: "Decision: " }), result.decision ? result.decision.reason : "no run has a task metric (eval.json)"),
    el("div", { class: "row" }, el("div", {}, el("h3", { text: "Quality against cost" }), scatter),
      el("div", {}, el("h3", { text: "Validation loss" }), lineChart(curves, "optimizer step", "validation loss", "validation loss"))));
}

// the comparison report's cell formats (tailor.report.compare.COLUMNS)
function cell(value, format) {
  if (value === null || value === undefined) return "-";
  if (format === "mib") return (value / 2 ** 20).toLocaleString("en", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  if (format === "{:,}") return Number(value).toLocaleString("en");
  const digits = /\{:\.(\d)f\}/.exec(format);
  return digits ? Number(value).toFixed(+digits[1]) : String(value);
}

// Adapters --------------------------------------------------------------------------------------------
async function loadAdapters() {
  const list = $("#adapters-list");
  let data;
  try { data = await api("/api/adapters"); } catch (error) { loaded.delete("adapters"); return showError(list, error); }
  if (data.root === null) {
    return list.replaceChildren(el("p", { class: "hint", text: "No adapter store: start with `tailor ui --adapters DIR`." }));
  }
  if (!data.adapters.length) return list.replaceChildren(el("p", { class: "hint", text: `The store ${data.root} is empty.` }));
  list.replaceChildren(...data.adapters.map(adapterCard));
}

function adapterCard(adapter) {
  const name = adapter.name;
  const tagRows = Object.entries(adapter.tags).map(([tag, entry]) => [
    `${name}@${tag}`, `version ${entry.version}`, entry.history.length ? entry.history.join(" → ") + ` → ${entry.version}` : "–",
    el("button", { class: "small", "data-rollback": `${name}@${tag}`, disabled: entry.history.length ? null : "disabled",
      text: "roll back", onclick: () => changeTag("/api/adapters/rollback", { tag: `${name}@${tag}` }) })]);
  const versionRows = adapter.versions.map((v) => [String(v.version), v.tags.join(", ") || "–", fmt(v.base), fmt(v.rank),
    fmt(v.targets), (v.size_bytes / 1024).toFixed(1) + " KiB", v.metric ? `${v.metric[0]} ${fmt(v.metric[1], 3)}` : "–",
    fmt(v.added), el("pre", { class: "lineage", text: v.lineage.join("\n") })]);
  const tagInput = el("input", { value: "prod", size: 8, "aria-label": `tag of ${name}` });
  const versionSelect = el("select", { "aria-label": `version for ${name}` },
    ...adapter.versions.map((v) => el("option", { value: v.version, text: `version ${v.version}` })));
  const setTag = el("button", { class: "small", text: "set tag", "data-set-tag": name,
    onclick: () => changeTag("/api/adapters/tag", { tag: `${name}@${tagInput.value.trim()}`, version: versionSelect.value }) });
  const tags = table(["tag", "points at", "history", ""], tagRows);
  tags.dataset.tags = name;
  return el("div", { class: "card", "data-adapter": name }, el("h2", { text: name }),
    tagRows.length ? tags : el("p", { class: "hint", text: "no tags yet" }),
    el("p", {}, "Point ", tagInput, " at ", versionSelect, " ", setTag),
    table(["version", "tags", "base", "rank", "targets", "size", "metric", "added", "lineage"], versionRows));
}

async function changeTag(path, body) {
  const message = $("#adapters-message");
  try {
    const result = await api(path, body);
    message.hidden = false;
    message.className = "message";
    message.textContent = `${result.tag} → version ${result.version}` + (result.previous ? ` (was ${result.previous})` : "");
    loadAdapters();
  } catch (error) { showError(message, error); }
}

// Playground ------------------------------------------------------------------------------------------
async function loadPlayground() {
  const box = $("#play-models");
  let data;
  try { data = await api("/v1/models"); } catch (error) { loaded.delete("playground"); return showError(box, error); }
  const models = data.data.map((m) => m.id);
  box.replaceChildren(el("legend", { text: "models" }), ...data.data.map((m, i) => el("label", {},
    el("input", { type: "checkbox", value: m.id, checked: i === 0 ? "checked" : null }),
    ` ${m.id}${m.parent === null ? " (base)" : ""}`)));
  if (!models.length) box.append(el("p", { class: "hint", text: "the server lists no models" }));
}

async function play(event) {
  event.preventDefault();
  const models = [...document.querySelectorAll("#play-models input:checked")].map((b) => b.value);
  const out = $("#play-answers");
  if (!models.length) return showError(out.appendChild(el("div")), "Tick at least one model.");
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const settings = { temperature: number("#play-temperature"), top_p: number("#play-top-p"),
    max_tokens: number("#play-max-tokens"), seed: number("#play-seed") };
  const prompt = $("#play-prompt").value;
  out.replaceChildren();
  await Promise.all(models.map((model) => {
    const text = el("pre", { class: "text" });
    const column = el("div", { class: "answer", "data-model": model }, el("h3", { text: model }), text);
    out.append(column);
    return streamAnswer({ model, messages: [{ role: "user", content: prompt }], stream: true, ...settings }, column, text);
  }));
}

// POST a streamed chat completion and append each delta to `text` as it arrives (server-sent events).
async function streamAnswer(body, column, text) {
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!response.ok) throw new APIError(errorText(response.status, await response.json().catch(() => null)));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (line === "[DONE]") { column.classList.add("done"); return; }
        const chunk = JSON.parse(line);
        if (chunk.error) throw new APIError(errorText(chunk.error.code || "", chunk));
        for (const choice of chunk.choices || []) if (choice.delta && choice.delta.content) text.textContent += choice.delta.content;
      }
    }
  } catch (error) { showError(column.appendChild(el("div")), error); }
}

// Planner ---------------------------------------------------------------------------------------------
const PLAN_LABELS = { model: "model", method: "method", rank: "LoRA rank", lora_alpha: "LoRA alpha",
  target_modules: "target modules", batch_size: "batch size", max_seq_len: "sequence length",
  grad_accum: "gradient accumulation", gradient_checkpointing: "gradient checkpointing", optimizer: "optimizer",
  precision: "precision", device: "trains on", tokens: "training tokens", gpu: "GPU to cost on", mfu: "assumed MFU" };
const MEMORY_PARTS = [["frozen_weights", "frozen weights"], ["adapter_weights", "trained weights"], ["gradients", "gradients"],
  ["optimizer_state", "optimizer state"], ["activations", "activations"], ["overhead", "overhead"]];

async function loadPlanner() {
  const form = $("#plan-form");
  let spec;
  try { spec = await api("/api/plan/form"); } catch (error) { loaded.delete("planner"); return showError($("#plan-error"), error); }
  const choices = { model: spec.models, method: spec.methods, optimizer: spec.optimizers, precision: spec.precisions,
    device: spec.devices };
  form.replaceChildren();
  for (const [name, value] of Object.entries(spec.defaults)) {
    let input;
    if (typeof value === "boolean") input = el("input", { type: "checkbox", name, checked: value ? "checked" : null });
    else if (choices[name] && name !== "model") {
      input = el("select", { name }, ...choices[name].map((c) => el("option", { value: c, text: c, selected: c === value ? "selected" : null })));
    } else {
      input = el("input", { name, value: value === null ? "" : value, type: typeof value === "number" ? "number" : "text",
        step: typeof value === "number" ? "any" : null, list: name === "model" ? "plan-models" : null,
        placeholder: value === null ? "cheapest that fits" : null });
    }
    form.append(el("label", {}, PLAN_LABELS[name] || name, input));
  }
  form.append(el("datalist", { id: "plan-models" }, ...spec.models.map((m) => el("option", { value: m }))));
  form.append(el("button", { type: "submit", id: "plan-run", text: "Plan" }));
  submitPlan();
}

function planInputs() {
  const inputs = {};
  for (const input of $("#plan-form").querySelectorAll("[name]")) {
    if (input.type === "checkbox") inputs[input.name] = input.checked;
    else if (input.value === "") continue;
    else inputs[input.name] = input.type === "number" ? Number(input.value) : input.value;
  }
  return inputs;
}

async function submitPlan(event) {
  if (event) event.preventDefault();
  const out = $("#plan-result");
  let plan;
  try { plan = await api("/api/plan", planInputs()); } catch (error) { out.replaceChildren(); return showError($("#plan-error"), error); }
  $("#plan-error").hidden = true;
  const memory = plan.memory_gib;
  const chosen = plan.chosen_gpu;
  const figure = (id, label, value) => el("div", { class: "figure" }, label, el("b", { id, text: value }));
  const parts = MEMORY_PARTS.filter(([key]) => memory[key] !== undefined).map(([key, label]) => ({ key, label, value: memory[key] }));
  const bar = stackedBar(parts, memory.total, "GiB", "memory breakdown");
  bar.id = "memory-bar";
  const gpus = table(["GPU", "memory GB", "fits on one", "GPUs needed", "hours", "cost $", "$/hour"], plan.gpus.map((g) => [
    g.gpu, fmt(g.memory_gb), el("span", { class: g.fits_on_one ? "fit" : "nofit", text: g.fits_on_one ? "✓ fits" : "✗" }),
    fmt(g.gpus_needed), fmt(g.hours, 2), fmt(g.cost_usd, 2), fmt(g.price_per_hour, 2)]));
  gpus.id = "gpu-table";
  out.replaceChildren(
    el("div", { class: "figures" }, figure("plan-total", "peak memory", `${memory.total.toFixed(2)} GiB`),
      figure("plan-phase", "peak in", plan.peak_phase),
      figure("plan-trainable", "trained parameters", `${plan.trainable_params.toLocaleString("en")} (${plan.trainable_percent.toFixed(2)}%)`),
      figure("plan-gpu", "cheapest GPU that fits", chosen ? `${chosen.gpus_needed} × ${chosen.gpu}, $${chosen.cost_usd.toFixed(2)}` : "none")),
    el("h3", { text: `Memory breakdown (${plan.model}, ${plan.setup.method})` }), bar,
    el("h3", { text: "GPU fit" }), gpus);
}

// --- start -------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("#key").value = localStorage.getItem("tailor-key") || "";
  $("#key").addEventListener("change", () => { localStorage.setItem("tailor-key", $("#key").value); loaded.clear(); route(); });
  $("#compare-button").addEventListener("click", compareRuns);
  $("#play-form").addEventListener("submit", play);
  $("#plan-form").addEventListener("submit", submitPlan);
  window.addEventListener("hashchange", route);
  route();
});
