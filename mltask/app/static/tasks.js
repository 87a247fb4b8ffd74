"use strict";
// The tasks page: every task under the root, refreshed every second.

const taskRows = document.querySelector("#tasks tbody");

function renderTasks(tasks) {
  const now = Date.now() / 1000;
  taskRows.replaceChildren(...tasks.map(t => {
    const settled = (t.complete || 0) + (t.failed || 0);
    const share = t.n_trials ? Math.min(1, settled / t.n_trials) : 0;
    const live = ["running", "starting", "aborting"].includes(t.status);
    const duration = t.started_at ? ((live ? now : (t.ended_at || t.started_at)) - t.started_at) : null;
    return el("tr", {"data-key": t.key},
      el("td", {}, el("a", {href: `/task/${t.key}`}, t.name), t.name !== t.key ? el("div", {class: "hint"}, t.key) : null),
      el("td", {title: t.status_note || ""}, el("span", {class: `badge ${t.status}`, "data-status": t.status}, t.status),
        t.status === "broken" ? el("div", {class: "error"}, t.status_note) : null),
      el("td", {}, t.backend || ""),
      el("td", {}, t.n_trials ? [el("span", {class: "minibar"}, el("span", {style: `width:${100 * share}%`})),
        `${settled}/${t.n_trials}`, t.failed ? el("span", {class: "pill bad"}, `${t.failed} failed`) : null] : ""),
      el("td", {class: "num"}, fmtNum(t.best)),
      el("td", {}, fmtTime(t.started_at)),
      el("td", {class: "num"}, fmtDuration(duration)),
      el("td", {}, actionButtons(t, refreshTasks)));
  }));
  document.getElementById("no-tasks").hidden = tasks.length > 0;
}

async function refreshTasks() {
  try {
    const response = await fetch("/api/tasks", {credentials: "same-origin"});
    if (response.ok) renderTasks(await response.json());
  } catch (e) { /* the app is restarting: the next tick retries */ }
}

renderTasks(pageData().tasks);
setInterval(() => { if (!document.hidden) refreshTasks(); }, 1000);
