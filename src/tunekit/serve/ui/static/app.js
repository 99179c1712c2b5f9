// tunekit dashboard: views of the server's /v1 API (OpenAI's endpoints plus tunekit's data-file check and
// preview). No build step and no dependencies: one script, DOM built with `h`, text always set as text.
"use strict";

const KEY_STORE = "tunekit-api-key";
const TERMINAL = ["succeeded", "failed", "cancelled"];
let timers = [];  // polling timers of the page shown; cleared when the page changes

// ------------------------------------------------------------------------------------------------
// DOM and API helpers

const given = (x) => x !== null && x !== undefined;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (!given(v) || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (!given(c) || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status; this.param = e.param; this.code = e.code;
  }
}

// a table with a head row of `columns` (texts) and a body of `rows` (tr elements)
function table(attrs, columns, rows) {
  return h("table", attrs, h("thead", {}, h("tr", {}, columns.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch /v1 + path; on 401 ask for a key once and try again; JSON in and out; ApiError on failure
async function call(path, opts = {}, asked = false) {
  const headers = { ...authHeaders(), ...(opts.headers || {}) };
  let body = opts.body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch("/v1" + path, { method: opts.method || "GET", headers, body });
  } catch (err) {
    throw new ApiError(0, { error: { message: `the server cannot be reached (${err.message})` } });
  }
  if (resp.status === 401 && !asked) {
    if (await askKey(true)) return call(path, opts, true);
  }
  if (opts.raw) {
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
    return resp;
  }
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// every page of a list endpoint (after=last id); with `take` (the items of a page to keep), only up to the
// first page where it keeps fewer than all
async function listAll(path, limit = 1000, take = (items) => items) {
  const out = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await call(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    const kept = take(page.data);
    out.push(...kept);
    if (kept.length < page.data.length || !page.has_more || !page.data.length) return out;
    after = page.data[page.data.length - 1].id;
  }
}

let keyPrompt = null;  // the open question: requests refused at the same time wait for one answer

function askKey(afterRefusal) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = promptKey(afterRefusal).finally(() => { keyPrompt = null; });
  return keyPrompt;
}

function promptKey(afterRefusal) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-why").textContent = afterRefusal
    ? "The server refused the request: it needs an API key (Authorization: Bearer KEY). The key stays in this browser tab only (sessionStorage)."
    : "The key is sent as Authorization: Bearer KEY and kept in this browser tab only (sessionStorage).";
  input.value = sessionStorage.getItem(KEY_STORE) || "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const saved = dialog.returnValue === "save" && input.value.trim();
      if (saved) sessionStorage.setItem(KEY_STORE, input.value.trim());
      resolve(Boolean(saved));
    }, { once: true });
    dialog.showModal();
  });
}

function errorBox(err) {
  const where = err.param ? ` (${err.param})` : "";
  return h("p", { class: "error", role: "alert" }, `${err.message}${where}`);
}

// the error box of a value the user typed that cannot be sent (`param`: the field)
function inputError(message, param) {
  return errorBox(new ApiError(400, { error: { message, param } }));
}

// run `fn`, showing its error in `slot` (an element) instead of failing silently
async function guarded(slot, fn) {
  try {
    slot.replaceChildren();
    return await fn();
  } catch (err) {
    slot.replaceChildren(errorBox(err));
    return undefined;
  }
}

function every(ms, fn) {
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    try { await fn(); } finally { if (!stopped) timers.push(setTimeout(tick, ms)); }
  };
  timers.push({ stop: () => { stopped = true; } });
  tick();
}

function stopTimers() {
  for (const t of timers) (t.stop ? t.stop() : clearTimeout(t));
  timers = [];
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const num = (x, digits = 0) => (!given(x) ? "–"
  : Number(x).toLocaleString(undefined, { maximumFractionDigits: digits }));
const badge = (status) => h("span", { class: `badge s-${status}` }, status);

async function models() {
  return (await call("/models")).data.map((m) => m.id);
}

// the served models' names; null, after saying why in `slot`, where there are none or they cannot be read
async function servedModels(slot) {
  const names = await guarded(slot, models);
  if (names && !names.length) slot.replaceChildren(h("p", { class: "muted" }, "No model is served."));
  return names && names.length ? names : null;
}

// a choice of model; `blank`: the label of a first, empty choice (none where null)
function modelSelect(names, attrs = {}, selected = null, blank = null) {
  return h("select", attrs, blank === null ? null : h("option", { value: "", selected: selected === "" }, blank),
    names.map((n) => h("option", { value: n, selected: n === selected }, n)));
}

// Ctrl+Enter (Cmd+Enter) in `field` submits `form`
function submitOnCtrlEnter(field, form) {
  field.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); } });
}

// ------------------------------------------------------------------------------------------------
// Data page

async function pageData(main) {
  const msg = h("div");
  const fileInput = h("input", { type: "file", accept: ".jsonl,.json,application/jsonl", hidden: true, id: "file-input" });
  const drop = h("label", { class: "drop", tabindex: "0", for: "file-input", id: "drop" },
    h("strong", {}, "Drop a JSONL file here"), " or press Enter to choose one",
    h("div", { class: "muted" }, "One chat example per line: {\"messages\": [...]}. It is checked at once."));
  const listSlot = h("div");
  const reportSlot = h("section", { id: "report", "aria-live": "polite" });
  const modelSlot = h("div", { class: "row" });
  let names = [];
  let shown = null;  // the file whose report is shown

  main.replaceChildren(h("h1", {}, "Data"), fileInput, drop, msg,
    h("div", { class: "row" }, h("h2", {}, "Files"), modelSlot), listSlot, reportSlot);

  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fileInput.click(); } });
  for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
  fileInput.addEventListener("change", () => { if (fileInput.files.length) upload(fileInput.files[0]); fileInput.value = ""; });

  async function upload(file) {
    msg.replaceChildren(h("p", { class: "muted" }, `Uploading ${file.name}…`));
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    const obj = await guarded(msg, () => call("/files", { method: "POST", body: form }));
    if (!obj) return;
    msg.replaceChildren(h("p", { class: obj.status === "error" ? "error" : "ok", role: "status" },
      obj.status === "error" ? `${obj.filename}: uploaded, but it has problems (see the report below)`
        : `${obj.filename}: uploaded as ${obj.id}, no errors`));
    await refresh();
    await showReport(obj);
  }

  const modelPick = () => document.getElementById("stats-model");

  async function refresh() {
    const files = await guarded(listSlot, () => listAll("/files?purpose=fine-tune", 10000));
    if (!files) return;
    listSlot.replaceChildren(files.length ? table({ id: "files" }, ["File", "ID", "Bytes", "Status", "Uploaded", ""],
      files.map((f) => h("tr", { "data-file": f.id },
        h("td", {}, f.filename), h("td", { class: "mono" }, f.id), h("td", {}, num(f.bytes)),
        h("td", {}, badge(f.status)), h("td", {}, when(f.created_at)),
        h("td", {}, h("div", { class: "row" },
          h("button", { type: "button", class: "quiet", onclick: () => showReport(f) }, "Report"),
          h("button", { type: "button", class: "danger", "aria-label": `delete ${f.filename}`, onclick: () => remove(f) }, "Delete"))))))
      : h("p", { class: "muted", id: "files-empty" }, "No files yet: drop a JSONL file above."));
  }

  async function remove(f) {
    if (!confirm(`Delete ${f.filename} (${f.id})?`)) return;
    if (await guarded(msg, () => call(`/files/${f.id}`, { method: "DELETE" }))) {
      if (shown && shown.id === f.id) reportSlot.replaceChildren();
      await refresh();
    }
  }

  async function showReport(f) {
    shown = f;
    const model = modelPick() ? modelPick().value : "";
    const maxLen = (document.getElementById("stats-max-len") || {}).value;
    reportSlot.replaceChildren(h("h2", {}, `Report: ${f.filename}`), h("p", { class: "muted" }, "Checking…"));
    const params = new URLSearchParams();
    if (model) params.set("model", model);
    if (model && maxLen) params.set("max_len", maxLen);
    const q = params.toString() ? `?${params}` : "";
    const report = await guarded(reportSlot, () => call(`/files/${f.id}/check${q}`));
    if (!report) return;
    const parts = [h("h2", {}, `Report: ${f.filename}`), renderReport(report)];
    if (model && report.examples) {
      const prev = await call(`/files/${f.id}/preview?model=${encodeURIComponent(model)}&n=3`).catch((e) => e);
      parts.push(h("h3", {}, `Preview with ${model}'s chat template`),
        prev instanceof Error ? errorBox(prev) : renderPreview(prev));
    }
    reportSlot.replaceChildren(...parts);
  }

  names = await guarded(modelSlot, models) || [];
  if (names.length) {
    const again = () => { if (shown) showReport(shown); };
    const sel = modelSelect(names, { id: "stats-model" }, names[0], "(characters, no model)");
    sel.addEventListener("change", again);
    const maxLen = h("input", { id: "stats-max-len", type: "number", min: "1", placeholder: "none", size: "6" });
    maxLen.addEventListener("change", again);
    modelSlot.replaceChildren(h("label", { class: "inline" }, "Token statistics and preview for\u00a0", sel),
      h("label", { class: "inline" }, "\u00a0max length\u00a0", maxLen));
  }
  await refresh();
}

function renderReport(r) {
  const verdict = r.ok
    ? h("p", { class: "ok", id: "verdict" }, `✓ no errors: ${num(r.examples)} examples in ${num(r.lines)} lines, ${num(r.warnings)} warning(s)`)
    : h("p", { class: "error", id: "verdict" }, `✗ ${num(r.errors)} error(s), ${num(r.warnings)} warning(s): ${num(r.examples)} valid examples in ${num(r.lines)} lines`);
  const out = [verdict];
  const codes = Object.entries(r.counts).sort((a, b) => b[1] - a[1]);
  if (codes.length) {
    out.push(h("div", { class: "cols" },
      h("div", {}, h("h3", {}, "Problems per code"), table({ class: "counts", id: "counts" }, ["Code", "Severity", "Count"],
        codes.map(([code, n]) => h("tr", {}, h("td", { class: "mono" }, code),
          h("td", { class: `sev-${r.severities[code]}` }, r.severities[code]), h("td", {}, num(n))))))));
    out.push(h("h3", {}, `Problems${r.problems_stored < codes.reduce((s, c) => s + c[1], 0) ? ` (first ${r.problems_stored})` : ""}`),
      table({ id: "problems" }, ["Line", "Field", "Code", "Problem", "How to fix"],
        r.problems.map((p) => h("tr", { class: `sev-${p.severity}` },
          h("td", {}, p.line === null ? "file" : `${p.line}${p.column ? ":" + p.column : ""}`),
          h("td", { class: "mono" }, p.path || ""), h("td", { class: "mono" }, p.code),
          h("td", {}, p.message), h("td", {}, p.hint)))));
  }
  const s = r.stats;
  if (s) {
    const unit = s.unit;
    const line = (label, sum) => (sum ? h("tr", {}, h("td", {}, label), ...["min", "p5", "median", "mean", "p95", "max"].map((k) => h("td", {}, num(sum[k], 1))), h("td", {}, num(sum.total))) : null);
    out.push(h("h3", {}, `Statistics (${unit})`), table({ id: "stats" }, ["per example", "min", "p5", "median", "mean", "p95", "max", "total"],
      [line(`${unit}`, s.length), line(`trained ${unit}`, s.trained), line("messages", s.messages)]));
    const facts = [`${num(s.examples)} examples`, `recommended epochs: ${num(s.epochs)} (OpenAI cookbook rule)`];
    if (given(s.tokens_per_epoch)) {
      facts.push(`${num(s.tokens_per_epoch)} tokens per epoch (${num(s.trained_tokens_per_epoch)} trained)`,
        `estimated for ${s.epochs} epochs: ${num(s.estimated_tokens)} tokens, ${num(s.estimated_trained_tokens)} trained`);
      if (s.max_len) facts.push(`${num(s.over_max_len)} examples over max length ${s.max_len} (${s.truncation}), ${num(s.trained_lost)} trained tokens lost`);
    }
    if (given(s.without_system_message)) {
      facts.push(`${num(s.without_system_message)} without a system message, ${num(s.without_user_message)} without a user message`);
    }
    out.push(h("ul", { id: "facts" }, facts.map((f) => h("li", {}, f))));
  }
  for (const note of r.notes || []) out.push(h("p", { class: "muted" }, `note: ${note}`));
  return h("div", { class: "card" }, out);
}

function renderPreview(prev) {
  if (!prev.data.length) return h("p", { class: "muted" }, "No valid example to preview.");
  return h("div", { id: "preview" },
    h("p", { class: "muted" }, "Legend: ", h("mark", {}, "trained"), " ", h("span", { class: "notrained" }, "not trained (prompt, template)")),
    prev.data.map((ex) => h("div", {},
      h("h3", {}, `line ${ex.line}`, ex.error ? "" : ` · ${num(ex.tokens)} tokens, ${num(ex.trained)} trained`),
      ex.error ? h("p", { class: "error" }, ex.error)
        : h("div", { class: "preview" }, ex.sequences.map((runs, k) => [
          ex.titles ? h("strong", {}, `── ${ex.titles[k]} ──\n`)
            : ex.sequences.length > 1 ? h("strong", {}, `── sequence ${k + 1} of ${ex.sequences.length} ──\n`) : null,
          runs.map((r) => (r.trained ? h("mark", {}, r.text) : h("span", { class: "notrained" }, r.text))), "\n"])))));
}

// ------------------------------------------------------------------------------------------------
// Jobs pages

async function pageJobs(main) {
  const msg = h("div");
  const listSlot = h("div");
  const formSlot = h("div");
  main.replaceChildren(h("h1", {}, "Fine-tuning jobs"), h("h2", {}, "New job"), formSlot, msg, h("h2", {}, "Jobs"), listSlot);

  const [names, files] = await Promise.all([
    guarded(formSlot, models),
    call("/files?purpose=fine-tune").then((l) => l.data.filter((f) => f.status === "processed")).catch(() => []),
  ]);
  if (names) {
    if (!files.length) {
      formSlot.replaceChildren(h("p", { class: "muted", id: "no-training-files" },
        "No checked training file yet: upload one on the ", h("a", { href: "#/data" }, "Data page"), "."));
    } else {
      formSlot.replaceChildren(jobForm(names, files, msg));
    }
  }
  every(2000, async () => {
    const jobs = await guarded(listSlot, () => call("/fine_tuning/jobs?limit=100"));
    if (!jobs) return;
    listSlot.replaceChildren(jobs.data.length ? table({ id: "jobs" }, ["Job", "Base model", "Status", "Fine-tuned model", "Created"],
      jobs.data.map((j) => h("tr", {},
        h("td", {}, h("a", { href: `#/jobs/${j.id}`, class: "mono" }, j.id)), h("td", {}, j.model),
        h("td", {}, badge(j.status)), h("td", { class: "mono" }, j.fine_tuned_model || ""), h("td", {}, when(j.created_at)))))
      : h("p", { class: "muted", id: "jobs-empty" }, "No jobs yet: create one above."));
  });
}

function jobForm(names, files, msg) {
  const fileOptions = (blank) => [blank ? h("option", { value: "" }, "(none)") : null,
    ...files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`))];
  const auto = (name, label, hint) => h("label", {}, label,
    h("input", { name, placeholder: "auto", inputmode: "decimal", title: hint, "aria-describedby": "auto-hint" }));
  // DPO's beta: the strength of the pull towards the reference model (OpenAI's range: > 0 and <= 2)
  const method = h("select", { name: "method" }, ["supervised", "dpo"].map((m) => h("option", { value: m }, m)));
  const betaLabel = h("label", { hidden: true }, "Beta (DPO)",
    h("input", { name: "beta", value: "0.1", inputmode: "decimal", title: "a number > 0 and <= 2" }));
  method.addEventListener("change", () => { betaLabel.hidden = method.value !== "dpo"; });
  const form = h("form", { class: "card", id: "job-form" },
    h("div", { class: "grid" },
      h("label", {}, "Base model", modelSelect(names, { name: "model", required: true })),
      h("label", {}, "Training file", h("select", { name: "training_file", required: true }, fileOptions(false))),
      h("label", {}, "Validation file", h("select", { name: "validation_file" }, fileOptions(true))),
      h("label", {}, "Method", method),
      betaLabel,
      auto("n_epochs", "Epochs", "a whole number, or empty for auto"),
      auto("batch_size", "Batch size", "a whole number, or empty for auto"),
      auto("learning_rate_multiplier", "Learning rate multiplier", "a positive number, or empty for auto"),
      h("label", {}, "Suffix", h("input", { name: "suffix", pattern: "[A-Za-z0-9._\\-]{1,64}", placeholder: "optional" })),
      h("label", {}, "Seed", h("input", { name: "seed", type: "number", min: "0", placeholder: "random" }))),
    h("p", { class: "muted", id: "auto-hint" }, "Empty hyperparameters are \"auto\": resolved from the data size (OpenAI's rules)."),
    h("details", {}, h("summary", {}, "Advanced: tunekit config overrides"),
      h("label", {}, "JSON object of tunekit config values (nested sections or dotted keys), e.g. {\"lora.r\": 8, \"train.max_steps\": 20}",
        h("textarea", { name: "tunekit", rows: "4", spellcheck: "false" }))),
    h("div", { class: "row" }, h("button", { type: "submit" }, "Create job")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const v = Object.fromEntries(new FormData(form).entries());
    const hp = {};
    for (const k of ["n_epochs", "batch_size", "learning_rate_multiplier"]) {
      const raw = (v[k] || "").trim();
      if (!raw || raw === "auto") continue;
      const n = Number(raw);
      if (!Number.isFinite(n)) { msg.replaceChildren(inputError(`${k} must be a number or auto, not "${raw}"`, k)); return; }
      hp[k] = k === "learning_rate_multiplier" ? n : Math.round(n);
    }
    const body = { model: v.model, training_file: v.training_file,
      method: { type: v.method, supervised: { hyperparameters: hp } } };
    if (v.method === "dpo") {
      const raw = (v.beta || "").trim();
      const beta = Number(raw);
      if (!raw || !Number.isFinite(beta) || beta <= 0 || beta > 2) {
        msg.replaceChildren(inputError(`beta must be a number > 0 and <= 2, not "${raw}"`, "method.dpo.hyperparameters.beta"));
        return;
      }
      // every hyperparameter named, "auto" where none is typed (OpenAI's DPO request)
      const auto = Object.fromEntries(["n_epochs", "batch_size", "learning_rate_multiplier"].map((k) => [k, "auto"]));
      body.method = { type: "dpo", dpo: { hyperparameters: { beta, ...auto, ...hp } } };
    }
    if (v.validation_file) body.validation_file = v.validation_file;
    if (v.suffix) body.suffix = v.suffix;
    if (v.seed) body.seed = Number(v.seed);
    if ((v.tunekit || "").trim()) {
      try { body.tunekit = JSON.parse(v.tunekit); } catch (err) {
        msg.replaceChildren(inputError(`the overrides are not valid JSON: ${err.message}`, "tunekit"));
        return;
      }
    }
    const job = await guarded(msg, () => call("/fine_tuning/jobs", { method: "POST", body }));
    if (job) location.hash = `#/jobs/${job.id}`;
  });
  return form;
}

// an SVG line chart by step of `series` ({key: the metric in each point, cls: the line's classes, label}) of
// `points` (metrics events' data, by step); each polyline's data-points counts the points drawn, data-key
// names its metric; `dots`: a dot at each point too (validation: evaluated at a few steps only)
function lineChart(points, { id, what, series, empty }) {
  const W = 640, H = 240, L = 48, R = 12, T = 14, B = 30;
  const lines = series.map((s) => ({ ...s, pts: points.filter((p) => given(p[s.key])) }));
  const svgNS = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", id,
    "aria-label": `${what}: ${lines.map((s) => `${s.pts.length} ${s.label} points`).join(", ")}` });
  if (!lines.some((s) => s.pts.length)) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, empty));
    return svg;
  }
  const steps = points.map((p) => p.step);
  const ys = lines.flatMap((s) => s.pts.map((p) => p[s.key]));
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
    el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(el("text", { x: L - 6, y: Y(y) + 4, "text-anchor": "end" }, y.toFixed(y1 - y0 < 0.1 ? 4 : 2)),
      el("line", { x1: L - 3, y1: Y(y), x2: L, y2: Y(y), class: "axis" }));
  }
  for (const s of [x0, Math.round((x0 + x1) / 2), x1]) {
    svg.append(el("text", { x: X(s), y: H - B + 16, "text-anchor": "middle" }, String(s)));
  }
  svg.append(el("text", { x: W - R, y: H - 2, "text-anchor": "end" }, "step"));
  let legendX = W - R;  // legend entries right to left, about 6.5 px a character at 11 px
  for (const s of [...lines].reverse()) {
    if (!s.pts.length) continue;
    const text = `— ${s.label}`;
    legendX -= text.length * 6.5 + 10;
    svg.append(el("text", { x: legendX, y: T + 6, class: `legend ${s.cls}` }, text));
  }
  for (const s of lines) {
    if (!s.pts.length) continue;
    svg.append(el("polyline", { class: s.cls, "data-points": s.pts.length, "data-key": s.key,
      points: s.pts.map((p) => `${X(p.step).toFixed(1)},${Y(p[s.key]).toFixed(1)}`).join(" ") }));
    if (s.dots) {
      for (const p of s.pts) svg.append(el("circle", { cx: X(p.step), cy: Y(p[s.key]), r: 3, class: `dot ${s.cls}` }));
    }
  }
  return svg;
}

// train and validation loss by step
const lossChart = (points) => lineChart(points, { id: "loss-chart", what: "loss curve",
  series: [{ key: "train_loss", cls: "train", label: "train loss" }, { key: "valid_loss", cls: "valid", label: "valid loss", dots: true }],
  empty: "No steps yet: the curve appears when training starts." });

// a DPO job's reward accuracy (share of pairs whose preferred reply gets the higher reward) and reward margin
// (mean preferred minus non-preferred reward) by step, train and validation
const rewardChart = (points) => lineChart(points, { id: "reward-chart", what: "reward curves",
  series: [{ key: "train_reward_accuracy", cls: "train accuracy", label: "train accuracy" },
    { key: "train_reward_margin", cls: "train margin", label: "train margin" },
    { key: "valid_reward_accuracy", cls: "valid accuracy", label: "valid accuracy", dots: true },
    { key: "valid_reward_margin", cls: "valid margin", label: "valid margin", dots: true }],
  empty: "No steps yet: the rewards appear when training starts." });

// a reinforcement job's mean reward by step: over the step's sampled completions (train) and over the
// validation prompts, one greedy completion each (valid, at eval_interval steps)
const rftRewardChart = (points) => lineChart(points, { id: "reward-chart", what: "reward curves",
  series: [{ key: "train_mean_reward", cls: "train", label: "train mean reward" },
    { key: "full_valid_mean_reward", cls: "valid", label: "valid mean reward", dots: true }],
  empty: "No steps yet: the rewards appear when training starts." });

function snippet(model) {
  return `from openai import OpenAI

client = OpenAI(base_url="${location.origin}/v1", api_key="YOUR_KEY")
reply = client.chat.completions.create(
    model="${model}",
    messages=[{"role": "user", "content": "Hello"}],
)
print(reply.choices[0].message.content)`;
}

async function pageJob(main, id) {
  const head = h("div"); const msg = h("div");
  const chart = h("div", { class: "chart" }); const rewards = h("div", { class: "chart", hidden: true });
  const modelSlot = h("div"); const reportSlot = h("div"); const events = h("div", { class: "events card" });
  const ckpts = h("div"); const samples = h("div");
  main.replaceChildren(h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")), head, msg,
    h("div", { class: "charts" }, h("div", {}, h("h2", {}, "Loss"), chart), rewards), samples, modelSlot, reportSlot, h("h2", {}, "Checkpoints"), ckpts, h("h2", {}, "Events"), events);
  let reportShown = false;
  let lastStatus = null;
  let evs = [];  // every event read so far, newest first (the API's order)
  const seen = new Set();

  // the events newer than those already read: pages from the newest until one holds a known event
  async function newEvents() {
    const fresh = await listAll(`/fine_tuning/jobs/${id}/events`, 50, (page) => page.filter((e) => !seen.has(e.id)));
    for (const e of fresh) seen.add(e.id);
    evs = fresh.concat(evs);
    return fresh;
  }

  const act = (verb) => guarded(msg, async () => {
    await call(`/fine_tuning/jobs/${id}/${verb}`, { method: "POST" });
    await update();
  });
  const actButton = (verb, label, cls, disabled) => h("button", { type: "button", class: cls, disabled, onclick: () => act(verb) }, label);

  async function update() {
    const job = await guarded(msg, () => call(`/fine_tuning/jobs/${id}`));
    if (!job) return false;
    const hp = job.hyperparameters;
    const statusChanged = job.status !== lastStatus;
    if (statusChanged) {
      lastStatus = job.status;
      head.replaceChildren(h("h1", {}, "Job ", h("span", { class: "mono" }, job.id), " ", h("span", { id: "job-status" }, badge(job.status))),
        h("p", { class: "muted" }, `base ${job.model} · training ${job.training_file}${job.validation_file ? ` · validation ${job.validation_file}` : ""}`
          + ` · ${job.method ? job.method.type : "supervised"}`
          + (job.method && job.method.type === "dpo" ? `, beta ${job.method.dpo.hyperparameters.beta}` : "")
          + (job.method && job.method.type === "reinforcement" ? `, grader ${job.method.reinforcement.grader.name}` : "")
          + ` · epochs ${hp.n_epochs}, batch ${hp.batch_size}, lr × ${hp.learning_rate_multiplier} · seed ${job.seed}`),
        h("div", { class: "row" }, actButton("cancel", "Cancel", "danger", TERMINAL.includes(job.status)),
          actButton("pause", "Pause", "quiet", job.status !== "running"), actButton("resume", "Resume", "quiet", job.status !== "paused")));
    }
    if (job.error) {
      msg.replaceChildren(h("div", { class: "error", role: "alert", id: "job-error" },
        h("strong", {}, `Failed (${job.error.code})`), `: ${job.error.message}`, job.error.param ? ` [${job.error.param}]` : ""));
    }
    const fresh = await newEvents().catch(() => null);
    if (fresh && (fresh.length || statusChanged)) {  // redrawn only when something new arrived
      const points = evs.filter((e) => e.type === "metrics" && e.data).map((e) => e.data).sort((a, b) => a.step - b.step);
      chart.replaceChildren(lossChart(points));
      if (job.method && job.method.type === "dpo") {
        rewards.hidden = false;
        rewards.replaceChildren(h("h2", {}, "Rewards"), rewardChart(points));
      }
      if (job.method && job.method.type === "reinforcement") {
        rewards.hidden = false;
        rewards.replaceChildren(h("h2", {}, "Rewards"), rftRewardChart(points));
        // what was graded: the completions of the newest logged steps' first prompts (tunekit's rollouts list)
        const sampled = await call(`/fine_tuning/jobs/${id}/rollouts?limit=8`).catch(() => null);
        if (sampled) {
          samples.replaceChildren(h("h2", {}, "Sampled completions"), sampled.data.length
            ? table({ id: "rollouts" }, ["Step", "Prompt", "Completion", "Reward", "Advantage"],
              sampled.data.map((r) => h("tr", {}, h("td", {}, r.step), h("td", {}, r.prompt ?? ""),
                h("td", { class: "mono" }, r.completion ?? ""),
                h("td", {}, r.grader_error ? "0 (grader failed)" : num(r.reward, 3)), h("td", {}, num(r.advantage, 2)))))
            : h("p", { class: "muted" }, "No completions sampled yet."));
        }
      }
      events.replaceChildren(h("table", { id: "events" }, h("tbody", {}, evs.map((e) => h("tr", {},
        h("td", { class: "muted" }, when(e.created_at)), h("td", { class: `sev-${e.level === "warn" ? "warning" : e.level}` }, e.level),
        h("td", {}, e.message))))));
    }
    // checkpoints change when one is written (an event says so; older ones may go then) and when the job ends
    const cps = statusChanged || (fresh && fresh.some((e) => e.data && e.data.checkpoint_step !== undefined))
      ? await call(`/fine_tuning/jobs/${id}/checkpoints?limit=100`).catch(() => null) : null;
    if (cps) {
      ckpts.replaceChildren(cps.data.length ? table({ id: "checkpoints" }, ["Step", "Model name", "Train loss", "Valid loss"],
        cps.data.map((c) => h("tr", {}, h("td", {}, c.step_number), h("td", { class: "mono" }, c.fine_tuned_model_checkpoint),
          h("td", {}, num(c.metrics.train_loss, 4)), h("td", {}, num(c.metrics.valid_loss, 4)))))
        : h("p", { class: "muted" }, "No checkpoints yet."));
    }
    if (job.fine_tuned_model && !modelSlot.childElementCount) {
      const code = snippet(job.fine_tuned_model);
      const copy = h("button", { type: "button", class: "quiet" }, "Copy");
      copy.addEventListener("click", async () => {
        try { await navigator.clipboard.writeText(code); copy.textContent = "Copied"; } catch { copy.textContent = "Select and copy"; }
      });
      modelSlot.replaceChildren(h("h2", {}, "Fine-tuned model"),
        h("p", {}, h("code", { id: "ft-model" }, job.fine_tuned_model), " · ",
          h("a", { href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}` }, "try it in the playground"), " · ",
          h("a", { href: `#/compare?models=${encodeURIComponent(job.model)},${encodeURIComponent(job.fine_tuned_model)}` }, "compare with the base")),
        h("div", { class: "snippet" }, h("pre", { id: "sdk-snippet" }, code), copy));
    }
    if (!reportShown && job.result_files.length) {
      reportShown = true;
      const parts = [h("h2", {}, "Results")];
      for (const fid of job.result_files) {
        const meta = await call(`/files/${fid}`).catch(() => null);
        if (!meta) continue;
        const text = await call(`/files/${fid}/content`, { raw: true }).then((r) => r.text()).catch(() => null);
        if (meta.filename.endsWith(".html")) {
          // the report's own self-contained page (tables and plots), isolated: no scripts, no same origin
          parts.push(h("h3", {}, "Evaluation report"), h("iframe", { id: "eval-report", class: "report", sandbox: "", srcdoc: text || "", title: "Evaluation report" }));
        } else parts.push(h("details", {}, h("summary", {}, `${meta.filename} (${fid})`), h("pre", {}, text || "")));
      }
      reportSlot.replaceChildren(...parts);
    }
    return TERMINAL.includes(job.status);
  }

  let done = false;
  every(1000, async () => {
    if (done) return;
    done = await update();
  });
}

// ------------------------------------------------------------------------------------------------
// Chat streaming, shared by Playground and Compare

// POST /v1/chat/completions with stream=true; calls onText(text) per delta; returns {content, toolCalls,
// usage, finish, firstMs, totalMs}
async function streamChat(body, onText) {
  const began = performance.now();
  const resp = await call("/chat/completions", { method: "POST", raw: true,
    body: { ...body, stream: true, stream_options: { include_usage: true } } });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", content = "", usage = null, finish = null, firstMs = null;
  const calls = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          if (d.content) {
            if (firstMs === null) firstMs = performance.now() - began;
            content += d.content; onText(d.content);
          }
          for (const tc of d.tool_calls || []) {
            if (firstMs === null) firstMs = performance.now() - began;
            const c = calls[tc.index] || (calls[tc.index] = { id: tc.id, name: "", arguments: "" });
            if (tc.function && tc.function.name) c.name += tc.function.name;
            if (tc.function && tc.function.arguments) c.arguments += tc.function.arguments;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return { content, toolCalls: calls.filter(Boolean), usage, finish, firstMs, totalMs: performance.now() - began };
}

function toolCallView(c) {
  return h("div", { class: "toolcall" }, "tool call ", h("strong", {}, c.name), `(${c.arguments})`);
}

// the settings inputs of a chat page (ids `${prefix}-system`, `-temperature`, `-max-tokens`) and `request`,
// the body of a chat request from them: the system prompt (where one is written) goes before `messages`
function chatSettings(prefix, { systemHint, temperature, maxTokens }) {
  const inputs = {
    system: h("textarea", { id: `${prefix}-system`, rows: "2", placeholder: systemHint }),
    temperature: h("input", { id: `${prefix}-temperature`, type: "number", min: "0", max: "2", step: "0.1", value: temperature }),
    maxTokens: h("input", { id: `${prefix}-max-tokens`, type: "number", min: "1", value: maxTokens }),
  };
  const request = (model, messages, extra = {}) => ({ model,
    messages: [...(inputs.system.value.trim() ? [{ role: "system", content: inputs.system.value }] : []), ...messages],
    temperature: Number(inputs.temperature.value), max_tokens: Number(inputs.maxTokens.value), ...extra });
  return { ...inputs, request };
}

// stream the reply to `request` into `box`: the model's name, the text as it comes, its tool calls, then a
// line `summary(result)` (`metaText` until then); marks the box data-done; returns streamChat's result
async function streamReply(box, request, summary, metaText) {
  const body = h("span", { class: "text" });
  const meta = h("div", { class: "meta" }, metaText);
  box.replaceChildren(h("span", { class: "who" }, request.model), body, meta);
  delete box.dataset.done;
  const r = await streamChat(request, (t) => body.append(t));
  for (const c of r.toolCalls) box.insertBefore(toolCallView(c), meta);
  meta.textContent = summary(r);
  box.dataset.done = "true";
  return r;
}

function hashParams() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

// ------------------------------------------------------------------------------------------------
// Playground

async function pagePlayground(main) {
  const msg = h("div");
  main.replaceChildren(h("h1", {}, "Playground"), msg);
  const names = await servedModels(msg);
  if (!names) return;
  const wanted = hashParams().get("model");
  const model = modelSelect(names, { id: "pg-model" }, names.includes(wanted) ? wanted : names[0]);
  const settings = chatSettings("pg", { systemHint: "optional system prompt", temperature: "0.7", maxTokens: "128" });
  const tools = h("textarea", { id: "pg-tools", rows: "4", spellcheck: "false",
    placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]' });
  const log = h("div", { class: "chat", id: "pg-log", "aria-live": "polite" });
  const input = h("textarea", { id: "pg-input", rows: "3", placeholder: "Message (Ctrl+Enter to send)" });
  const send = h("button", { type: "submit", id: "pg-send" }, "Send");
  const clear = h("button", { type: "button", class: "quiet", onclick: () => { history.length = 0; log.replaceChildren(empty()); } }, "Clear");
  const error = h("div");
  const history = [];
  const empty = () => h("p", { class: "muted" }, "No messages yet: write one below.");
  log.append(empty());
  const form = h("form", { class: "card" },
    h("div", { class: "grid" }, h("label", {}, "Model", model), h("label", {}, "Temperature", settings.temperature),
      h("label", {}, "Max tokens", settings.maxTokens)),
    h("label", {}, "System prompt", settings.system),
    h("details", { id: "pg-tools-fold" }, h("summary", {}, "Tools (JSON array of tool definitions)"), tools),
    log, error, h("label", {}, "Message", input), h("div", { class: "row" }, send, clear));
  main.append(form);
  submitOnCtrlEnter(input, form);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    let toolDefs;
    if (tools.value.trim()) {
      try { toolDefs = JSON.parse(tools.value); } catch (err) {
        error.replaceChildren(inputError(`the tools are not valid JSON: ${err.message}`, "tools"));
        return;
      }
    }
    if (history.length === 0) log.replaceChildren();
    history.push({ role: "user", content: text });
    log.append(h("div", { class: "msg user" }, h("span", { class: "who" }, "user"), text));
    input.value = "";
    const bubble = h("div", { class: "msg assistant" });
    log.append(bubble);
    send.disabled = true;
    error.replaceChildren();
    try {
      const r = await streamReply(bubble, settings.request(model.value, history, toolDefs ? { tools: toolDefs } : {}),
        (done) => `${done.usage ? done.usage.completion_tokens : "?"} tokens · ${Math.round(done.totalMs)} ms · finish: ${done.finish}`);
      history.push(r.toolCalls.length
        ? { role: "assistant", content: r.content || null, tool_calls: r.toolCalls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } })) }
        : { role: "assistant", content: r.content });
    } catch (err) {
      history.pop();
      bubble.remove();
      error.replaceChildren(errorBox(err));
    } finally {
      send.disabled = false;
      input.focus();
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Compare

async function pageCompare(main) {
  const msg = h("div");
  main.replaceChildren(h("h1", {}, "Compare"), h("p", { class: "muted" },
    "One prompt, answered by two or three models side by side: is fine-tuning worth it? Few-shot examples (a JSON array of messages) go before the prompt of their column."), msg);
  const names = await servedModels(msg);
  if (!names) return;
  const wanted = (hashParams().get("models") || "").split(",").filter((m) => names.includes(m));
  const picks = [wanted[0] || names[0], wanted[1] || names[names.length - 1], ""];
  const prompt = h("textarea", { id: "cmp-prompt", rows: "3", placeholder: "Prompt (Ctrl+Enter to run)" });
  const settings = chatSettings("cmp", { systemHint: "optional system prompt (all columns)", temperature: "0", maxTokens: "64" });
  const columns = picks.map((pick, i) => {
    const sel = modelSelect(names, { id: `cmp-model-${i}`, "aria-label": `model ${i + 1}` }, pick, "(none)");
    const shots = h("textarea", { rows: "3", spellcheck: "false", id: `cmp-shots-${i}`,
      placeholder: '[{"role": "user", "content": "say apple"}, {"role": "assistant", "content": "apple apple apple"}]' });
    const out = h("div", { class: "msg assistant", id: `cmp-out-${i}` }, h("span", { class: "muted" }, "—"));
    return { sel, shots, out, box: h("div", { class: "card" }, h("label", {}, `Model ${i + 1}`, sel),
      h("details", {}, h("summary", {}, "few-shot examples"), shots), out) };
  });
  const run = h("button", { type: "submit", id: "cmp-run" }, "Run");
  const form = h("form", {}, h("div", { class: "card" }, h("label", {}, "Prompt", prompt), h("label", {}, "System prompt", settings.system),
    h("div", { class: "row" }, h("label", {}, "Temperature", settings.temperature), h("label", {}, "Max tokens", settings.maxTokens), run)),
  h("div", { class: "cols" }, columns.map((c) => c.box)));
  main.append(form);
  submitOnCtrlEnter(prompt, form);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!prompt.value.trim()) { msg.replaceChildren(inputError("write a prompt first", "prompt")); return; }
    msg.replaceChildren();
    run.disabled = true;
    await Promise.all(columns.map(async (c) => {
      if (!c.sel.value) { c.out.replaceChildren(h("span", { class: "muted" }, "—")); return; }
      let shots = [];
      if (c.shots.value.trim()) {
        try { shots = JSON.parse(c.shots.value); if (!Array.isArray(shots)) throw new Error("not an array"); } catch (err) {
          c.out.replaceChildren(inputError(`few-shot examples must be a JSON array of messages: ${err.message}`));
          return;
        }
      }
      try {
        await streamReply(c.out, settings.request(c.sel.value, [...shots, { role: "user", content: prompt.value }]), (r) => {
          const u = r.usage || {};
          return `${u.completion_tokens ?? "?"} tokens (prompt ${u.prompt_tokens ?? "?"}) · ${Math.round(r.totalMs)} ms`
            + (r.firstMs !== null ? ` · first token ${Math.round(r.firstMs)} ms` : "");
        }, "…");
      } catch (err) {
        c.out.replaceChildren(errorBox(err));
      }
    }));
    run.disabled = false;
  });
}

// ------------------------------------------------------------------------------------------------
// Evals pages: an eval (item schema + testing criteria) made from an uploaded evals file, runs of it on
// several models compared side by side, and a run's failed samples

const DEFAULT_GRADER = { type: "string_check", name: "exact", input: "{{sample.output_text}}",
  reference: "{{item.answer}}", operation: "ilike" };
const DEFAULT_TEMPLATE = "{{item.question}}";
const RUN_DONE = ["completed", "failed", "canceled"];

// the JSON type of a value, as JSON Schema names it
const jsonType = (v) => (v === null ? "null" : Array.isArray(v) ? "array"
  : typeof v === "number" ? (Number.isInteger(v) ? "integer" : "number") : typeof v);

// an item_schema guessed from the first rows of an evals file (`{"item": {...}}` per line, or the item itself)
function schemaOf(text) {
  const props = {};
  let seen = 0;
  for (const line of text.split("\n")) {
    if (!line.trim() || seen >= 50) continue;
    let row;
    try { row = JSON.parse(line); } catch { continue; }
    const item = row && typeof row === "object" && row.item && typeof row.item === "object" ? row.item : row;
    if (!item || typeof item !== "object" || Array.isArray(item)) continue;
    seen += 1;
    for (const [k, v] of Object.entries(item)) {
      const t = jsonType(v);
      if (!props[k]) props[k] = new Set();
      props[k].add(t === "integer" ? "number" : t);
    }
  }
  const properties = Object.fromEntries(Object.entries(props).map(([k, types]) =>
    [k, { type: types.size === 1 ? [...types][0] : [...types] }]));
  return { type: "object", properties, required: Object.keys(properties) };
}

async function pageEvals(main) {
  const msg = h("div");
  const formSlot = h("div");
  const listSlot = h("div");
  main.replaceChildren(h("h1", {}, "Evals"), h("p", { class: "muted" },
    "An eval grades models' answers to the rows of an uploaded file (purpose \"evals\", one {\"item\": {...}} per line)."),
  h("h2", {}, "New eval"), formSlot, msg, h("h2", {}, "Evals"), listSlot);

  const files = await guarded(formSlot, () => listAll("/files?purpose=evals", 1000));
  if (files) {
    formSlot.replaceChildren(files.length ? evalForm(files, msg)
      : h("p", { class: "muted", id: "no-evals-files" }, "No evals file yet: upload a JSONL file with purpose \"evals\" (one {\"item\": {...}} per line) through the API."));
  }
  const evals = await guarded(listSlot, () => listAll("/evals?order=desc", 100));
  if (evals) {
    listSlot.replaceChildren(evals.length ? table({ id: "evals" }, ["Eval", "ID", "Criteria", "Created"],
      evals.map((ev) => h("tr", {}, h("td", {}, h("a", { href: `#/evals/${ev.id}` }, ev.name || "(unnamed)")),
        h("td", { class: "mono" }, ev.id), h("td", {}, ev.testing_criteria.map((c) => c.name).join(", ")),
        h("td", {}, when(ev.created_at)))))
      : h("p", { class: "muted", id: "evals-empty" }, "No evals yet: create one above."));
  }
}

function evalForm(files, msg) {
  const file = h("select", { name: "file", id: "ev-file", required: true },
    files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)));
  const schema = h("textarea", { name: "schema", id: "ev-schema", rows: "4", spellcheck: "false" });
  const grader = h("textarea", { name: "grader", id: "ev-grader", rows: "6", spellcheck: "false" },
    JSON.stringify(DEFAULT_GRADER, null, 2));
  const template = h("textarea", { name: "template", id: "ev-template", rows: "2", spellcheck: "false" }, DEFAULT_TEMPLATE);
  const system = h("input", { name: "system", id: "ev-system", placeholder: "optional developer message" });
  const guess = async () => {
    const text = await call(`/files/${file.value}/content`, { raw: true }).then((r) => r.text()).catch(() => null);
    if (text === null) return;
    const s = schemaOf(text);
    schema.value = JSON.stringify(s, null, 2);
    const keys = Object.keys(s.properties);
    // a first guess at the grader's reference and the prompt: the row's last and first fields
    if (keys.length && template.value === DEFAULT_TEMPLATE && !keys.includes("question")) template.value = `{{item.${keys[0]}}}`;
    if (keys.length && grader.value === JSON.stringify(DEFAULT_GRADER, null, 2) && !keys.includes("answer")) {
      grader.value = JSON.stringify({ ...DEFAULT_GRADER, reference: `{{item.${keys[keys.length - 1]}}}` }, null, 2);
    }
  };
  file.addEventListener("change", guess);
  guess();
  const form = h("form", { class: "card", id: "eval-form" },
    h("div", { class: "grid" }, h("label", {}, "Name", h("input", { name: "name", id: "ev-name", required: true })),
      h("label", {}, "Evals file", file)),
    h("label", {}, "Item schema (JSON Schema of one row's item; guessed from the file)", schema),
    h("label", {}, "Grader (JSON: string_check, text_similarity, python, score_model or label_model)", grader),
    h("label", {}, "Developer message", system),
    h("label", {}, "Prompt template (the user message; {{item.field}} is filled per row)", template),
    h("div", { class: "row" }, h("button", { type: "submit", id: "ev-create" }, "Create eval")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let criterion, itemSchema;
    try { criterion = JSON.parse(grader.value); } catch (err) {
      msg.replaceChildren(inputError(`the grader is not valid JSON: ${err.message}`, "testing_criteria[0]")); return;
    }
    try { itemSchema = JSON.parse(schema.value); } catch (err) {
      msg.replaceChildren(inputError(`the item schema is not valid JSON: ${err.message}`, "data_source_config.item_schema")); return;
    }
    const messages = [...(system.value.trim() ? [{ role: "developer", content: system.value }] : []),
      { role: "user", content: template.value }];
    const body = { name: form.elements.name.value,
      data_source_config: { type: "custom", item_schema: itemSchema, include_sample_schema: true },
      testing_criteria: [criterion],
      // the dashboard's own settings, kept with the eval so that its runs use them
      metadata: { file_id: file.value } };
    const kept = JSON.stringify(messages);
    if (kept.length <= 512) body.metadata.template = kept;  // metadata values are at most 512 characters
    const ev = await guarded(msg, () => call("/evals", { method: "POST", body }));
    if (ev) location.hash = `#/evals/${ev.id}`;
  });
  return form;
}

async function pageEval(main, id) {
  const ev = await call(`/evals/${id}`);
  const msg = h("div");
  const runForm = h("div");
  const compare = h("div", { id: "ev-compare" });
  const samples = h("section", { id: "ev-samples", "aria-live": "polite" });
  const criteria = ev.testing_criteria;
  main.replaceChildren(h("h1", {}, `Eval: ${ev.name || ev.id}`),
    h("p", { class: "muted" }, h("span", { class: "mono" }, ev.id), ` · criteria: ${criteria.map((c) => `${c.name} (${c.type})`).join(", ")}`),
    h("h2", {}, "New run"), runForm, msg, h("h2", {}, "Runs side by side"), compare, samples);

  const [names, files] = await Promise.all([guarded(runForm, models),
    listAll("/files?purpose=evals", 1000).catch(() => [])]);
  if (names && names.length) {
    const meta = ev.metadata || {};
    const model = modelSelect(names, { id: "run-model", name: "model" });
    const file = h("select", { id: "run-file", name: "file" },
      files.map((f) => h("option", { value: f.id, selected: f.id === meta.file_id }, `${f.filename} (${f.id})`)));
    const template = h("textarea", { id: "run-template", rows: "3", spellcheck: "false" },
      meta.template || JSON.stringify([{ role: "user", content: DEFAULT_TEMPLATE }]));
    const temperature = h("input", { id: "run-temperature", type: "number", min: "0", max: "2", step: "0.1", value: "0" });
    const maxTokens = h("input", { id: "run-max-tokens", type: "number", min: "1", value: "64" });
    const form = h("form", { class: "card", id: "run-form" },
      h("div", { class: "grid" }, h("label", {}, "Model", model), h("label", {}, "Rows", file),
        h("label", {}, "Temperature", temperature), h("label", {}, "Max tokens", maxTokens)),
      h("details", {}, h("summary", {}, "Prompt messages (JSON array; {{item.field}} is filled per row)"), template),
      h("div", { class: "row" }, h("button", { type: "submit", id: "run-start" }, "Start run")));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      let messages;
      try { messages = JSON.parse(template.value); if (!Array.isArray(messages)) throw new Error("not an array"); } catch (err) {
        msg.replaceChildren(inputError(`the prompt messages must be a JSON array: ${err.message}`, "data_source.input_messages.template"));
        return;
      }
      const body = { name: model.value, data_source: { type: "completions", model: model.value,
        source: { type: "file_id", id: file.value }, input_messages: { type: "template", template: messages },
        sampling_params: { temperature: Number(temperature.value), max_completion_tokens: Number(maxTokens.value) } } };
      if (await guarded(msg, () => call(`/evals/${id}/runs`, { method: "POST", body }))) refresh();
    });
    runForm.replaceChildren(form);
  }

  const pct = (p, f) => (p + f ? `${num((100 * p) / (p + f), 1)}%` : "–");
  async function refresh() {
    const runs = await guarded(compare, () => listAll(`/evals/${id}/runs`, 100));
    if (!runs) return true;
    compare.replaceChildren(runs.length ? table({ id: "runs" },
      ["Run", "Model", "Status", "Total", "Passed", "Failed", "Errored", ...criteria.map((c) => `${c.name} pass rate`), ""],
      runs.map((r) => {
        const per = Object.fromEntries(r.per_testing_criteria_results.map((x) => [x.testing_criteria, x]));
        const rc = r.result_counts;
        return h("tr", { "data-run": r.id },
          h("td", { class: "mono" }, r.id), h("td", {}, r.model || r.name), h("td", {}, badge(r.status),
            r.status === "failed" && r.error && r.error.message ? h("div", { class: "error" }, r.error.message) : null),
          h("td", { class: "total" }, num(rc.total)), h("td", { class: "passed" }, num(rc.passed)),
          h("td", { class: "failed" }, num(rc.failed)), h("td", { class: "errored" }, num(rc.errored)),
          criteria.map((c) => h("td", { class: "rate" }, per[c.id] ? pct(per[c.id].passed, per[c.id].failed) : "–")),
          h("td", {}, h("button", { type: "button", class: "quiet", "aria-label": `worst samples of ${r.id}`,
            onclick: () => showSamples(r) }, "Worst samples")));
      }))
      : h("p", { class: "muted", id: "runs-empty" }, "No runs yet: start one above, once per model to compare."));
    return runs.every((r) => RUN_DONE.includes(r.status));
  }

  async function showSamples(run) {
    samples.replaceChildren(h("h2", {}, `Worst samples: ${run.model || run.name}`), h("p", { class: "muted" }, "Loading…"));
    const items = await guarded(samples, () => listAll(`/evals/${id}/runs/${run.id}/output_items?status=fail`, 100));
    if (!items) return;
    const extra = await call(`/evals/${id}/runs/${run.id}/output_items?status=error&limit=100`).then((p) => p.data).catch(() => []);
    const all = [...items, ...extra];
    const total = (i) => i.results.reduce((s, r) => s + (Number(r.score) || 0), 0);
    all.sort((a, b) => total(a) - total(b));
    const output = (i) => (i.sample.error && i.sample.error.code ? `error: ${i.sample.error.message}`
      : (i.sample.output || []).map((m) => m.content || "").join("\n"));
    samples.replaceChildren(h("h2", {}, `Worst samples: ${run.model || run.name}`),
      all.length ? table({ id: "worst" }, ["Row", "Status", "Item", "Output", "Scores"],
        all.map((i) => h("tr", { "data-item": i.id }, h("td", {}, i.datasource_item_id), h("td", {}, badge(i.status)),
          h("td", {}, h("pre", {}, JSON.stringify(i.datasource_item, null, 1))),
          h("td", {}, h("pre", { class: "output" }, output(i))),
          h("td", {}, h("ul", { class: "scores" }, i.results.map((r) => h("li", {},
            `${r.name}: ${num(r.score, 3)} ${r.passed ? "✓" : "✗"}${r.error ? ` (${r.error.message || r.error})` : ""}`)))))))
        : h("p", { class: "muted", id: "worst-empty" }, "No failed samples."));
  }

  let done = false;
  every(1500, async () => { if (!done) done = await refresh(); });
  // a run started later restarts the polling
  runForm.addEventListener("submit", () => { done = false; });
}

// ------------------------------------------------------------------------------------------------
// Routing

async function route() {
  stopTimers();
  const main = document.getElementById("main");
  const path = location.hash.replace(/^#\/?/, "").split("?")[0];
  const [page, id] = path.split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("current", a.dataset.page === (page || "data"));
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    if (page === "jobs" && id) await pageJob(main, decodeURIComponent(id));
    else if (page === "jobs") await pageJobs(main);
    else if (page === "playground") await pagePlayground(main);
    else if (page === "compare") await pageCompare(main);
    else if (page === "evals" && id) await pageEval(main, decodeURIComponent(id));
    else if (page === "evals") await pageEvals(main);
    else await pageData(main);
  } catch (err) {
    main.replaceChildren(errorBox(err));
  }
  document.body.dataset.page = page || "data";
}

document.getElementById("key-button").addEventListener("click", async () => { if (await askKey(false)) route(); });
window.addEventListener("hashchange", route);
route();
