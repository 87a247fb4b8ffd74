"use strict";
// Helpers every page uses: the page's data, DOM building, POSTs with the CSRF token, formatting.

const CSRF = document.querySelector('meta[name="csrf"]').content;

function pageData() {
  return JSON.parse(document.getElementById("page-data").textContent);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"content-type": "application/json", "x-csrf-token": CSRF},
    body: JSON.stringify(body || {}),
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = {errors: [{field: "", message: await response.text()}]}; }
  data.httpStatus = response.status;
  return data;
}

function fmtNum(v, digits = 5) {
  if (v === null || v === undefined || v === "") return "";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Number(v.toPrecision(digits)).toString();
}

function fmtValue(v) {
  if (typeof v === "number") return fmtNum(v, 4);
  if (v === null) return "null";
  return String(v);
}

function fmtTime(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  return d.toLocaleDateString(undefined, {month: "short", day: "numeric"}) + " " +
    d.toLocaleTimeString(undefined, {hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) return "";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : String(m)) + ":" + String(s).padStart(2, "0");
}

function confirmDialog(text, okLabel) {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel || "OK";
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise(resolve => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true}));
}

const ACTION_TEXT = {
  abort: ["Abort", "Stop this search? What finished is kept, and it can be resumed later."],
  resume: ["Resume", null],
  delete: ["Delete", "Delete this task and every file in its folder (results, model, state)? This cannot be undone."],
};

// Buttons for a task's allowed actions; `after` runs once one is done (to refresh the page).
function actionButtons(task, after) {
  return task.actions.map(verb => el("button", {
    class: verb === "delete" ? "danger small" : "secondary small", "data-action": verb,
    onclick: async event => {
      const [label, question] = ACTION_TEXT[verb];
      if (question && !(await confirmDialog(`${task.name}: ${question}`, label))) return;
      event.target.disabled = true;
      const result = await post(`/api/action/${verb}/${task.key}`, {});
      event.target.disabled = false;
      if (!result.ok) alertError(result);
      after(verb, result);
    },
  }, ACTION_TEXT[verb][0]));
}

function alertError(result) {
  const message = (result.errors || []).map(e => (e.field ? e.field + ": " : "") + e.message).join("\n");
  const box = document.getElementById("task-error") || document.getElementById("tasks-error");
  if (box) box.textContent = message; else window.alert(message);
}
