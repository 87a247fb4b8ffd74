"use strict";
// The task page, live: the server sends the whole task once, then only what changed
// (server-sent events, within a quarter of a second of the state file); the page keeps the
// trials in a map and redraws what their change touches, charts at most once a second.

const KEY = pageData().key;
const S = {trials: new Map(), subtasks: new Map(), verdicts: [], head: {}, space: {}, sort: {column: "rank", asc: true}, version: 0};
let chartsDrawnAt = 0, chartsDirty = false, drawnTrials = -1, importanceAt = 0, importanceCount = -1, showAll = false;
const PLOT = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
const LAYOUT = {margin: {l: 55, r: 15, t: 10, b: 40}, font: {size: 11}, hovermode: "closest"};

// ---------------------------------------------------------------- state from the stream
function apply(data) {
  if (data.reset) { S.trials.clear(); S.subtasks.clear(); S.verdicts = []; }
  if ((data.trials || []).length || (data.subtasks || []).length || (data.verdicts || []).length || data.reset) S.version += 1;
  const {trials, subtasks, verdicts, reset, ...head} = data;
  Object.assign(S.head, head);
  if (data.space) S.space = data.space;
  for (const t of trials || []) {
    const [number, state, value, std, params, finished, provider, verified, error] = t;
    S.trials.set(number, {number, state, value, std, params, finished, provider, verified, error});
  }
  for (const s of subtasks || []) S.subtasks.set(s.subtask_id, s);
  S.verdicts.push(...(verdicts || []));
  renderSoon();
}

// Several updates a second arrive while trials settle; the page redraws at most every half
// second (still within a second of the state file) and only the sections whose data changed:
// a headless chromium spent a quarter of a core redrawing on every event.
let renderedAt = 0, renderTimer = null;
function renderSoon() {
  if (renderTimer) return;
  renderTimer = setTimeout(() => { renderTimer = null; renderedAt = Date.now(); render(); },
    Math.max(0, 500 - (Date.now() - renderedAt)));
}

const drawn = new Map();
// Rebuild the element `id` only if `signature` differs from what it shows.
function changedSection(id, signature) {
  if (drawn.get(id) === signature) return false;
  drawn.set(id, signature);
  return true;
}

function connect() {
  const source = new EventSource(`/api/events/${KEY}`);
  source.onmessage = event => apply(JSON.parse(event.data));
  source.onerror = () => { document.getElementById("task-error").textContent = "lost the connection to the app; retrying…"; };
  source.onopen = () => { document.getElementById("task-error").textContent = ""; };
}

// ---------------------------------------------------------------- derived figures
function better(a, b) { return S.head.direction === "minimize" ? a < b : a > b; }
function complete() { return [...S.trials.values()].filter(t => t.state === "complete"); }
function ranked() {
  const sign = S.head.direction === "minimize" ? 1 : -1;
  const rows = complete().sort((a, b) => sign * (a.value - b.value) || (a.verified === "full" ? -1 : 0) - (b.verified === "full" ? -1 : 0) || a.number - b.number);
  let rank = 0, last = null;
  rows.forEach((r, i) => { const key = Math.round(r.value * 1e12); if (key !== last) { rank = i + 1; last = key; } r.rank = rank; });
  return rows;
}
function byFinish() { return complete().sort((a, b) => (a.finished || 0) - (b.finished || 0) || a.number - b.number); }

function eta(settled, total) {
  const times = [...S.trials.values()].map(t => t.finished).filter(Boolean).sort((a, b) => a - b);
  if (times.length < 2 || settled >= total) return null;
  const window = times.slice(-50);
  const rate = (window.length - 1) / Math.max(1e-6, window[window.length - 1] - window[0]);
  return (total - settled) / rate;
}

// ---------------------------------------------------------------- rendering
function render() {
  const h = S.head;
  if (h.status === "broken") return renderBroken();
  if (changedSection("head", JSON.stringify([h.name, h.status, h.status_note, h.actions, h.backend, h.workers]))) {
    document.getElementById("task-name").textContent = h.name;
    const badge = document.getElementById("task-status");
    badge.textContent = h.status; badge.className = `badge ${h.status}`; badge.dataset.status = h.status; badge.title = h.status_note || "";
    document.getElementById("task-actions").replaceChildren(...actionButtons(h, verb => verb === "delete" ? (window.location.href = "/tasks") : null));
    const bits = [`${h.algorithm} search`, h.scoring ? `scoring: ${h.scoring} (${h.direction})` : null, h.backend ? `backend: ${h.backend}` : null,
      h.workers ? `${h.workers} workers` : null, h.created_at ? `created ${fmtTime(h.created_at)}` : null, h.status_note || null, `folder: ${h.key}`];
    document.getElementById("task-meta").textContent = bits.filter(Boolean).join(" · ");
  }
  renderProgress();
  renderLeaderboard();
  renderProviders();
  renderVerification();
  renderDownloads();
  if (changedSection("charts", S.version)) {
    chartsDirty = true;
    drawChartsSoon();
  }
}

function renderBroken() {
  document.getElementById("task-name").textContent = S.head.key;
  const badge = document.getElementById("task-status");
  badge.textContent = "broken"; badge.className = "badge broken"; badge.dataset.status = "broken";
  document.getElementById("task-error").textContent = S.head.status_note;
  document.querySelectorAll("main > section.card").forEach(section => { section.hidden = true; });  // nothing to show
  document.getElementById("task-actions").replaceChildren(...actionButtons(S.head, () => (window.location.href = "/tasks")));
}

function stat(label, value, id) { return el("div", {id}, el("b", {}, value), el("span", {}, label)); }

function renderProgress() {
  const all = [...S.trials.values()];
  const done = all.filter(t => t.state === "complete").length, failed = all.filter(t => t.state === "failed").length;
  const running = all.filter(t => t.state === "running").length, total = S.head.n_trials || 0;
  const settled = done + failed;
  document.getElementById("progress-bar").style.width = `${total ? Math.min(100, 100 * settled / total) : 0}%`;
  const started = Math.min(...[...S.subtasks.values()].map(s => s.created_at).filter(Boolean), Infinity);
  const ended = Math.max(...all.map(t => t.finished || 0), 0);
  const live = ["running", "starting", "aborting"].includes(S.head.status);
  const elapsed = isFinite(started) ? (live ? Date.now() / 1000 : ended) - started : null;
  const left = live ? eta(settled, total) : null;
  const best = ranked()[0];
  const signature = [settled, total, done, failed, running, fmtDuration(elapsed), left === null ? "" : fmtDuration(left),
    best ? `${best.number}:${best.value}:${best.verified}` : ""].join("|");
  if (!changedSection("progress", signature)) return;
  document.getElementById("progress-stats").replaceChildren(
    stat("trials settled", `${settled} / ${total}`, "stat-settled"), stat("complete", done, "stat-complete"),
    stat("failed", failed, "stat-failed"), stat("running", running, "stat-running"),
    stat("elapsed", fmtDuration(elapsed) || "–", "stat-elapsed"), stat("ETA", left === null ? "–" : fmtDuration(left), "stat-eta"),
    stat(`best ${S.head.scoring || "score"}`, best ? fmtNum(best.value, 6) : "–", "stat-best"));
  const box = document.getElementById("best-box");
  box.replaceChildren(best ? el("div", {}, el("strong", {}, `Best: trial ${best.number}`), " ",
    el("span", {id: "best-score", "data-value": String(best.value)}, fmtNum(best.value, 10)),
    best.std !== null ? ` ± ${fmtNum(best.std, 3)}` : "", best.verified === "full" ? el("span", {class: "pill ok"}, "re-run in full") :
      el("span", {class: "pill"}, best.verified ? `${best.verified}-checked` : "not re-run yet"),
    el("div", {class: "hint"}, Object.entries(best.params).map(([k, v]) => `${k} = ${fmtValue(v)}`).join(", "))) : "");
}

const LEADER_LIMIT = 100;
function renderLeaderboard(force) {
  const names = Object.keys(S.space);
  const extra = [...new Set(complete().flatMap(t => Object.keys(t.params)))].filter(n => !names.includes(n));
  const params = names.concat(extra);
  const columns = [["rank", r => r.rank], ["trial", r => r.number], ["mean", r => r.value], ["std", r => r.std],
    ...params.map(p => [p, r => r.params[p]]), ["provider", r => r.provider], ["verified", r => r.verified || ""]];
  const table = document.getElementById("leaderboard");
  const head = () => table.tHead.replaceChildren(el("tr", {}, ...columns.map(([name]) => el("th", {
    class: (["rank", "trial", "mean", "std"].includes(name) ? "num " : "") + (S.sort.column === name ? `sorted ${S.sort.asc ? "asc" : ""}` : ""),
    onclick: () => { S.sort = {column: name, asc: S.sort.column === name ? !S.sort.asc : true}; renderLeaderboard(true); }}, name))));
  const rows = ranked();
  const getter = (columns.find(c => c[0] === S.sort.column) || columns[0])[1];
  rows.sort((a, b) => {
    const x = getter(a), y = getter(b);
    const order = x === y ? 0 : x === undefined || x === null ? 1 : y === undefined || y === null ? -1 : x < y ? -1 : 1;
    return (S.sort.asc ? order : -order) || a.rank - b.rank;
  });
  const shown = showAll ? rows : rows.slice(0, LEADER_LIMIT);
  const failed = [...S.trials.values()].filter(t => t.state === "failed");
  const signature = [S.sort.column, S.sort.asc, ...shown.map(r => `${r.number}:${r.rank}:${r.verified}`)].join("|");
  if (changedSection("leaderboard", signature) || force) {  // a new trial outside the shown rows changes nothing
    head();
    table.tBodies[0].replaceChildren(...shown.map(r => el("tr", {class: r.rank === 1 ? "best" : ""},
    ...columns.map(([name, get]) => el("td", {class: ["rank", "trial", "mean", "std"].includes(name) ? "num" : ""},
      name === "mean" ? fmtNum(get(r), 6) : name === "std" ? fmtNum(get(r), 3) : get(r) === undefined ? "" : fmtValue(get(r)))))));
  }
  if (changedSection("leader-note", `${rows.length}|${showAll}`)) {
    document.getElementById("leader-note").replaceChildren(`${rows.length} complete trials; click a column to sort. `,
    rows.length > LEADER_LIMIT ? el("button", {class: "secondary small", onclick: () => { showAll = !showAll; renderLeaderboard(true); }},
      showAll ? `show the first ${LEADER_LIMIT}` : `show all ${rows.length}`) : "");
  }
  if (!changedSection("failed", failed.length)) return;
  const counts = new Map();
  for (const t of failed) counts.set(t.error || "no error text", (counts.get(t.error || "no error text") || 0) + 1);
  document.getElementById("errors-box").replaceChildren(...(failed.length ? [el("h3", {}, `Failed trials: ${failed.length}`),
    el("ul", {}, ...[...counts].sort((a, b) => b[1] - a[1]).slice(0, 10).map(([error, n]) => el("li", {}, `${n} × `, el("code", {}, error))))] : []));
}

const SUBTASK_STATES = ["accepted", "rejected", "failed", "discarded", "pending"];
function renderProviders() {
  // Subtask states as the store has them; a state a newer store adds gets a column of its own.
  const states = SUBTASK_STATES.concat([...new Set([...S.subtasks.values()].map(s => s.state))].filter(x => !SUBTASK_STATES.includes(x)));
  const rows = new Map();
  const row = p => rows.get(p) || rows.set(p, {provider: p, trials: 0, full: 0, spot: 0, wrong: 0, ...Object.fromEntries(states.map(x => [x, 0]))}).get(p);
  for (const s of S.subtasks.values()) row(s.provider)[s.state] += 1;
  for (const t of S.trials.values()) if (t.provider && t.state !== "running") { const r = row(t.provider); r.trials += 1; if (t.verified === "full") r.full += 1; else if (t.verified) r.spot += 1; }
  for (const v of S.verdicts) if (!v.ok) row(v.provider).wrong += 1;
  const bans = S.head.bans || {}, dropped = S.head.dropped || {}, billed = (S.head.costs || {}).billed_by_provider || {};
  const currency = (S.head.costs || {}).currency || "GLM";
  if (!changedSection("providers", JSON.stringify([[...rows.values()], bans, dropped, S.head.costs]))) return;
  const head = ["provider", ...states.map(x => `subtasks ${x}`), "trials", "re-run in full", "spot-checked", "wrong results", "status", `billed (${currency})`];
  const table = document.getElementById("providers");
  table.tHead.replaceChildren(el("tr", {}, ...head.map(h => el("th", {}, h))));
  table.tBodies[0].replaceChildren(...[...rows.values()].sort((a, b) => a.provider.localeCompare(b.provider, undefined, {numeric: true})).map(r => el("tr", {"data-provider": r.provider},
    el("td", {}, r.provider), ...[...states.map(x => r[x]), r.trials, r.full, r.spot, r.wrong].map(n => el("td", {class: "num"}, n)),
    el("td", {}, bans[r.provider] ? el("span", {class: "pill bad", title: bans[r.provider]}, "banned: " + bans[r.provider])
      : dropped[r.provider] ? el("span", {class: "pill bad", title: dropped[r.provider]}, "dropped: " + dropped[r.provider]) : "ok"),
    el("td", {class: "num"}, billed[r.provider] !== undefined ? fmtNum(billed[r.provider], 6) : ""))));
  const costs = S.head.costs || {};
  document.getElementById("costs-note").textContent = costs.spent !== undefined
    ? `Golem: ${fmtNum(costs.spent, 6)} ${currency} spent of a ${fmtNum(costs.budget)} ${currency} budget.` : "";
}

function renderVerification() {
  const settled = [...S.trials.values()].filter(t => t.state !== "running");
  const full = settled.filter(t => t.verified === "full").length, spot = settled.filter(t => t.verified && t.verified !== "full").length;
  if (!changedSection("verification", [settled.length, full, spot, S.verdicts.length, S.subtasks.size].join("|"))) return;
  const rejected = S.verdicts.filter(v => !v.ok);
  const rejectedTrials = new Set(rejected.map(v => v.subtask_id));
  const rerun = S.verdicts.reduce((a, v) => a + (v.seconds || 0), 0);
  const compute = [...S.subtasks.values()].reduce((a, s) => a + (s.compute_time || 0), 0);
  const trialsIn = [...rejectedTrials].reduce((a, id) => a + ((S.subtasks.get(id) || {}).trials || 0), 0);
  const options = ((S.head.definition || {}).options || {}).verification || {};
  document.getElementById("verification-summary").replaceChildren(
    `${full} trials re-run in full, ${spot} spot-checked, ${settled.length - full - spot} unverified; `,
    el("span", {id: "rejected-count"}, `${trialsIn} trials rejected in ${rejectedTrials.size} subtasks`),
    `; re-run overhead ${compute ? (100 * rerun / compute).toFixed(1) : "0.0"}% of provider compute (${fmtNum(rerun, 3)} s of ${fmtNum(compute, 3)} s).`,
    options.verify_best === false ? el("strong", {class: "error"}, " The best configuration is NOT verified (verification.verify_best is false).") : "");
  const table = document.getElementById("verdicts");
  table.tHead.replaceChildren(el("tr", {}, ...["#", "subtask", "provider", "check", "re-run by", "verdict", "evaluations", "seconds", "reason"].map(h => el("th", {}, h))));
  table.tBodies[0].replaceChildren(...S.verdicts.slice(-300).reverse().map(v => el("tr", {},
    el("td", {class: "num"}, v.id), el("td", {}, v.subtask_id), el("td", {}, v.provider), el("td", {}, v.kind), el("td", {}, v.by || "requestor"),
    el("td", {}, el("span", {class: v.ok ? "pill ok" : "pill bad"}, v.ok ? "agrees" : "rejected")), el("td", {class: "num"}, v.checked),
    el("td", {class: "num"}, fmtNum(v.seconds, 3)), el("td", {}, v.reason || ""))));
}

function renderDownloads() {
  const names = (S.head.downloads || []).concat(["task.json"]);
  if (!changedSection("downloads", names.join("|"))) return;
  document.getElementById("downloads").replaceChildren(...names.map(n => el("a", {href: `/download/${KEY}?file=${encodeURIComponent(n)}`, download: n, "data-file": n}, n)));
}

document.getElementById("log-box").addEventListener("toggle", async event => {
  if (!event.target.open) return;
  const response = await fetch(`/api/log/${KEY}`, {credentials: "same-origin"});
  document.getElementById("log").textContent = (await response.text()) || "(no log: this task was not started from the app)";
});

// ---------------------------------------------------------------- charts (plotly.js, served by the app)
function drawChartsSoon() {
  const wait = Math.max(0, 1000 - (Date.now() - chartsDrawnAt));
  if (drawChartsSoon.timer) return;
  drawChartsSoon.timer = setTimeout(() => { drawChartsSoon.timer = null; if (chartsDirty && !document.hidden) drawCharts(); }, wait);
}
document.addEventListener("visibilitychange", () => { if (!document.hidden && chartsDirty) drawChartsSoon(); });

function drawCharts() {
  chartsDirty = false;
  chartsDrawnAt = Date.now();
  const rows = byFinish();
  if (rows.length !== drawnTrials) {
    drawnTrials = rows.length;
    drawCurve(rows);
    drawSlices(rows);
  }
  const live = ["running", "starting", "aborting"].includes(S.head.status);
  if (rows.length >= 3 && rows.length !== importanceCount && (!live || Date.now() - importanceAt > 10000)) drawImportance(rows.length);
}

function drawCurve(rows) {
  const y = rows.map(r => r.value);
  let best = null;
  const bestSoFar = y.map(v => (best = best === null || better(v, best) ? v : best));
  const x = rows.map((_, i) => i + 1);
  Plotly.react("chart-curve", [
    {x, y, mode: "markers", type: "scatter", name: "trial", marker: {size: 5, opacity: 0.5, color: "#5b7fd6"},
      text: rows.map(r => `trial ${r.number}`), hoverinfo: "text+y"},
    {x, y: bestSoFar, mode: "lines", type: "scatter", name: "best so far", line: {shape: "hv", color: "#c0392b", width: 2}},
  ], {...LAYOUT, xaxis: {title: {text: "trials finished"}}, yaxis: {title: {text: S.head.scoring || "score"}}, legend: {orientation: "h", y: 1.1}}, PLOT);
}

function drawSlices(rows) {
  const box = document.getElementById("slices");
  for (const [name, info] of Object.entries(S.space)) {
    let div = document.getElementById(`slice-${name}`);
    if (!div) { div = el("div", {id: `slice-${name}`}); box.append(div); }
    const have = rows.filter(r => name in r.params);
    Plotly.react(div, [{x: have.map(r => r.params[name]), y: have.map(r => r.value), mode: "markers", type: "scatter",
      marker: {size: 6, opacity: 0.6, color: have.map(r => r.number), colorscale: "Blues", showscale: false},
      text: have.map(r => `trial ${r.number}`), hoverinfo: "text+x+y"}],
    {...LAYOUT, title: {text: name + (info.when ? " (conditional)" : ""), font: {size: 12}}, margin: {l: 50, r: 10, t: 30, b: 35},
      xaxis: {type: info.kind === "categorical" ? "category" : info.log ? "log" : "linear"}, yaxis: {title: {text: S.head.scoring || "score"}}}, PLOT);
  }
}

async function drawImportance(count) {
  importanceAt = Date.now();
  importanceCount = count;
  const response = await fetch(`/api/importance/${KEY}`, {credentials: "same-origin"});
  if (!response.ok) return;
  const data = await response.json();
  const entries = Object.entries(data.importances || {}).sort((a, b) => a[1] - b[1]);
  const note = document.getElementById("importance-note");
  note.textContent = "Each parameter against the score (darker: later trials). " +
    (entries.length ? `Importance: Optuna's PED-ANOVA over ${data.trials} complete trials. ` : "") +
    (data.left_out && data.left_out.length ? `Left out (not in every trial): ${data.left_out.join(", ")}. ` : "") + (data.note || "");
  if (!entries.length) return;
  document.getElementById("chart-importance").hidden = false;
  Plotly.react("chart-importance", [{type: "bar", orientation: "h", x: entries.map(e => e[1]), y: entries.map(e => e[0]), marker: {color: "#5b7fd6"}}],
    {...LAYOUT, title: {text: "parameter importance", font: {size: 12}}, margin: {l: 110, r: 15, t: 30, b: 35}}, PLOT);
}

connect();
