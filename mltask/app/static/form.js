"use strict";
// The new-task page: a form generated from the task type's JSON Schema, bound to one task
// object; the JSON box shows exactly that object, and every change is checked by the server
// with the CLI's own code (field path and fix shown next to the field).

const D = pageData();
const DEFS = D.schema.$defs || {};
let task = {};                 // what the form stands for
let draft = null;              // server-side folder of this task's uploads
let files = [];                // the uploads: {name, size, kind, columns?, arrays?}
let confirmed = false;         // the user read the script / module list and accepted it
let jsonEdited = false;        // the JSON box was typed in: check its text, not the form's
let checkSeq = 0;

// Paths drawn by widgets of their own; everything else comes from the schema as it is.
const CUSTOM = {
  "type": () => null,
  "resources": renderResources,
  "options.estimator": renderModel,
  "options.script": () => null,          // part of the model widget
  "options.dataset": renderDataset,
  "options.search_space": renderSpace,
  "bid": () => null,                     // in the "Run on" golem panel
  "options.golem": () => null,           // likewise
};
const OPEN_GROUPS = new Set(["options", "options.cv"]);

// ---------------------------------------------------------------- schema and paths
function deref(s) {
  while (s && s.$ref) s = DEFS[s.$ref.split("/").pop()];
  return s || {};
}
function variants(s) {
  const list = s.anyOf ? s.anyOf.map(deref) : [deref(s)];
  return list.filter(v => v.type !== "null");
}
function isObject(s) { return s.type === "object" && s.properties; }
function getAt(path) { return path.reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), task); }
function setAt(path, value) {
  let o = task;
  for (const k of path.slice(0, -1)) { if (typeof o[k] !== "object" || o[k] === null || Array.isArray(o[k])) o[k] = {}; o = o[k]; }
  o[path[path.length - 1]] = value;
}
function delAt(path) {
  const parents = [task];
  for (const k of path.slice(0, -1)) { const next = parents[parents.length - 1][k]; if (!next || typeof next !== "object") return; parents.push(next); }
  delete parents[parents.length - 1][path[path.length - 1]];
  for (let i = parents.length - 1; i > 1; i--) {  // an emptied group goes too (options stays)
    if (Object.keys(parents[i]).length === 0) delete parents[i - 1][path[i - 1]]; else break;
  }
}

// Text typed into a field, as the JSON value the schema wants; what does not fit is kept as
// text so the server names the field and says what is wrong.
function parseInput(text, schema) {
  const kinds = variants(schema).map(v => v.type);
  const t = text.trim();
  if (t === "") return undefined;
  if ((kinds.includes("integer") && /^-?\d+$/.test(t)) || (kinds.includes("number") && t !== "" && isFinite(Number(t)))) return Number(t);
  if (kinds.includes("array")) return t.split(",").map(x => x.trim()).filter(x => x);
  if (kinds.includes("boolean") && (t === "true" || t === "false")) return t === "true";
  return kinds.includes("string") || kinds.length === 0 ? text : text;
}
// A scalar choice or fixed value: numbers, true/false/null as such, anything else a string.
function parseScalar(t) {
  t = t.trim();
  if (t === "") return "";
  if (t === "true" || t === "false") return t === "true";
  if (t === "null") return null;
  if (isFinite(Number(t))) return Number(t);
  if (/^".*"$/.test(t)) return t.slice(1, -1);
  return t;
}
function scalarText(v) { return v === null ? "null" : typeof v === "string" && (isFinite(Number(v)) || ["true", "false", "null"].includes(v)) && v.trim() !== "" ? JSON.stringify(v) : String(v); }

// ---------------------------------------------------------------- generic fields
function fieldRow(path, schema, required) {
  const s = variants(schema)[0] || {};
  const id = "f-" + path.join("-");
  const value = getAt(path);
  const def = schema.default !== undefined ? schema.default : s.default;
  let input;
  const choices = s.enum || (s.type === "boolean" ? [true, false] : null);
  if (choices) {
    input = el("select", {id}, el("option", {value: ""}, def !== undefined ? `default (${JSON.stringify(def)})` : "(none)"),
      ...choices.map(c => el("option", {value: JSON.stringify(c), selected: value === c}, String(c))));
    input.addEventListener("change", () => { input.value === "" ? delAt(path) : setAt(path, JSON.parse(input.value)); changed(); });
  } else {
    const shown = value === undefined ? "" : Array.isArray(value) ? value.join(", ") : String(value);
    input = el("input", {id, value: shown, placeholder: def !== undefined && def !== null ? (Array.isArray(def) ? def.join(", ") : String(def)) : ""});
    input.addEventListener("input", () => { const v = parseInput(input.value, schema); v === undefined ? delAt(path) : setAt(path, v); changed(); });
  }
  return el("div", {class: "field", "data-field": path.join(".")},
    el("label", {for: id}, path[path.length - 1] + (required ? " *" : "")), input,
    schema.description ? el("div", {class: "desc"}, schema.description) : null, el("div", {class: "err"}));
}

function renderProps(container, schema, path) {
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const full = path.concat(name), key = full.join(".");
    if (CUSTOM[key]) { const node = CUSTOM[key](prop, full); if (node) container.append(node); continue; }
    const inner = variants(prop);
    if (inner.length === 1 && isObject(inner[0])) {
      const group = el("details", {class: "group", "data-field": key, open: OPEN_GROUPS.has(key)},
        el("summary", {}, key), prop.description ? el("div", {class: "desc"}, prop.description) : null);
      renderProps(group, inner[0], full);
      container.append(group);
    } else {
      container.append(fieldRow(full, prop, required.has(name)));
    }
  }
}

function renderForm() {
  const root = document.getElementById("generated");
  const section = el("section", {class: "card", id: "fields"}, el("h2", {}, "The task"));
  renderProps(section, D.schema, []);
  root.replaceChildren(section);
  renderGolem();
  showJson();
}

// ---------------------------------------------------------------- uploads
async function ensureDraft() {
  if (!draft) draft = (await post("/api/draft")).draft;
  return draft;
}

async function upload(file, errBox) {
  errBox.textContent = "";
  if (file.size > D.max_upload_bytes) {
    errBox.textContent = `${file.name} is larger than the upload limit of ${D.max_upload_bytes / 1e6} MB (mltask app --max-upload-mb)`;
    return null;
  }
  await ensureDraft();
  let response;
  try {
    response = await fetch(`/api/upload?draft=${draft}&name=${encodeURIComponent(file.name)}`, {
      method: "POST", credentials: "same-origin", body: file,
      headers: {"x-csrf-token": CSRF, "content-type": "application/octet-stream"}});
  } catch (e) {
    errBox.textContent = `${file.name}: the upload was refused or broke off (limit ${D.max_upload_bytes / 1e6} MB)`;
    return null;
  }
  const data = await response.json();
  if (!response.ok) { errBox.textContent = data.errors.map(e => e.message).join("\n"); return null; }
  files = data.files;
  addResource(data.file.name);
  return data.file;
}

function addResource(name) {
  const list = task.resources || [];
  if (!list.includes(name)) task.resources = list.concat([name]);
}

function fileInput(accept, errBox, onDone) {
  const input = el("input", {type: "file", accept, hidden: true});
  input.addEventListener("change", async () => {
    if (!input.files.length) return;
    const info = await upload(input.files[0], errBox);
    input.value = "";
    if (info) onDone(info);
  });
  return el("label", {class: "file-button secondary"}, "upload…", input);
}

function renderResources(schema, path) {
  const list = el("ul", {class: "files"});
  for (const name of task.resources || []) {
    const info = files.find(f => f.name === name);
    list.append(el("li", {}, name, info ? el("span", {class: "hint"}, ` ${(info.size / 1e3).toFixed(1)} kB`)
      : el("span", {class: "error"}, " (not uploaded)"),
      el("button", {class: "secondary small", type: "button", onclick: async () => {
        task.resources = task.resources.filter(r => r !== name);
        if (!task.resources.length) delete task.resources;
        if (draft) files = (await post("/api/upload/remove", {draft, name})).files;
        rerender();
      }}, "remove")));
  }
  const err = el("div", {class: "err"});
  return el("div", {class: "field", "data-field": "resources"}, el("label", {}, "resources"),
    el("div", {}, list, fileInput("", err, () => rerender())),
    el("div", {class: "desc"}, schema.description + " Upload them here: a task sends providers only the files uploaded with it."), err);
}

// ---------------------------------------------------------------- model: estimator, pipeline or script
function modelKind() {
  const o = task.options || {};
  if (o.script) return "script";
  if (o.estimator && typeof o.estimator === "object") return o.estimator.class ? "object" : "pipeline";
  return "estimator";
}

function renderModel() {
  const kind = modelKind();
  const o = task.options || {};
  const box = el("div", {class: "field", "data-field": "options.estimator"}, el("label", {}, "model"));
  const kinds = [["estimator", "a scikit-learn estimator"], ["pipeline", "a pipeline of steps"], ["script", "a training script"]];
  if (kind === "object") kinds.splice(2, 0, ["object", "an estimator object (JSON)"]);
  const radios = el("div", {class: "choices"}, ...kinds
    .map(([k, label]) => el("label", {}, el("input", {type: "radio", name: "model-kind", value: k, checked: kind === k, onchange: () => {
      delAt(["options", "script"]); delAt(["options", "estimator"]);
      if (k === "pipeline") setAt(["options", "estimator"], {pipeline: [["scaler", "sklearn.preprocessing.StandardScaler"], ["model", ""]]});
      if (k === "script") setAt(["options", "script"], {file: ""});
      rerender();
    }}), " " + label)));
  const body = el("div", {class: "sub"});
  if (kind === "estimator") {
    const input = el("input", {id: "f-options-estimator", value: typeof o.estimator === "string" ? o.estimator : "", placeholder: "sklearn.svm.SVC", list: "estimators"});
    input.addEventListener("input", () => { input.value.trim() ? setAt(["options", "estimator"], input.value.trim()) : delAt(["options", "estimator"]); changed(); });
    body.append(input, estimatorList());
  } else if (kind === "object") {
    // {"class": ..., "params": {...}}, nested (a template, a GolemSearchCV task): edited as the JSON it is
    const area = el("textarea", {id: "f-options-estimator", class: "wide", rows: 8}, JSON.stringify(o.estimator, null, 1));
    const err = el("div", {class: "err"});
    area.addEventListener("input", () => {
      try { setAt(["options", "estimator"], JSON.parse(area.value)); err.textContent = ""; changed(); }
      catch (e) { err.textContent = `not JSON yet: ${e.message}`; }
    });
    body.append(area, err);
  } else if (kind === "pipeline") {
    const steps = o.estimator.pipeline;
    steps.forEach((step, i) => {
      const name = el("input", {value: step[0], class: "name", placeholder: "step name"});
      const path = el("input", {value: step[1], class: "wide", placeholder: "sklearn.svm.SVC", list: "estimators"});
      name.addEventListener("input", () => { step[0] = name.value; changed(); });
      path.addEventListener("input", () => { step[1] = path.value; changed(); });
      body.append(el("div", {class: "row", "data-field": `options.estimator.pipeline.${step[0]}`}, name, path,
        el("button", {type: "button", class: "secondary small", onclick: () => { steps.splice(i, 1); rerender(); }}, "remove")));
    });
    body.append(el("button", {type: "button", class: "secondary small", onclick: () => { steps.push([`step${steps.length + 1}`, ""]); rerender(); }}, "add a step"), estimatorList());
  } else {
    const spec = deref(variants(deref(D.schema.properties.options).properties.script)[0]);
    const scripts = files.filter(f => f.kind === "script").map(f => f.name);
    const err = el("div", {class: "err"});
    const select = el("select", {id: "f-options-script-file"}, el("option", {value: ""}, "(upload a .py file)"),
      ...scripts.map(n => el("option", {value: n, selected: o.script.file === n}, n)));
    select.addEventListener("change", () => { setAt(["options", "script", "file"], select.value); changed(); });
    body.append(el("div", {class: "field", "data-field": "options.script.file"}, el("label", {}, "file *"),
      el("div", {class: "row"}, select, fileInput(".py,text/x-python", err, info => { setAt(["options", "script", "file"], info.name); rerender(); })),
      el("div", {class: "desc"}, spec.properties.file.description), err));
    const rest = {...spec, properties: {function: spec.properties.function, direction: spec.properties.direction}, required: []};
    renderProps(body, rest, ["options", "script"]);
  }
  box.append(el("div", {}, radios, body), el("div", {class: "err"}));
  return box;
}

function estimatorList() {
  const names = ["sklearn.svm.SVC", "sklearn.svm.SVR", "sklearn.linear_model.LogisticRegression", "sklearn.linear_model.Ridge",
    "sklearn.ensemble.RandomForestClassifier", "sklearn.ensemble.RandomForestRegressor", "sklearn.ensemble.HistGradientBoostingClassifier",
    "sklearn.ensemble.HistGradientBoostingRegressor", "sklearn.neighbors.KNeighborsClassifier", "sklearn.tree.DecisionTreeClassifier",
    "sklearn.preprocessing.StandardScaler", "sklearn.decomposition.PCA"];
  return el("datalist", {id: "estimators"}, ...names.map(n => el("option", {value: n})));
}

// ---------------------------------------------------------------- dataset
function renderDataset(schema) {
  const spec = deref(schema);
  const ds = (task.options || {}).dataset || {};
  const kind = ds.csv !== undefined ? "csv" : ds.npz !== undefined ? "npz" : "builtin";
  const err = el("div", {class: "err"});
  const radios = el("div", {class: "choices"}, ...[["builtin", "built-in"], ["csv", "CSV file"], ["npz", "NPZ file"]].map(([k, label]) =>
    el("label", {}, el("input", {type: "radio", name: "dataset-kind", value: k, checked: kind === k, onchange: () => {
      setAt(["options", "dataset"], k === "builtin" ? {builtin: spec.properties.builtin.anyOf[0].enum[0]} : {[k]: ""});
      rerender();
    }}), " " + label)));
  const body = el("div", {class: "sub"});
  if (kind === "builtin") {
    const select = el("select", {id: "f-options-dataset-builtin"}, ds.builtin ? null : el("option", {value: ""}, "(choose a dataset)"),
      ...deref(spec.properties.builtin.anyOf[0]).enum.map(n => el("option", {value: n, selected: ds.builtin === n}, n)));
    select.addEventListener("change", () => { select.value ? setAt(["options", "dataset"], {builtin: select.value}) : delAt(["options", "dataset"]); changed(); });
    body.append(select);
  } else {
    const mine = files.filter(f => f.kind === kind);
    const select = el("select", {id: `f-options-dataset-${kind}`}, el("option", {value: ""}, `(upload a .${kind} file)`),
      ...mine.map(f => el("option", {value: f.name, selected: ds[kind] === f.name}, f.name)));
    select.addEventListener("change", () => { setAt(["options", "dataset", kind], select.value); rerender(); });
    body.append(el("div", {class: "row"}, select, fileInput(`.${kind}`, err, info => {
      setAt(["options", "dataset"], kind === "csv" ? {csv: info.name, target: ""} : {npz: info.name});
      rerender();
    })));
    const chosen = mine.find(f => f.name === ds[kind]);
    if (kind === "csv") {
      const columns = chosen ? chosen.columns : [];
      const target = el("select", {id: "f-options-dataset-target"}, el("option", {value: ""}, columns.length ? "(pick the target column)" : "(upload the CSV first)"),
        ...columns.map(c => el("option", {value: c, selected: ds.target === c}, c)));
      target.addEventListener("change", () => { setAt(["options", "dataset", "target"], target.value); changed(); });
      body.append(el("div", {class: "field", "data-field": "options.dataset.target"}, el("label", {for: target.id}, "target"), target,
        el("div", {class: "desc"}, spec.properties.target.description), el("div", {class: "err"})));
    } else if (chosen) {
      body.append(el("div", {class: "hint"}, `arrays in ${chosen.name}: ${chosen.arrays.join(", ") || "none"} (X and y are needed)`));
    }
  }
  return el("div", {class: "field", "data-field": "options.dataset"}, el("label", {}, "dataset *"),
    el("div", {}, radios, body), el("div", {class: "desc"}, schema.description || spec.description || ""), err);
}

// ---------------------------------------------------------------- search space
function spaceRows() {
  const space = (task.options || {}).search_space || {};
  return Object.entries(space).map(([name, spec]) => {
    if (Array.isArray(spec)) spec = {type: "categorical", choices: spec};
    else if (spec === null || typeof spec !== "object") spec = {type: "fixed", value: spec};
    return [name, spec];
  });
}
function writeSpace(rows) { setAt(["options", "search_space"], Object.fromEntries(rows)); }

function renderSpace(schema) {
  const rows = spaceRows();
  writeSpace(rows);  // shorthands become the full form the editor shows
  const box = el("div", {id: "space"});
  rows.forEach((row, i) => box.append(paramCard(rows, i)));
  box.append(el("button", {type: "button", class: "secondary", id: "add-param", onclick: () => {
    let n = rows.length + 1; while (rows.some(r => r[0] === `param${n}`)) n++;
    rows.push([`param${n}`, {type: "float", low: 0, high: 1}]); writeSpace(rows); rerender();
  }}, "add a parameter"));
  return el("div", {class: "field", "data-field": "options.search_space"}, el("label", {}, "search_space *"),
    el("div", {}, box), el("div", {class: "desc"}, (schema.description || "") +
      " Names address estimator parameters the scikit-learn way (svc__C for step svc). A condition makes a parameter apply only when earlier ones took some values."),
    el("div", {class: "err"}));
}

function paramCard(rows, i) {
  const [name, spec] = rows[i];
  const base = `options.search_space.${name}`;
  const update = () => { writeSpace(rows); changed(); };
  const nameInput = el("input", {class: "name", value: name, "aria-label": "parameter name"});
  nameInput.addEventListener("change", () => { rows[i][0] = nameInput.value.trim(); writeSpace(rows); rerender(); });
  const type = el("select", {"aria-label": "type"}, ...["int", "float", "categorical", "fixed"].map(t => el("option", {value: t, selected: spec.type === t}, t)));
  type.addEventListener("change", () => {
    const when = spec.when;
    const fresh = {int: {type: "int", low: 1, high: 10}, float: {type: "float", low: 0, high: 1},
      categorical: {type: "categorical", choices: ["a", "b"]}, fixed: {type: "fixed", value: 0}}[type.value];
    rows[i][1] = when ? {...fresh, when} : fresh; writeSpace(rows); rerender();
  });
  const numberInput = (key, label) => {
    const input = el("input", {value: spec[key] === undefined ? "" : spec[key], "aria-label": `${name} ${key}`, placeholder: label});
    input.addEventListener("input", () => {
      const t = input.value.trim();
      if (t === "") delete spec[key]; else spec[key] = isFinite(Number(t)) ? Number(t) : t;
      update();
    });
    return el("span", {"data-field": `${base}.${key}`}, el("label", {}, key + " "), input);
  };
  const controls = el("div", {class: "row"}, nameInput, type);
  if (spec.type === "int" || spec.type === "float") {
    const log = el("input", {type: "checkbox", checked: !!spec.log, "aria-label": `${name} log`});
    log.addEventListener("change", () => { if (log.checked) spec.log = true; else delete spec.log; update(); });
    controls.append(numberInput("low", "low"), numberInput("high", "high"), numberInput("step", spec.type === "int" ? "1" : "none"),
      el("label", {}, log, " log"));
  } else if (spec.type === "categorical") {
    const input = el("input", {class: "wide", value: (spec.choices || []).map(scalarText).join(", "), "aria-label": `${name} choices`, placeholder: "rbf, poly, 3, true"});
    input.addEventListener("input", () => { spec.choices = input.value.split(",").map(parseScalar).filter(v => v !== ""); update(); });
    controls.append(el("span", {"data-field": `${base}.choices`}, el("label", {}, "choices "), input));
  } else {
    const input = el("input", {value: scalarText(spec.value), "aria-label": `${name} value`});
    input.addEventListener("input", () => { spec.value = parseScalar(input.value); update(); });
    controls.append(el("span", {"data-field": `${base}.value`}, el("label", {}, "value "), input));
  }
  controls.append(
    el("button", {type: "button", class: "secondary small", title: "move up", disabled: i === 0, onclick: () => { [rows[i - 1], rows[i]] = [rows[i], rows[i - 1]]; writeSpace(rows); rerender(); }}, "↑"),
    el("button", {type: "button", class: "secondary small", onclick: () => { rows.splice(i, 1); writeSpace(rows); rerender(); }}, "remove"));
  const card = el("div", {class: "param", "data-field": base, "data-param": name}, controls);
  // `when`: only when an earlier parameter took one of some values
  const earlier = rows.slice(0, i).map(r => r[0]);
  for (const [other, values] of Object.entries(spec.when || {})) {
    const valuesInput = el("input", {class: "wide", value: values.map(scalarText).join(", "), "aria-label": `${name} when ${other}`});
    valuesInput.addEventListener("input", () => { spec.when[other] = valuesInput.value.split(",").map(parseScalar).filter(v => v !== ""); update(); });
    card.append(el("div", {class: "row when", "data-field": `${base}.when`}, "only when ", el("code", {}, other), " is one of ", valuesInput,
      el("button", {type: "button", class: "secondary small", onclick: () => { delete spec.when[other]; if (!Object.keys(spec.when).length) delete spec.when; writeSpace(rows); rerender(); }}, "remove condition")));
  }
  const free = earlier.filter(n => !(spec.when || {})[n]);
  if (free.length) {
    const pick = el("select", {"aria-label": `${name} condition on`}, el("option", {value: ""}, "add a condition on…"), ...free.map(n => el("option", {value: n}, n)));
    pick.addEventListener("change", () => {
      if (!pick.value) return;
      const source = rows.find(r => r[0] === pick.value)[1];
      spec.when = {...(spec.when || {}), [pick.value]: source.type === "categorical" ? [source.choices[0]] : []};
      writeSpace(rows); rerender();
    });
    card.append(el("div", {class: "row when"}, pick));
  }
  card.append(el("div", {class: "err"}));
  return card;
}

// ---------------------------------------------------------------- run on: backend, workers, golem cost
const backendSelect = document.getElementById("backend");
const workersInput = document.getElementById("workers");
backendSelect.append(...D.backends.map(b => el("option", {value: b}, b)));
workersInput.placeholder = `${D.cpus} (CPU count)`;
backendSelect.addEventListener("change", () => { renderGolem(); changed(); });
workersInput.addEventListener("input", () => { showCost(); changed(); });

function renderGolem() {
  const panel = document.getElementById("golem-panel");
  panel.hidden = backendSelect.value !== "golem";
  const box = document.getElementById("golem-fields");
  box.replaceChildren(fieldRow(["bid"], D.schema.properties.bid, false));
  const golem = deref(variants(deref(D.schema.properties.options).properties.golem)[0]);
  renderProps(box, golem, ["options", "golem"]);
  showCost();
}

function showCost(cost) {
  const line = document.getElementById("cost");
  if (backendSelect.value !== "golem") { line.textContent = ""; return; }
  if (!cost) { line.textContent = "worst-case cost: …"; return; }
  const worst = `${fmtNum(cost.bid)} GLM/h × ${cost.workers} providers × ${fmtNum(cost.hours, 3)} h = ${fmtNum(cost.worst)} GLM`;
  line.textContent = `worst-case cost: ${worst}, capped by the budget at ${fmtNum(cost.capped)} GLM` +
    (cost.worst > cost.budget ? " (the task stops before spending more)" : "");
}

// ---------------------------------------------------------------- JSON box, checking, submitting
const jsonBox = document.getElementById("json");
function showJson() { if (!jsonEdited) jsonBox.value = JSON.stringify(task, null, 2); }
jsonBox.addEventListener("input", () => { jsonEdited = true; confirmed = false; scheduleCheck(); });
document.getElementById("json-apply").addEventListener("click", () => {
  let parsed;
  try { parsed = JSON.parse(jsonBox.value); } catch (e) { check(); return; }
  loadTask(parsed);
});
document.getElementById("json-download").addEventListener("click", () => {
  const blob = new Blob([jsonBox.value], {type: "application/json"});
  const link = el("a", {href: URL.createObjectURL(blob), download: `${(task.name || "task").replace(/[^A-Za-z0-9_.-]/g, "-")}.json`});
  document.body.append(link); link.click(); link.remove();
});
document.getElementById("json-file").addEventListener("change", async event => {
  const file = event.target.files[0];
  if (!file) return;
  jsonBox.value = await file.text();
  jsonEdited = true; event.target.value = "";
  try { loadTask(JSON.parse(jsonBox.value)); } catch (e) { check(); }
});

function loadTask(parsed) {
  task = parsed && typeof parsed === "object" && !Array.isArray(parsed) ? parsed : {};
  if (!task.type) task.type = D.type.id;
  jsonEdited = false; confirmed = false;
  rerender();
}

function rerender() { renderForm(); changed(); }
function changed() { jsonEdited = false; confirmed = false; showJson(); scheduleCheck(); }

let timer = null;
function scheduleCheck() { clearTimeout(timer); timer = setTimeout(check, 350); }

function request() {
  return {task: jsonBox.value, draft, backend: backendSelect.value, workers: workersInput.value.trim(), confirm: confirmed};
}

async function check() {
  const seq = ++checkSeq;
  setStatus("checking…", "");
  const result = await post("/api/validate", request());
  if (seq !== checkSeq) return;  // a newer check is on its way
  showResult(result);
}

function clearErrors() {
  document.querySelectorAll(".err").forEach(e => { e.textContent = ""; });
  document.querySelectorAll(".bad").forEach(e => e.classList.remove("bad"));
}

// The element for an error's field: the field itself, else the nearest enclosing one.
function fieldBox(field) {
  let path = field;
  while (path) {
    const box = document.querySelector(`[data-field="${CSS.escape(path)}"]`);
    if (box) return box;
    path = path.replace(/(\.[^.]*|\[\d+\])$/, "");
    if (path === field) break;
  }
  return null;
}

function showResult(result) {
  clearErrors();
  showCost(result.summary && result.summary.cost);
  for (const error of result.errors || []) {
    const box = fieldBox(error.field) || document.querySelector('[data-err="other"]');
    const slot = box.classList.contains("err") ? box : (box.querySelector(":scope > .err") || box.querySelector(".err") || box);
    slot.textContent = `${error.field}: ${error.message}`;
    box.classList.add("bad");
    box.querySelectorAll(":scope input, :scope select, :scope textarea").forEach(i => i.classList.add("bad"));
  }
  renderConfirm(result.confirm || []);
  if (result.errors && result.errors.length) setStatus(`${result.errors.length === 1 ? "1 problem" : result.errors.length + " problems"} to fix`, "bad");
  else if (result.confirm && result.confirm.length) setStatus("read and confirm what this task runs on this machine, below", "bad");
  else {
    const s = result.summary || {};
    setStatus(`valid: ${s.n_trials} trials in ${s.subtasks_count} subtasks, ${s.scoring || "the script's score"} (${s.direction})`, "ok");
  }
  document.getElementById("submit").disabled = !result.ok;
}

function renderConfirm(items) {
  const box = document.getElementById("confirm-box");
  box.hidden = !items.length;
  box.replaceChildren(...items.map(item => item.kind === "script"
    ? el("div", {}, el("p", {}, el("strong", {}, `This task runs the training script ${item.file} on this machine`),
        " (it is imported to check it, and by every local worker). Read it before you go on:"),
      el("pre", {id: "script-text"}, item.text + (item.truncated ? "\n… (cut here; the file is longer)" : "")))
    : el("p", {}, el("strong", {}, "This task imports estimators from modules other than scikit-learn: "), item.modules.join(", "))));
  if (items.length) {
    const accept = el("input", {type: "checkbox", id: "confirm-run"});
    accept.addEventListener("change", () => { confirmed = accept.checked; if (confirmed) check(); });
    box.append(el("label", {}, accept, " I have read this and want it run on this machine"));
  }
}

function setStatus(text, kind) {
  const line = document.getElementById("status");
  line.textContent = text;
  line.className = `status-line ${kind}`;
}

document.getElementById("submit").addEventListener("click", async () => {
  const button = document.getElementById("submit");
  button.disabled = true;
  setStatus("starting the search…", "");
  const result = await post("/api/submit", request());
  if (result.url) { window.location.href = result.url; return; }
  showResult(result);
});

document.getElementById("template-load").addEventListener("click", async () => {
  const id = document.getElementById("template-select").value;
  if (!id) { draft = null; files = []; loadTask({type: D.type.id, options: {}}); return; }
  const result = await post("/api/template", {id});
  draft = result.draft; files = result.files;
  loadTask(result.task);
});

const templateSelect = document.getElementById("template-select");
templateSelect.append(...D.templates.map(t => el("option", {value: t.id}, t.label)));
templateSelect.value = D.templates.length ? D.templates[0].id : "";
document.getElementById("template-load").click();
