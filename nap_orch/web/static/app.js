// The nap-orch web manager: a page of hash routes over the HTTP API.
// The token lives in sessionStorage and goes in an Authorization header, never in a URL. Every string
// from the API is put in the page as text (textContent, createElement), never as HTML.

const TOKEN_KEY = "nap_token";
const main = document.getElementById("main");
let page = null; // the current page's AbortController: leaving a page stops its streams and polls
let carried = null; // a job panel carried from the deploy form to the app's page

// -- helpers ---------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const enc = encodeURIComponent;
const token = () => sessionStorage.getItem(TOKEN_KEY);
const localTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const stateBadge = (s) => el("span", { class: `state state-${s}`, text: s || "unknown" });

class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

async function request(method, path, body, signal) {
  const headers = { Authorization: `Bearer ${token() || ""}` };
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", `The server could not be reached (${e.message}).`);
  }
  if (!resp.ok) {
    let kind = "error";
    let message = `${resp.status} ${resp.statusText}`;
    try {
      const err = await resp.json();
      if (err && typeof err.message === "string") message = err.message;
      if (err && typeof err.error === "string") kind = err.error;
    } catch (_) {
      /* not JSON: the status says it */
    }
    if (resp.status === 401 && !path.endsWith("/whoami")) signOut("Your session is no longer valid: sign in again.");
    throw new ApiError(resp.status, kind, message);
  }
  return resp;
}

const api = async (method, path, body, signal) => (await request(method, path, body, signal)).json();
const get = (path) => api("GET", path, undefined, page && page.signal);

// Read a text body as it comes, line by line.
async function streamLines(path, onLine, signal) {
  const resp = await request("GET", path, undefined, signal);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      onLine(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  }
  if (buf) onLine(buf);
}

// Server-sent events through fetch (an EventSource cannot send the Authorization header).
async function streamEvents(path, onEvent, signal) {
  let ev = { event: "message", data: [] };
  await streamLines(
    path,
    (line) => {
      if (line === "") {
        if (ev.data.length) {
          let data;
          try {
            data = JSON.parse(ev.data.join("\n"));
          } catch (_) {
            data = { raw: ev.data.join("\n") };
          }
          onEvent(ev.event, data);
        }
        ev = { event: "message", data: [] };
      } else if (line.startsWith(":")) {
        /* a keep-alive comment */
      } else {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "event") ev.event = value;
        else if (field === "data") ev.data.push(value);
      }
    },
    signal,
  );
}

function errorBox(e) {
  if (e && e.name === "AbortError") return null;
  const msg = e instanceof ApiError ? e.message : `Something went wrong: ${e && e.message}`;
  return el("div", { class: "error", role: "alert" }, e && e.status === 404 ? "Not found: " : "", msg);
}

function showError(container, e) {
  const box = errorBox(e);
  if (box) container.append(box);
}

// Each cell says its column (data-label): on a narrow screen the rows become cards that show it.
function labelCells(table) {
  const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const tr of table.querySelectorAll("tbody tr")) {
    [...tr.children].forEach((td, i) => { if (heads[i] && td.colSpan === 1) td.dataset.label = heads[i]; });
  }
}

function setPage(title, ...nodes) {
  document.title = `${title} · nap-orch`;
  main.replaceChildren(el("h1", { text: title }), ...nodes);
}

// Repeat fn every ms while the page is shown (one call at a time).
function poll(fn, ms, signal) {
  let busy = false;
  const tick = async () => {
    if (busy || signal.aborted) return;
    busy = true;
    try {
      await fn();
    } catch (e) {
      if (e.name !== "AbortError") console.warn(e);
    } finally {
      busy = false;
    }
  };
  const id = setInterval(tick, ms);
  signal.addEventListener("abort", () => clearInterval(id));
  return tick();
}

// A launch counts its two phases out of twice its instances ("submitted", then "running" counting on
// as instances settle): each phase is shown out of the instances, as the CLI does.
const LAUNCH_PHASES = { submitted: "submitted", running: "settled" };
function progressLabel(d) {
  const done = d.done || 0;
  const total = d.total || 0;
  if (LAUNCH_PHASES[d.phase] && total > 0 && total % 2 === 0) {
    const half = total / 2;
    return `${d.phase === "running" ? Math.max(0, done - half) : done} of ${half} ${LAUNCH_PHASES[d.phase]}`;
  }
  return `${done} of ${total}` + (d.phase ? ` ${d.phase}` : "");
}

// A job's panel: its state, a progress bar and its log lines, followed live until it ends (onState is
// told of each state it enters, onEnd of its final record).
function jobPanel(jobId, title, onEnd, onState) {
  const state = el("span", {}, stateBadge("queued"));
  const bar = el("progress", { max: 1, value: 0, "aria-label": "progress" });
  const progressText = el("span", { class: "progress-text" });
  const log = el("div", { class: "log", role: "log", "aria-live": "polite" });
  const error = el("div");
  const panel = el(
    "div",
    { class: "panel job-panel", "data-job": jobId },
    el("div", { class: "row" }, el("strong", { text: title }), el("a", { href: `#/jobs/${enc(jobId)}`, text: jobId }), state),
    bar,
    progressText,
    log,
    error,
  );
  const ctl = new AbortController();
  (async () => {
    try {
      await streamEvents(
        `/v1/jobs/${enc(jobId)}/events`,
        (type, d) => {
          if (type === "state") {
            state.replaceChildren(stateBadge(d.state));
            if (onState) onState(d.state);
          } else if (type === "log") {
            log.append(el("div", { text: d.line }));
            log.scrollTop = log.scrollHeight;
          } else if (type === "progress") {
            bar.max = d.total || 1;
            bar.value = d.done || 0;
            progressText.textContent = progressLabel(d);
          } else if (type === "error") showError(error, new ApiError(0, d.error, d.message || "the stream ended early"));
        },
        ctl.signal,
      );
      const job = await api("GET", `/v1/jobs/${enc(jobId)}`, undefined, ctl.signal);
      state.replaceChildren(stateBadge(job.state));
      if (job.state === "succeeded") bar.value = bar.max;
      if (job.error) error.append(el("div", { class: "error", role: "alert", text: job.error }));
      if (onEnd) onEnd(job, panel);
    } catch (e) {
      showError(error, e);
    }
  })();
  return panel;
}

function form(onSubmit, ...fields) {
  const f = el("form", {}, ...fields);
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = f.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    f.querySelectorAll(".error").forEach((n) => n.remove());
    try {
      await onSubmit(new FormData(f), f);
    } catch (e) {
      showError(f, e);
    } finally {
      if (button) button.disabled = false;
    }
  });
  return f;
}

const field = (label, attrs) => el("label", {}, label, el("input", { type: "text", ...attrs }));

// -- session ---------------------------------------------------------------------------------------
let me = null;

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  renderNav();
  if (location.hash !== "#/signin") location.hash = "#/signin";
  else route();
  if (message) main.prepend(el("div", { class: "notice", role: "status", text: message }));
}

function renderNav() {
  document.getElementById("nav").hidden = !me;
  document.getElementById("nav-admin").hidden = !(me && me.admin);
  document.getElementById("who").textContent = me ? `signed in as ${me.name}${me.admin ? " (admin)" : ""}` : "";
}

function signInPage() {
  const f = form(
    async (data) => {
      sessionStorage.setItem(TOKEN_KEY, String(data.get("token")).trim());
      try {
        me = await api("GET", "/v1/whoami");
      } catch (e) {
        sessionStorage.removeItem(TOKEN_KEY);
        throw e.status === 401 ? new ApiError(401, "unauthorized", "That token is not known: check it and try again.") : e;
      }
      renderNav();
      location.hash = "#/apps";
    },
    el("label", {}, "Token", el("input", { type: "password", name: "token", id: "token", required: true, autocomplete: "current-password" })),
    el("button", { type: "submit", text: "Sign in" }),
  );
  setPage("Sign in", el("section", {}, el("p", { text: "Sign in with your nap token (nap user add prints it; the admin's is in NAP_HOME/admin.token)." }), f));
}

// -- apps ------------------------------------------------------------------------------------------
function countsByState(rows) {
  const n = {};
  for (const r of rows) n[r.state] = (n[r.state] || 0) + 1;
  return Object.entries(n).map(([s, k]) => `${k} ${s}`).join(", ") || "none";
}

async function appsPage(signal) {
  const tbody = el("tbody");
  const list = el("section", {}, el("div", { class: "table-wrap" }, el("table", { id: "apps" },
    el("thead", {}, el("tr", {}, el("th", { text: "App" }), el("th", { text: "Kind" }), el("th", { text: "Release" }), el("th", { text: "URL" }), el("th", { text: "Instances" }))), tbody)));
  const follow = el("div");
  const deploy = form(
    async (data) => {
      const name = String(data.get("app")).trim();
      const job = await api("POST", "/v1/apps", { app: name, url: String(data.get("url")).trim() });
      follow.replaceChildren(
        jobPanel(job.job, `Deploying ${name}`, (j, panel) => {
          if (j.state === "succeeded") {
            carried = { app: name, panel };
            if (!signal.aborted) location.hash = `#/apps/${enc(name)}`;
          }
        }),
      );
    },
    field("Name", { name: "app", id: "deploy-app", required: true, pattern: "[a-z][a-z0-9\\-]{0,30}", title: "lower-case letters, digits and -" }),
    el("label", {}, "URL (http, https, git)", el("input", { type: "text", name: "url", id: "deploy-url", required: true, inputmode: "url" })),
    el("button", { type: "submit", text: "Deploy" }),
  );
  setPage("Apps", list, el("section", {}, el("h2", { text: "Deploy an app" }), deploy, follow));
  const data = await get("/v1/apps");
  if (!data.services.length) tbody.append(el("tr", {}, el("td", { colspan: 5, text: "No apps yet: deploy one below." })));
  for (const name of data.services) {
    const kind = el("td");
    const release = el("td");
    const url = el("td");
    const counts = el("td");
    tbody.append(el("tr", {}, el("td", {}, el("a", { href: `#/apps/${enc(name)}`, text: name })), kind, release, url, counts));
    get(`/v1/apps/${enc(name)}`).then((a) => {
      kind.textContent = a.kind;
      release.textContent = a.release || "";
      url.textContent = a.url || "";
    }).catch((e) => showError(kind, e));
    get(`/v1/apps/${enc(name)}/instances`).then((r) => { counts.textContent = countsByState(r.instances); }).catch((e) => showError(counts, e));
  }
  labelCells(tbody.closest("table"));
}

// -- an app ----------------------------------------------------------------------------------------
function portLink(port) {
  if (!port || !port.port) return "";
  const url = `http://${port.host || location.hostname}:${port.port}`;
  return el("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "port", text: url });
}

function actionButton(label, aria, method, path, after, cls) {
  return el("button", {
    type: "button",
    class: cls || "secondary",
    text: label,
    "aria-label": aria,
    onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        await api(method, path);
      } catch (e) {
        showError(ev.target.closest("td"), e);
      } finally {
        ev.target.disabled = false;
        after();
      }
    },
  });
}

// An instance's place in the list, from the list's own fields: kind (common, mpi_master, mpi_slave) and
// instance ("3" for common@3 and a run's master, "3-2" for run 3's second slave).
function placeOf(r) {
  const [a, b] = String(r.instance ?? "").split("-").map(Number);
  if (r.kind === "mpi_master" || r.kind === "mpi_slave") return { mpi: true, run: a, slave: r.kind === "mpi_slave" ? b || 0 : 0 };
  return { mpi: false, run: a, slave: 0 };
}

// Common instances by number, then each MPI run by its number: its master, then its slaves.
function comparePlaces(x, y) {
  return (x.mpi - y.mpi) || (x.run - y.run) || (x.slave - y.slave);
}

// What a row of an MPI run can do: the run stops and goes as a whole (stopping or removing the master
// stops or removes the run), and a run is never started again (start another).
function instanceActions(row, place, after) {
  const base = `/v1/instances/${enc(row.name)}`;
  if (!place.mpi) {
    return [
      actionButton("Stop", `Stop ${row.name}`, "POST", `${base}/stop`, after), " ",
      actionButton("Start", `Start ${row.name}`, "POST", `${base}/start`, after), " ",
      actionButton("Remove", `Remove ${row.name}`, "DELETE", base, after, "danger"),
    ];
  }
  if (place.slave) return el("span", { class: "muted", text: `with run ${place.run}` });
  return [
    actionButton("Stop run", `Stop run ${place.run}`, "POST", `${base}/stop`, after), " ",
    actionButton("Remove run", `Remove run ${place.run}`, "DELETE", base, after, "danger"),
  ];
}

function nameCell(row, place) {
  const link = el("a", { href: `#/instances/${enc(row.name)}`, text: row.name });
  if (!place.mpi) return el("td", {}, link);
  if (!place.slave) return el("td", { class: "run-head" }, el("strong", { class: "run-label", text: `Run ${place.run}` }), " master ", link);
  return el("td", { class: "run-member" }, el("span", { class: "run-label", text: `slave ${place.slave}` }), " ", link);
}

// The instances, kept live: common instances, then each MPI run grouped as its master's row (the run's
// number, and the run's state: its instances counted by state) with its slaves' rows under it.
function instancesTable(app, signal) {
  const tbody = el("tbody");
  const rows = new Map(); // name -> { tr, place }
  const table = el("table", { id: "instances" },
    el("thead", {}, el("tr", {}, ...["Name", "State", "Port", "Restarts", "Exit code", "Host / node", "Actions"].map((h) => el("th", { text: h })))), tbody);
  const empty = el("p", { text: "No instances." });
  const refresh = async () => {
    const data = await api("GET", `/v1/apps/${enc(app)}/instances`, undefined, signal);
    const seen = new Set();
    const runs = new Map(); // run -> its instances' rows from the API
    for (const r of data.instances) {
      const place = placeOf(r);
      if (place.mpi) (runs.get(place.run) || runs.set(place.run, []).get(place.run)).push(r);
    }
    for (const r of data.instances) {
      seen.add(r.name);
      let got = rows.get(r.name);
      if (!got) {
        const place = placeOf(r);
        const cls = place.mpi ? (place.slave ? "run-slave" : "run-master") : null;
        const tr = el("tr", { "data-name": r.name, class: cls, "data-run": place.mpi ? place.run : null },
          nameCell(r, place),
          el("td", { class: "st" }), el("td", { class: "pt" }), el("td", { class: "rs" }), el("td", { class: "ex" }), el("td", { class: "hs" }),
          el("td", { class: "actions" }, instanceActions(r, place, refresh)));
        got = { tr, place };
        rows.set(r.name, got);
      }
      const { tr, place } = got;
      const set = (cls, key, ...nodes) => {
        const td = tr.querySelector(`.${cls}`);
        if (td.dataset.v !== key) {
          td.dataset.v = key;
          td.replaceChildren(...nodes);
        }
      };
      if (place.mpi && !place.slave) {
        const summary = `run: ${countsByState(runs.get(place.run))}`;
        set("st", `${r.state}|${summary}`, stateBadge(r.state), el("div", { class: "run-state", text: summary }));
      } else {
        set("st", r.state, stateBadge(r.state));
      }
      set("pt", r.state + JSON.stringify(r.port), portLink(r.state === "running" ? r.port : null));
      set("rs", String(r.restarts ?? ""), String(r.restarts ?? ""));
      set("ex", String(r.exit_code ?? ""), r.exit_code ?? "");
      set("hs", String(r.host ?? ""), r.host ?? "");
    }
    for (const [name, got] of rows) if (!seen.has(name)) { got.tr.remove(); rows.delete(name); }
    // In place: rows move only when the order changed (a new instance, a run's slaves after its master).
    const order = [...rows.values()].sort((x, y) => comparePlaces(x.place, y.place)).map((g) => g.tr);
    if (order.some((tr, i) => tbody.children[i] !== tr)) tbody.append(...order);
    empty.hidden = rows.size > 0;
    labelCells(table);
  };
  return { node: el("div", { class: "table-wrap" }, table, empty), refresh };
}

function jobButton(label, method, path, body, out, cls) {
  return el("button", {
    type: "button", class: cls || "secondary", text: label,
    onclick: async () => {
      try {
        const job = await api(method, path, body === undefined ? undefined : body());
        out.replaceChildren(job.job ? jobPanel(job.job, label) : el("div", { class: "notice", text: `${label}: done` }));
      } catch (e) {
        out.replaceChildren();
        showError(out, e);
      }
    },
  });
}

async function appPage(signal, app) {
  const info = await get(`/v1/apps/${enc(app)}`);
  const base = `/v1/apps/${enc(app)}`;
  const jobs = el("div", { id: "app-jobs" });
  if (carried && carried.app === app) jobs.append(carried.panel);
  carried = null;
  const table = instancesTable(app, signal);

  const params = (await get(`${base}/parameters`)).parameters;
  const launchFields = params.map((p, i) => field(p, { name: `p:${p}`, id: `param-${i}`, "data-param": p }));
  if (info.kind === "common") launchFields.push(el("label", {}, "Count", el("input", { type: "number", name: "count", id: "count", min: 1, value: 1 })));
  const launch = form(
    async (data) => {
      const values = {};
      for (const p of params) values[p] = String(data.get(`p:${p}`) ?? "");
      const path = info.kind === "common" ? `${base}/instances` : `${base}/mpi`;
      const bodyOut = { params: values };
      if (info.kind === "common") bodyOut.count = Number(data.get("count") || 1);
      const job = await api("POST", path, bodyOut);
      jobs.replaceChildren(jobPanel(job.job, `Launching ${app}`, () => table.refresh().catch(() => {})));
    },
    ...launchFields,
    el("button", { type: "submit", text: "Launch" }),
  );

  const ops = el("div");
  const scale = form(
    async (data) => {
      const job = await api("PUT", `${base}/scale`, { count: Number(data.get("count")) });
      ops.replaceChildren(jobPanel(job.job, `Scaling ${app}`));
    },
    el("label", {}, "Scale to", el("input", { type: "number", name: "count", id: "scale-count", min: 0, value: 1 })),
    el("button", { type: "submit", text: "Scale" }),
  );
  const destroy = el("button", { type: "button", class: "danger", text: "Destroy app…" });
  destroy.addEventListener("click", async () => {
    if (destroy.dataset.armed !== "1") {
      destroy.dataset.armed = "1";
      destroy.textContent = `Really destroy ${app} and its instances?`;
      return;
    }
    try {
      const job = await api("DELETE", `${base}?force=1`);
      ops.replaceChildren(jobPanel(job.job, `Destroying ${app}`, (j) => { if (j.state === "succeeded") location.hash = "#/apps"; }));
    } catch (e) {
      showError(ops, e);
    }
  });
  // An MPI app's runs are stopped (or destroyed) but never started again, nor scaled: a new run is started.
  const common = info.kind === "common";
  const appOps = el("div", { class: "row" },
    jobButton("Stop all", "POST", `${base}/stop`, undefined, ops),
    common && jobButton("Start all", "POST", `${base}/start`, undefined, ops),
    common && jobButton("Restart all", "POST", `${base}/restart`, undefined, ops),
    destroy);

  // Every instance's journal, merged in time order (nap logs): the last N lines when asked.
  const logs = el("pre", { id: "app-logs", role: "log", "aria-live": "off" });
  logs.hidden = true;  // an empty box until asked for
  const logsError = el("div");
  const logLines = el("select", { id: "app-logs-lines", "aria-label": "lines" }, ...[100, 1000].map((n) => el("option", { value: n, text: `last ${n}` })));
  const showLogs = el("button", { type: "button", id: "app-logs-show", class: "secondary", text: "Show logs" });
  showLogs.addEventListener("click", () => {
    logs.hidden = false;
    logs.replaceChildren();
    logsError.replaceChildren();
    streamLines(`${base}/logs?lines=${enc(logLines.value)}`, (line) => logs.append(line + "\n"), signal)
      .catch((e) => showError(logsError, e));
  });

  const releases = el("div", { id: "releases" });
  const profile = el("pre", { id: "app-profile" });
  setPage(
    app,
    el("section", {}, el("dl", {},
      el("dt", { text: "Kind" }), el("dd", { text: info.kind }),
      el("dt", { text: "URL" }), el("dd", { text: info.url || "" }),
      el("dt", { text: "Release" }), el("dd", { text: info.release || "" }),
      el("dt", { text: "Parameters" }), el("dd", { text: params.join(", ") || "none" }))),
    jobs,
    el("section", {}, el("h2", { text: "Instances" }), table.node),
    el("section", {}, el("h2", { text: info.kind === "common" ? "Launch instances" : "Start an MPI run" }), launch),
    el("section", {}, el("h2", { text: "Whole app" }), appOps, common && scale, ops),
    el("section", {}, el("h2", { text: "Logs" }), el("div", { class: "row" }, logLines, showLogs), logs, logsError),
    el("section", {}, el("h2", { text: "Releases" }), releases),
    el("section", {}, el("h2", { text: "Profile" }), profile),
  );
  get(`${base}/profile`).then((p) => { profile.textContent = p.text; }).catch((e) => showError(profile.parentNode, e));
  get(`${base}/releases`).then((r) => {
    const list = el("ul");
    for (const rel of r.releases) {
      list.append(el("li", {}, `${rel.name}${rel.current ? " (current)" : ""} `, rel.url ? el("span", { text: rel.url }) : "", " ",
        rel.current ? "" : jobButton(`Roll back to ${rel.name}`, "POST", `${base}/rollback`, () => ({ release: rel.name }), ops)));
    }
    releases.replaceChildren(r.releases.length ? list : el("p", { text: "No releases kept." }));
  }).catch((e) => showError(releases, e));
  await poll(table.refresh, 1500, signal);
}

// -- an instance -----------------------------------------------------------------------------------
async function instancePage(signal, name) {
  const base = `/v1/instances/${enc(name)}`;
  const status = await get(base);
  const app = name.split("_")[1] || "";
  const facts = el("dl");
  const port = el("dd", { id: "instance-port" });
  const unit = el("pre", { id: "unit" });
  const profile = el("pre", { id: "instance-profile" });
  const journal = el("pre", { id: "journal", role: "log", "aria-live": "off" });
  const lines = el("select", { id: "journal-lines" }, ...[10, 100, 1000].map((n) => el("option", { value: n, text: `last ${n}`, selected: n === 100 })));
  const pause = el("button", { type: "button", id: "journal-pause", class: "secondary", text: "Pause" });
  const journalError = el("div");
  let stream = null;
  let paused = false;
  const follow = () => {
    if (stream) stream.abort();
    stream = new AbortController();
    signal.addEventListener("abort", () => stream.abort());
    journal.replaceChildren();
    journalError.replaceChildren();
    streamLines(`${base}/journal?lines=${enc(lines.value)}&follow=1`, (line) => {
      journal.append(line + "\n");
      while (journal.childNodes.length > 5000) journal.firstChild.remove();
      journal.scrollTop = journal.scrollHeight;
    }, stream.signal).catch((e) => showError(journalError, e));
  };
  lines.addEventListener("change", () => { paused = false; pause.textContent = "Pause"; follow(); });
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (paused) stream.abort();
    else follow();
  });
  // an MPI slave's run is its master's: <user>_<app>_mpi_slave@<run>-<i> -> <user>_<app>_mpi_master@<run>
  const slaveOf = /^(.+)_mpi_slave@(\d+)-\d+$/.exec(name);
  const runFacts = slaveOf ? [el("dt", { text: "Run" }), el("dd", {}, el("a", {
    id: "instance-master", href: `#/instances/${enc(`${slaveOf[1]}_mpi_master@${slaveOf[2]}`)}`,
    text: `run ${slaveOf[2]}: its master`,
  }))] : [];
  const showStatus = (st) => {
    facts.replaceChildren(
      el("dt", { text: "App" }), el("dd", {}, el("a", { href: `#/apps/${enc(app)}`, text: app })),
      ...runFacts,
      el("dt", { text: "State" }), el("dd", { id: "instance-state" }, stateBadge(st.state)),
      el("dt", { text: "Port" }), port,
      el("dt", { text: "Host / node" }), el("dd", { id: "instance-host", text: st.host || "" }),
      el("dt", { text: "Restarts" }), el("dd", { text: String(st.restarts ?? "") }),
      el("dt", { text: "Exit code" }), el("dd", { text: String(st.exit_code ?? "") }),
      el("dt", { text: "Message" }), el("dd", { text: st.message || "" }));
  };
  showStatus(status);
  const refreshPort = () => api("GET", `${base}/port`, undefined, signal).then((p) => port.replaceChildren(portLink(p)), () => port.replaceChildren("none (not running)"));
  setPage(
    name,
    el("section", {}, facts),
    el("section", {}, el("h2", { text: "Journal" }), el("div", { class: "row" }, el("label", { class: "inline" }, "Show ", lines), pause), journal, journalError),
    el("section", {}, el("h2", { text: "Unit" }), unit),
    el("section", {}, el("h2", { text: "Profile" }), profile),
  );
  get(`${base}/unit`).then((u) => { unit.textContent = u.text; }).catch((e) => showError(unit.parentNode, e));
  get(`${base}/profile`).then((p) => { profile.textContent = p.text; }).catch((e) => showError(profile.parentNode, e));
  follow();
  refreshPort();
  await poll(async () => { showStatus(await api("GET", base, undefined, signal)); await refreshPort(); }, 2000, signal);
}

// -- jobs ------------------------------------------------------------------------------------------
async function jobsPage(signal) {
  const tbody = el("tbody");
  setPage("Jobs", el("section", {}, el("div", { class: "table-wrap" }, el("table", { id: "jobs" },
    el("thead", {}, el("tr", {}, ...["Job", "Kind", "State", "App", "Created", "Finished"].map((h) => el("th", { text: h })))), tbody))));
  await poll(async () => {
    const data = await api("GET", "/v1/jobs?limit=100", undefined, signal);
    tbody.replaceChildren(...data.jobs.map((j) => el("tr", {},
      el("td", {}, el("a", { href: `#/jobs/${enc(j.id)}`, text: j.id })),
      el("td", { text: j.kind }), el("td", {}, stateBadge(j.state)),
      el("td", {}, j.args && j.args.app ? el("a", { href: `#/apps/${enc(j.args.app)}`, text: j.args.app }) : ""),
      el("td", { text: localTime(j.created) }), el("td", { text: localTime(j.finished) }))));
    if (!data.jobs.length) tbody.append(el("tr", {}, el("td", { colspan: 6, text: "No jobs yet." })));
    labelCells(tbody.closest("table"));
  }, 3000, signal);
}

const ENDED = new Set(["succeeded", "failed", "cancelled"]);

async function jobPage(signal, id) {
  const job = await get(`/v1/jobs/${enc(id)}`);
  const facts = el("dl");
  const cancelOut = el("div");
  const cancel = el("button", { type: "button", class: "danger", id: "cancel", text: "Cancel job" });
  let ended = false;
  const show = (j) => {
    if (ended && !ENDED.has(j.state)) return; // a late answer from before the end
    ended = ENDED.has(j.state);
    // A running job stops at its next step once asked to (a queued one is cancelled at once).
    const asked = j.cancel_requested && !ended;
    facts.replaceChildren(
      el("dt", { text: "Kind" }), el("dd", { text: j.kind }),
      el("dt", { text: "State" }), el("dd", { id: "job-state" }, stateBadge(j.state), asked ? el("span", { class: "muted", text: " cancel requested: it stops at its next step" }) : ""),
      el("dt", { text: "App" }), el("dd", { text: (j.args && j.args.app) || "" }),
      el("dt", { text: "Created" }), el("dd", { text: localTime(j.created) }),
      el("dt", { text: "Started" }), el("dd", { text: localTime(j.started) }),
      el("dt", { text: "Finished" }), el("dd", { text: localTime(j.finished) }),
      el("dt", { text: "Arguments" }), el("dd", { text: JSON.stringify(j.args) }),
      el("dt", { text: "Error" }), el("dd", { text: j.error || "" }));
    cancel.hidden = ended || asked;
  };
  show(job);
  cancel.addEventListener("click", async () => {
    cancelOut.replaceChildren();
    try {
      show(await api("POST", `/v1/jobs/${enc(id)}/cancel`));
    } catch (e) {
      showError(cancelOut, e);
    }
  });
  // The facts follow the job's states as its events tell them (the record read again at each).
  const refresh = () => { if (!signal.aborted) get(`/v1/jobs/${enc(id)}`).then(show, () => {}); };
  setPage(`Job ${id}`, el("section", {}, facts, cancel, cancelOut),
    el("section", {}, el("h2", { text: "Events" }), jobPanel(id, job.kind, (j) => { if (!signal.aborted) show(j); }, refresh)));
}

// -- admin -----------------------------------------------------------------------------------------
async function adminPage() {
  if (!me || !me.admin) throw new ApiError(403, "forbidden", "Only an admin can see this page.");
  const out = el("div", { id: "new-user" });
  const add = form(
    async (data, f) => {
      const user = await api("POST", "/v1/users", { name: String(data.get("name")).trim(), admin: data.get("admin") === "on" });
      out.replaceChildren(el("div", { class: "notice", role: "status" },
        el("p", { text: `User ${user.name} added. Its token, shown this once:` }), el("code", { class: "token", text: user.token })));
      f.reset();
      await listUsers().catch((e) => showError(users, e));
    },
    field("User name", { name: "name", id: "user-name", required: true }),
    el("label", { class: "inline" }, el("input", { type: "checkbox", name: "admin", id: "user-admin" }), " admin"),
    el("button", { type: "submit", text: "Add user" }),
  );
  const quotaOut = el("div", { id: "quota" });
  const quota = form(
    async (data) => {
      const q = await api("GET", `/v1/users/${enc(String(data.get("name")).trim())}/quota`);
      const rows = Object.keys({ ...q.limits, ...q.usage }).map((k) =>
        el("tr", {}, el("td", { text: k }), el("td", { text: String(q.usage[k] ?? "") }), el("td", { text: String(q.limits[k] ?? "no limit") })));
      quotaOut.replaceChildren(el("div", { class: "table-wrap" }, el("table", {},
        el("thead", {}, el("tr", {}, el("th", { text: q.user }), el("th", { text: "Used" }), el("th", { text: "Limit" }))), el("tbody", {}, rows))));
    },
    field("User name", { name: "name", id: "quota-name", required: true }),
    el("button", { type: "submit", text: "Show quota" }),
  );
  // Every user and its apps (an admin sees them listed; each app's page is its own user's).
  const users = el("div", { id: "users" });
  const listUsers = async () => {
    const { users: rows } = await api("GET", "/v1/users");
    const table = el("table", {},
      el("thead", {}, el("tr", {}, ...["User", "Admin", "Added", "Apps"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows.map((u) => el("tr", { "data-user": u.name },
        el("td", { text: u.name }), el("td", { text: u.admin ? "admin" : "" }),
        el("td", { text: localTime(u.created) }), el("td", { text: u.apps.join(", ") || "none" })))));
    users.replaceChildren(el("div", { class: "table-wrap" }, table));
    labelCells(table);
  };
  setPage("Admin", el("section", {}, el("h2", { text: "Users and their apps" }), users),
    el("section", {}, el("h2", { text: "Add a user" }), add, out),
    el("section", {}, el("h2", { text: "A user's quota" }), quota, quotaOut));
  await listUsers().catch((e) => showError(users, e));
}

// -- routing ---------------------------------------------------------------------------------------
const ROUTES = [
  [/^#\/apps\/([^/]+)$/, appPage],
  [/^#\/apps\/?$/, appsPage],
  [/^#\/instances\/([^/]+)$/, instancePage],
  [/^#\/jobs\/([^/]+)$/, jobPage],
  [/^#\/jobs\/?$/, jobsPage],
  [/^#\/admin$/, adminPage],
];

async function route() {
  if (page) page.abort();
  page = new AbortController();
  const signal = page.signal;
  const hash = location.hash || "#/apps";
  if (!token() || hash === "#/signin") {
    if (token() && hash === "#/signin") { location.hash = "#/apps"; return; }
    signInPage();
    return;
  }
  if (!me) {
    try {
      me = await api("GET", "/v1/whoami");
    } catch (e) {
      if (e.status === 401) signOut("Your session is no longer valid: sign in again.");
      else if (e.name !== "AbortError") { setPage("Error"); showError(main, e); }
      return;
    }
    renderNav();
  }
  for (const [re, render] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    let arg;
    try {
      arg = m[1] === undefined ? undefined : decodeURIComponent(m[1]);
    } catch (_) {
      arg = m[1];
    }
    try {
      await render(signal, arg);
    } catch (e) {
      if (signal.aborted) return;
      setPage(e.status === 404 ? "Not found" : "Error");
      showError(main, e);
    }
    main.focus({ preventScroll: true });
    return;
  }
  setPage("Not found", el("p", { text: "No such page." }));
}

document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", route);
route();
