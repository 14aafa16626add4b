// The taskloom console: the task list, and a task's graph, live.
//
// Plain modules, no build step. Everything shown comes from the supervisor's
// JSON API and its server-sent events; every text is set as text, never as
// markup. Actions are buttons with data-action; what they send carries the
// console's own header, which pages of other sites cannot send.

import { Graph } from "/static/dag.js";

const app = document.getElementById("app");
const notice = document.getElementById("notice");
const who = document.getElementById("who");
const UNFINISHED = new Set(["PLANNING", "RUNNING", "AWAITING_APPROVAL"]);
let stopPage = () => {};

// -- small helpers ---------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function say(message, ok = false) {
  notice.textContent = message;
  notice.classList.toggle("ok", ok);
  notice.hidden = !message;
  if (ok) setTimeout(() => { if (notice.textContent === message) say(""); }, 4000);
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.type = (body && body.error && body.error.type) || "";
  }
}

async function api(path, options = {}) {
  const init = { method: options.method || "GET", credentials: "same-origin", headers: {} };
  if (init.method !== "GET") {
    init.headers["X-Taskloom-Console"] = "1";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body || {});
  }
  const response = await fetch(path, init);
  let body = null;
  try { body = await response.json(); } catch { body = null; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${Math.round(s)}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86400) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}

function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "–";
}

/** " on workers labelled gpu=true, zone=eu" for a subtask's required labels. */
function routeText(requires) {
  const pairs = Object.entries(requires || {}).map(([k, v]) => `${k}=${v}`);
  return pairs.length ? ` on workers labelled ${pairs.join(", ")}` : "";
}

function badge(status, extra = "") {
  return h("span", { class: `badge ${extra}`, "data-status": status, text: status });
}

/** " · cost 0.0123 (openai:gpt-4o 0.0123)": what LLM calls cost, if priced. */
function costText(usage) {
  const models = Object.entries(usage.costs || {});
  if (!models.length) return "";
  const money = (x) => Number(x.toPrecision(4)).toString();
  return ` · cost ${money(usage.cost)} (${models.map(([m, c]) => `${m} ${money(c)}`).join(", ")})`;
}

function tokens(usage) {
  return usage.input_tokens + usage.output_tokens;
}

// -- routing ----------------------------------------------------------------------------

async function route() {
  stopPage();
  stopPage = () => {};
  say("");
  let me;
  try {
    me = await api("/api/session");
  } catch (e) {
    if (e.status === 401) return login();
    app.replaceChildren(h("p", { class: "notice", text: e.message }));
    return;
  }
  who.replaceChildren(
    `${me.name} (${me.role})`,
    me.tokens ? h("button", { type: "button", onclick: signOut, text: "sign out" }) : "",
  );
  const match = location.pathname.match(/^\/tasks\/([^/]+)$/);
  if (match) return taskPage(decodeURIComponent(match[1]));
  return listPage();
}

function go(path) {
  history.pushState({}, "", path);
  route();
}

window.addEventListener("popstate", route);

async function signOut() {
  await api("/api/session", { method: "DELETE" });
  who.replaceChildren();
  route();
}

function login() {
  who.replaceChildren();
  const input = h("input", { type: "password", id: "token", autocomplete: "off", placeholder: "tl_…" });
  const form = h("form", { class: "panel login" },
    h("h2", { text: "Sign in" }),
    h("p", { class: "muted", text: "This supervisor needs a token (taskloom tokens add). It is kept in a cookie this page cannot read, never in a URL." }),
    input,
    h("button", { type: "submit", "data-action": "sign-in", text: "Sign in" }));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("/api/session", { method: "POST", body: { token: input.value } });
      route();
    } catch (err) {
      say(err.message);
    }
  });
  app.replaceChildren(form);
  input.focus();
}

// -- the task list ------------------------------------------------------------------------

function listPage() {
  const status = h("select", { id: "status-filter" },
    h("option", { value: "", text: "every status" }),
    ...["PLANNING", "AWAITING_APPROVAL", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
      .map((s) => h("option", { value: s, text: s })));
  status.value = new URLSearchParams(location.search).get("status") || "";
  const body = h("tbody");
  const table = h("table", { id: "tasks" },
    h("thead", {}, h("tr", {}, ...["task", "status", "goal", "owner", "age", "done", "tokens"].map((t) => h("th", { text: t })))),
    body);
  let timer = null;
  let alive = true;
  async function refresh() {
    try {
      const query = status.value ? `?status=${encodeURIComponent(status.value)}` : "";
      const page = await api(`/api/tasks${query}`);
      body.replaceChildren(...page.tasks.map((t) => h("tr", { "data-task-id": t.id },
        h("td", {}, h("a", { href: `/tasks/${t.id}`, onclick: (e) => { e.preventDefault(); go(`/tasks/${t.id}`); }, text: t.id })),
        h("td", {}, badge(t.status), t.paused ? badge("PAUSED", "paused") : ""),
        h("td", { class: "goal", title: t.goal, text: t.goal }),
        h("td", { text: t.owner }),
        h("td", { text: ago(t.created_at) }),
        h("td", { text: `${t.succeeded}/${t.total}` }),
        h("td", { text: tokens(t.usage).toLocaleString() }))));
      if (!page.tasks.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted", text: "No tasks yet: taskloom submit \"a goal\"" })));
    } catch (e) {
      say(e.message);
    }
    if (alive) timer = setTimeout(refresh, 2000);
  }
  status.addEventListener("change", () => {
    history.replaceState({}, "", status.value ? `/?status=${status.value}` : "/");
    clearTimeout(timer);
    refresh();
  });
  app.replaceChildren(h("div", { class: "toolbar" }, h("strong", { text: "Tasks" }), status), table);
  stopPage = () => { alive = false; clearTimeout(timer); };
  refresh();
}

// -- a task's page ----------------------------------------------------------------------------

function taskPage(taskId) {
  const state = {
    task: null, nodes: new Map(), selected: "", output: new Map(), attempts: new Map(), log: [],
  };
  const head = h("div", { class: "task-head" });
  const bar = h("div", { class: "actions", id: "task-actions" });
  const reason = h("input", { id: "reason", placeholder: "why (kept in the log)", size: 28 });
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("id", "graph");
  const graph = new Graph(svg, (id) => { state.selected = id; showDetail(); });
  const tools = h("div", { class: "graph-tools" },
    h("button", { type: "button", title: "zoom in", onclick: () => graph.zoom(1 / 1.4), text: "+" }),
    h("button", { type: "button", title: "zoom out", onclick: () => graph.zoom(1.4), text: "−" }),
    h("button", { type: "button", title: "show it all", onclick: () => graph.fit(), text: "fit" }));
  const detail = h("div", { class: "panel detail", id: "detail" }, h("p", { class: "muted", text: "Click a subtask to see it." }));
  const log = h("div", { class: "log", id: "log" });
  const editor = h("div", { id: "plan-editor", hidden: true });
  app.replaceChildren(
    h("p", {}, h("a", { href: "/", onclick: (e) => { e.preventDefault(); go("/"); }, text: "← all tasks" })),
    head, h("div", { class: "toolbar" }, bar, reason), editor,
    h("div", { class: "layout" },
      h("div", {}, h("div", { class: "panel graph-wrap" }, svg, tools),
        h("div", { class: "panel" }, h("h2", { text: "Events" }), log)),
      detail));

  async function act(action, body = {}) {
    try {
      await api(`/api/tasks/${taskId}/${action}`, { method: "POST", body: { reason: reason.value, ...body } });
      reason.value = "";
      say(`${action}: done`, true);
      await loadTask();
    } catch (e) {
      say(`${action}: ${e.message}`);
    }
  }

  function drawHead() {
    const t = state.task;
    head.replaceChildren(
      h("h1", { title: t.goal, text: t.goal.length > 160 ? t.goal.slice(0, 159) + "…" : t.goal }),
      badge(t.status), t.paused ? badge("PAUSED", "paused") : "",
      h("span", { class: "facts" },
        h("span", { text: `task ${t.id}` }), h("span", { text: `owner ${t.owner}` }),
        h("span", { text: `${t.succeeded}/${t.total} done` }),
        h("span", { text: `${tokens(t.usage).toLocaleString()} tokens${costText(t.usage)}` }),
        h("span", { text: `created ${ago(t.created_at)}` }),
        t.error ? h("span", { text: `error: ${t.error}` }) : ""));
    const unfinished = UNFINISHED.has(t.status);
    const waiting = t.status === "AWAITING_APPROVAL";
    const untouched = [...state.nodes.values()].every((n) => n.status === "PENDING" && !n.attempt);
    bar.replaceChildren(
      waiting ? h("button", { type: "button", "data-action": "approve", "data-scope": "task", onclick: () => act("approve"), text: "Approve plan" }) : "",
      waiting ? h("button", { type: "button", "data-action": "reject", "data-scope": "task", onclick: () => act("reject"), text: "Reject plan" }) : "",
      waiting && untouched ? h("button", { type: "button", "data-action": "edit-plan", onclick: openEditor, text: "Edit plan…" }) : "",
      unfinished && !t.paused ? h("button", { type: "button", "data-action": "pause", onclick: () => act("pause"), text: "Pause" }) : "",
      unfinished && t.paused ? h("button", { type: "button", "data-action": "resume", onclick: () => act("resume"), text: "Resume" }) : "",
      unfinished ? h("button", { type: "button", "data-action": "cancel", "data-scope": "task", onclick: () => act("cancel"), text: "Cancel task" }) : "",
      t.result && !unfinished ? h("details", {}, h("summary", { text: "result" }), h("pre", { text: t.result })) : "");
  }

  async function openEditor() {
    try {
      const plan = await api(`/api/tasks/${taskId}/plan`);
      const text = h("textarea", { rows: 18, id: "plan-json" });
      text.value = JSON.stringify(plan, null, 2);
      const problems = h("ul", { class: "violations", id: "plan-violations" });
      const read = () => { try { return JSON.parse(text.value); } catch (e) { problems.replaceChildren(h("li", { text: `not JSON: ${e.message}` })); return null; } };
      editor.replaceChildren(h("div", { class: "panel" },
        h("h2", { text: "Edit the plan, then approve it" }), text, problems,
        h("div", { class: "actions" },
          h("button", { type: "button", "data-action": "check-plan", text: "Check", onclick: async () => {
            const doc = read(); if (!doc) return;
            const verdict = await api("/api/plans/validate", { method: "POST", body: { plan: doc } });
            problems.replaceChildren(...(verdict.ok ? [h("li", { class: "muted", text: "valid" })] : verdict.violations.map((v) => h("li", { text: v }))));
          } }),
          h("button", { type: "button", "data-action": "approve", "data-scope": "plan-edit", text: "Approve this plan", onclick: async () => {
            const doc = read(); if (!doc) return;
            try {
              await api(`/api/tasks/${taskId}/approve`, { method: "POST", body: { plan: doc, reason: reason.value } });
              editor.hidden = true;
              say("approved with the edited plan", true);
              await loadTask();
            } catch (e) {
              problems.replaceChildren(h("li", { text: e.message }));
            }
          } }),
          h("button", { type: "button", text: "Close", onclick: () => { editor.hidden = true; } }))));
      editor.hidden = false;
    } catch (e) {
      say(e.message);
    }
  }

  async function showDetail() {
    const id = state.selected;
    if (!id) return;
    let s;
    try {
      s = await api(`/api/tasks/${taskId}/subtasks/${encodeURIComponent(id)}`);
    } catch (e) {
      say(e.message);
      return;
    }
    if (state.selected !== id) return;
    const live = state.output.get(id) || "";
    const attempts = state.attempts.get(id) || [];
    const taskOpen = state.task && state.task.status !== "SUCCEEDED";
    const out = h("pre", { id: "subtask-output", text: s.output || live || "" });
    const text = h("textarea", { rows: 3, id: "subtask-text" });
    const buttons = [];
    if (s.status === "AWAITING_APPROVAL") {
      buttons.push(h("button", { type: "button", "data-action": "approve", "data-scope": "subtask", onclick: () => act("approve", { subtask: id }), text: "Approve" }));
      buttons.push(h("button", { type: "button", "data-action": "reject", "data-scope": "subtask", onclick: () => act("reject", { subtask: id }), text: "Reject" }));
    }
    if (taskOpen && ["FAILED", "SKIPPED", "CANCELLED"].includes(s.status)) {
      text.value = s.instruction;
      buttons.push(h("button", { type: "button", "data-action": "retry", onclick: () => act("retry", { subtask: id, instruction: text.value !== s.instruction ? text.value : null }), text: "Retry (with the instruction below)" }));
    }
    if (taskOpen && ["PENDING", "READY", "AWAITING_APPROVAL", "FAILED", "SKIPPED", "CANCELLED"].includes(s.status)) {
      buttons.push(h("button", { type: "button", "data-action": "skip", onclick: () => act("skip", { subtask: id, output: text.value }), text: "Skip (the text below is its output)" }));
    }
    if (["PENDING", "READY", "ASSIGNED", "RUNNING", "AWAITING_APPROVAL"].includes(s.status) && state.task && state.task.status === "RUNNING") {
      buttons.push(h("button", { type: "button", "data-action": "cancel", "data-scope": "subtask", onclick: () => act("cancel", { subtask: id }), text: "Cancel subtask" }));
    }
    detail.replaceChildren(
      h("h2", {}, `${s.title || s.id} `, badge(s.status)),
      h("dl", {},
        h("dt", { text: "id" }), h("dd", { text: s.id }),
        h("dt", { text: "capability" }), h("dd", { text: s.capability + routeText(s.requires) + (s.requires_approval ? " (needs approval)" : "") }),
        h("dt", { text: "attempt" }), h("dd", { text: `${s.attempt}${s.worker ? ` on ${s.worker}` : ""}` }),
        h("dt", { text: "timings" }), h("dd", { text: `ready ${clock(s.ready_at)} · started ${clock(s.started_at)} · ended ${clock(s.finished_at)}` }),
        h("dt", { text: "tokens" }), h("dd", { text: `${s.usage.input_tokens} in, ${s.usage.output_tokens} out, ${s.usage.calls} calls ${s.usage.models.join(", ")}${costText(s.usage)}` }),
        s.cache_hit ? [h("dt", { text: "cache" }), h("dd", { text: "reused an identical earlier output" })] : "",
        s.error ? [h("dt", { text: "error" }), h("dd", { text: s.error })] : ""),
      h("h2", { text: "Instruction" }), h("pre", { text: s.instruction }),
      h("h2", { text: `Inputs (${s.inputs.length})` }),
      ...s.inputs.map((i) => h("details", { open: s.inputs.length <= 2 },
        h("summary", {}, `${i.id} ${i.title ? `(${i.title})` : ""} `, badge(i.status || "PENDING")),
        h("pre", { text: i.output + (i.cut ? "\n[… cut]" : "") }))),
      h("h2", { text: "Output" }), out,
      h("h2", { text: "Attempts" }),
      h("table", { class: "attempts" }, h("tr", {}, ...["#", "worker", "start", "end", "how"].map((t) => h("th", { text: t }))),
        ...attempts.map((a) => h("tr", {}, h("td", { text: a.attempt }), h("td", { text: a.worker || "" }),
          h("td", { text: clock(a.start) }), h("td", { text: clock(a.end) }), h("td", { text: a.how || "" })))),
      buttons.length ? h("div", { class: "actions" }, ...buttons) : "",
      buttons.length ? text : "");
  }

  async function loadTask() {
    const task = await api(`/api/tasks/${taskId}`);
    const replot = !state.task || task.subtasks.length !== state.nodes.size
      || task.subtasks.some((s) => !state.nodes.has(s.id));
    state.task = task;
    state.nodes = new Map(task.subtasks.map((s) => [s.id, s]));
    drawHead();
    if (replot) graph.render(task.subtasks);
    else for (const s of task.subtasks) graph.setStatus(s.id, s.status);
    if (state.selected) showDetail();
  }

  let pending = null;
  function soon(fn) {
    clearTimeout(pending);
    pending = setTimeout(fn, 150);
  }

  function onEvent(e) {
    state.log.push(e);
    if (state.log.length > 400) state.log.shift();
    log.append(h("div", { "data-type": e.type },
      `${new Date(e.time * 1000).toLocaleTimeString()}  ${e.type}  ${e.subtask_id || ""}  ${e.message || ""}`,
      e.actor ? h("span", { class: "actor", text: `  (${e.actor})` }) : ""));
    while (log.childNodes.length > 400) log.firstChild.remove();
    log.scrollTop = log.scrollHeight;
    const sid = e.subtask_id;
    if (sid) {
      const node = state.nodes.get(sid);
      if (node && e.status && e.type !== "subtask.output" && e.type !== "subtask.progress") {
        node.status = e.status;
        graph.setStatus(sid, e.status);
      }
      if (e.type === "subtask.output") state.output.set(sid, (state.output.get(sid) || "") + e.message);
      const list = state.attempts.get(sid) || [];
      if (e.type === "subtask.assigned") list.push({ attempt: e.attempt, worker: e.worker, start: e.time, how: "assigned" });
      const current = list.find((a) => a.attempt === e.attempt);
      if (current) {
        if (e.type === "subtask.running") current.how = "running";
        if (["subtask.succeeded", "subtask.failed", "subtask.retrying", "subtask.cancelled"].includes(e.type)) {
          current.end = e.time;
          current.how = e.type.slice(8) + (e.message ? `: ${e.message}` : "");
        }
      }
      state.attempts.set(sid, list);
      if (sid === state.selected) {
        if (e.type === "subtask.output") {
          const out = document.getElementById("subtask-output");
          if (out) out.textContent = state.output.get(sid);
        } else if (e.type !== "subtask.progress") soon(showDetail);
      }
    }
    if (e.type.startsWith("plan.") || e.type.startsWith("task.") || !state.nodes.has(sid)) soon(loadTask);
  }

  let source = null;
  loadTask().then(() => {
    source = new EventSource(`/api/tasks/${taskId}/events`);
    source.onmessage = (m) => onEvent(JSON.parse(m.data));
    source.addEventListener("end", () => { source.close(); soon(loadTask); });
    source.addEventListener("problem", (m) => say(JSON.parse(m.data).message));
  }).catch((e) => {
    app.replaceChildren(h("p", {}, h("a", { href: "/", text: "← all tasks" })), h("p", { class: "notice", id: "task-error", text: e.message }));
  });
  stopPage = () => { if (source) source.close(); clearTimeout(pending); };
}

route();
