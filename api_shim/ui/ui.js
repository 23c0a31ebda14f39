// The poolq dashboard (docs/operations.md, "The dashboard"): plain JavaScript, no build step.
//
// Everything shown is made with text nodes and attributes, never parsed as markup: job
// metadata, entrypoints and logs are what users sent. Jobs are listed once, then kept
// current by the change feed (GET /api/jobs/changes?wait=), not by listing them again.
"use strict";

const STATUSES = ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"];
const FEED_WAIT_S = 25;
const MAX_LOG_CHARS = 1 << 20; // a page keeps the last MiB of a log it follows
const PAGE = 50;

// -- who is asking: a token (tokens on) or a tenant (tokens off), kept for this tab only --

const identity = {
  token: sessionStorage.getItem("poolq.token") || "",
  tenant: sessionStorage.getItem("poolq.tenant") || "",
};

function authHeaders() {
  if (identity.token) return { Authorization: "Bearer " + identity.token };
  return identity.tenant ? { "X-Tenant-Id": identity.tenant } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  if ((response.headers.get("Content-Type") || "").startsWith("application/json")) body = await response.json();
  if (response.status === 401) notice("This server has tokens on: enter a token above.");
  return { status: response.status, body, headers: response.headers };
}

// -- making elements: strings become text, never markup ------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function notice(text) {
  document.getElementById("notice").textContent = text || "";
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "";
}

function amount(name, value) {
  if (name === "memory") return (value / 2 ** 30).toFixed(value >= 2 ** 30 ? 1 : 2) + " GiB";
  return String(value);
}

function jobLink(id) {
  return el("a", { href: "#/jobs/" + encodeURIComponent(id) }, id);
}

function statusText(status) {
  return el("span", { class: "status s-" + status }, status);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// -- the change feed: one loop per page, handing each change to the view shown ----------

const feed = { cursor: null, generation: 0, listener: null };

async function startFeed() {
  const generation = ++feed.generation;
  const start = await api("/api/jobs/changes");
  if (start.status !== 200) return false;
  feed.cursor = start.body.cursor; // taken before the view lists: nothing in between is missed
  followFeed(generation);
  return true;
}

async function followFeed(generation) {
  while (generation === feed.generation) {
    let answer;
    try {
      answer = await api(`/api/jobs/changes?since=${encodeURIComponent(feed.cursor)}&wait=${FEED_WAIT_S}`);
    } catch (error) {
      await sleep(2000);
      continue;
    }
    if (generation !== feed.generation) return;
    if (answer.status === 410) { // fell behind the feed's cap: list again, follow from now
      feed.cursor = answer.body.cursor;
      route();
      continue;
    }
    if (answer.status !== 200) {
      await sleep(2000);
      continue;
    }
    feed.cursor = answer.body.cursor;
    if (answer.body.changes.length && feed.listener) feed.listener(answer.body.changes);
    else if (answer.headers.get("Retry-After")) await sleep(1000);
  }
}

// -- the jobs: filter, search, newest first, kept current by the feed ------------------------

const jobsState = { filters: { status: "", pool: "", meta: "" }, next: null, firstPage: true };

function matchesMeta(record) {
  const wanted = jobsState.filters.meta.trim();
  if (!wanted) return true;
  const [key, ...rest] = wanted.split("=");
  const value = (record.metadata || {})[key.trim()];
  return rest.length ? value === rest.join("=").trim() : value !== undefined;
}

function matches(record) {
  const { status, pool } = jobsState.filters;
  return (!status || record.status === status) && (!pool || record.pool_label === pool) && matchesMeta(record);
}

function jobRow(record) {
  return el("tr", { "data-id": record.submission_id, "data-submitted": record.submit_time },
    el("td", { class: "mono" }, jobLink(record.submission_id)),
    el("td", {}, statusText(record.status)),
    el("td", { class: "mono" }, record.pool_label || ""),
    el("td", { class: "mono" }, record.driver_node_id || ""),
    el("td", {}, when(record.submit_time)),
    el("td", { class: "meta" }, Object.keys(record.metadata || {}).length ? JSON.stringify(record.metadata) : ""),
    el("td", { class: "mono" }, record.entrypoint));
}

function listQuery(cursor) {
  const query = new URLSearchParams({ limit: String(PAGE) });
  if (jobsState.filters.status) query.set("status", jobsState.filters.status);
  if (jobsState.filters.pool) query.set("pool_label", jobsState.filters.pool);
  if (cursor) query.set("cursor", cursor);
  return "/api/jobs?" + query;
}

async function showJobs(view) {
  const { status, pool, meta } = jobsState.filters;
  const statusSelect = el("select", { id: "f-status" }, el("option", { value: "" }, "any"),
    STATUSES.map((s) => el("option", { value: s, selected: s === status }, s)));
  const filters = el("form", { id: "filters", role: "search", "aria-label": "Filter jobs" },
    el("label", { for: "f-status" }, "Status"), statusSelect,
    el("label", { for: "f-pool" }, "Pool label"), el("input", { id: "f-pool", value: pool, placeholder: "e.g. gpu=a100" }),
    el("label", { for: "f-meta" }, "Metadata"), el("input", { id: "f-meta", value: meta, placeholder: "key=value" }),
    el("button", { type: "submit" }, "Filter"));
  const search = el("form", { id: "search", role: "search", "aria-label": "Find a job" },
    el("label", { for: "f-id" }, "Submission id"), el("input", { id: "f-id", required: true }),
    el("button", { type: "submit" }, "Open"));
  const body = el("tbody");
  const table = el("table", { id: "jobs" }, el("caption", { class: "visually-hidden" }, "Jobs, newest first"),
    el("thead", {}, el("tr", {}, ["Submission id", "Status", "Pool label", "Node", "Submitted", "Metadata", "Entrypoint"]
      .map((h) => el("th", { scope: "col" }, h)))), body);
  const older = el("button", { id: "older", type: "button", hidden: true }, "Older jobs");
  view.append(el("h2", {}, "Jobs"), filters, search, table, older);

  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    jobsState.filters = { status: statusSelect.value, pool: filters.querySelector("#f-pool").value.trim(),
      meta: filters.querySelector("#f-meta").value };
    route();
  });
  search.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = "#/jobs/" + encodeURIComponent(search.querySelector("#f-id").value.trim());
  });
  const load = async (cursor) => {
    const answer = await api(listQuery(cursor));
    if (answer.status !== 200) return;
    for (const record of answer.body) if (matchesMeta(record)) body.append(jobRow(record));
    const link = answer.headers.get("Link") || "";
    const next = /cursor=(\d+)/.exec(link);
    jobsState.next = next ? next[1] : null;
    older.hidden = !jobsState.next;
  };
  older.addEventListener("click", () => { jobsState.firstPage = false; load(jobsState.next); });
  jobsState.firstPage = true;
  await load(null);

  feed.listener = async (changes) => {
    const ids = [...new Set(changes.map((c) => c.submission_id))];
    const gone = new Set(changes.filter((c) => c.status === "DELETED").map((c) => c.submission_id));
    for (const id of gone) body.querySelector(`tr[data-id="${CSS.escape(id)}"]`)?.remove();
    const wanted = ids.filter((id) => !gone.has(id) &&
      (jobsState.firstPage || body.querySelector(`tr[data-id="${CSS.escape(id)}"]`)));
    for (let start = 0; start < wanted.length; start += 100) {
      const chunk = wanted.slice(start, start + 100);
      const answer = await api("/api/jobs?ids=" + chunk.map(encodeURIComponent).join(","));
      if (answer.status !== 200) continue;
      for (const record of answer.body) {
        const row = body.querySelector(`tr[data-id="${CSS.escape(record.submission_id)}"]`);
        if (!matches(record)) { row?.remove(); continue; }
        if (row) row.replaceWith(jobRow(record));
        else insertNewest(body, record);
      }
    }
  };
}

function insertNewest(body, record) {
  const row = jobRow(record);
  const later = [...body.children].find((other) => Number(other.dataset.submitted) <= record.submit_time);
  body.insertBefore(row, later || null);
}

// -- one job: its record, why it waits, its live log, stop and delete ----------------------

async function showJob(view, id) {
  const heading = el("h2", {}, "Job ", el("span", { class: "mono" }, id));
  const fields = el("dl", { id: "record" });
  const stop = el("button", { id: "stop", type: "button" }, "Stop");
  const remove = el("button", { id: "delete", type: "button", class: "danger" }, "Delete");
  const log = el("pre", { id: "log", tabindex: "0", "aria-label": "Output" });
  view.append(heading, el("div", {}, stop, " ", remove), fields, el("h2", {}, "Output"), log);

  const render = async () => {
    const answer = await api("/api/jobs/" + encodeURIComponent(id));
    if (answer.status === 404) {
      fields.replaceChildren(el("p", {}, "No such job for this tenant (or it was deleted)."));
      stop.disabled = remove.disabled = true;
      return null;
    }
    if (answer.status !== 200) return null;
    const r = answer.body;
    const rows = [
      ["Status", statusText(r.status)], ["Message", r.message || ""], ["Entrypoint", el("span", { class: "mono" }, r.entrypoint)],
      ["Pool label", r.pool_label || ""], ["Node", r.driver_node_id || ""], ["Submitted", when(r.submit_time)],
      ["Started", when(r.start_time)], ["Ended", when(r.end_time)], ["Exit code", r.driver_exit_code ?? ""],
      ["Attempt", r.attempt_number], ["Metadata", el("span", { class: "mono" }, JSON.stringify(r.metadata || {}))],
      ["Resources", `${r.entrypoint_num_cpus} CPU, ${amount("memory", r.entrypoint_memory || 0)}, ${r.entrypoint_num_gpus || 0} GPU`
        + (Object.keys(r.entrypoint_resources || {}).length ? ", " + JSON.stringify(r.entrypoint_resources) : "")],
    ];
    if (r.status === "FAILED" && r.error_type) rows.push(["Failure", `${r.error_type}: ${r.message || ""}`]);
    const reasons = (r.scheduling && r.scheduling.reasons) || [];
    if (r.status === "PENDING" && reasons.length) {
      rows.push(["Why it waits", el("ul", { id: "reasons" }, reasons.map((reason) =>
        el("li", {}, `${reason.units} unit(s): ${reason.reason}` + (reason.requirement ? ` (${reason.requirement})` : ""))))]);
    }
    fields.replaceChildren(...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
    const ended = ["SUCCEEDED", "FAILED", "STOPPED"].includes(r.status);
    stop.disabled = ended;
    return r;
  };

  stop.addEventListener("click", async () => {
    const answer = await api(`/api/jobs/${encodeURIComponent(id)}/stop`, { method: "POST" });
    notice(answer.status === 200 ? (answer.body.stopped ? "Stop requested." : "The job had ended already.") : answer.body?.error);
    render();
  });
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete job ${id} and its output?`)) return;
    const answer = await api("/api/jobs/" + encodeURIComponent(id), { method: "DELETE" });
    notice(answer.status === 200 ? "Deleted." : answer.body?.error);
    if (answer.status === 200) location.hash = "#/jobs";
  });
  feed.listener = (changes) => { if (changes.some((c) => c.submission_id === id)) render(); };
  if (await render()) followLog(id, log, view);
}

async function followLog(id, pre, view) {
  const controller = new AbortController();
  view.addEventListener("leave", () => controller.abort(), { once: true });
  let offset = 0;
  while (!controller.signal.aborted) {
    let response;
    try {
      response = await fetch(`/api/jobs/${encodeURIComponent(id)}/logs?follow=1&offset=${offset}`,
        { headers: authHeaders(), signal: controller.signal });
    } catch (error) {
      if (controller.signal.aborted) return;
      await sleep(2000);
      continue;
    }
    if (response.status !== 200) { // busy (503) or gone: try again soon, from where it stopped
      if (response.status === 404) return;
      await sleep(2000);
      continue;
    }
    offset = Number(response.headers.get("X-Log-Start") || 0);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return; // the job ended and all was sent
        offset += value.length;
        const text = pre.textContent + decoder.decode(value, { stream: true });
        pre.textContent = text.length > MAX_LOG_CHARS ? text.slice(-MAX_LOG_CHARS) : text;
        pre.scrollTop = pre.scrollHeight;
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      await sleep(1000); // the stream broke off: resume at the offset
    }
  }
}

// -- pools and nodes ----------------------------------------------------------------------

function bars(node) {
  return el("td", {}, Object.entries(node.capacity).map(([name, capacity]) => {
    const reserved = node.reserved[name] || 0;
    const label = `${name}: ${amount(name, reserved)} of ${amount(name, capacity)} reserved, ${amount(name, node.free[name] ?? 0)} free`;
    return el("div", {}, el("meter", { min: 0, max: capacity || 1, value: reserved, "aria-label": label, title: label }), " ", label);
  }));
}

async function showPools(view) {
  const pools = el("tbody");
  const nodes = el("tbody");
  view.append(el("h2", {}, "Pools"),
    el("table", { id: "pools" }, el("thead", {}, el("tr", {}, ["Pool", "Nodes (live)", "Capacity, reserved and free"]
      .map((h) => el("th", { scope: "col" }, h)))), pools),
    el("h2", {}, "Nodes"),
    el("table", { id: "nodes" }, el("thead", {}, el("tr", {}, ["Node", "Pool", "State", "Labels", "Capacity, reserved and free"]
      .map((h) => el("th", { scope: "col" }, h)))), nodes));
  const refresh = async () => {
    const [poolAnswer, nodeAnswer] = await Promise.all([api("/api/pools"), api("/api/nodes")]);
    if (poolAnswer.status === 200) {
      pools.replaceChildren(...poolAnswer.body.map((p) => el("tr", {}, el("td", { class: "mono" }, p.pool),
        el("td", {}, `${p.nodes} (${p.alive})`), bars(p))));
    }
    if (nodeAnswer.status === 200) {
      nodes.replaceChildren(...nodeAnswer.body.map((n) => el("tr", { "data-node": n.node_id },
        el("td", { class: "mono" }, n.node_id), el("td", { class: "mono" }, n.pool),
        el("td", {}, (n.alive ? "live" : n.state || "lost") + (n.draining ? ", draining" : "")),
        el("td", { class: "mono" }, Object.entries(n.labels).map(([k, v]) => (v === null ? k : `${k}=${v}`)).join(", ")),
        bars(n))));
    }
  };
  await refresh();
  let pending = null;
  feed.listener = () => { pending = pending || setTimeout(() => { pending = null; refresh(); }, 1000); };
  const timer = setInterval(refresh, 10000); // liveness changes are not job changes
  view.addEventListener("leave", () => clearInterval(timer), { once: true });
}

// -- the queue over the last hour and the tenant's quota -------------------------------------

function chart(id, samples, series, unit) {
  if (samples.length < 2) {
    return el("p", { id }, "Not enough samples yet: the placement workers keep one every 10 s.");
  }
  const width = 600, height = 140, pad = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("id", id);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const top = Math.max(1, ...samples.flatMap((s) => series.map(([key]) => s[key] || 0)));
  const t0 = samples.length ? samples[0].time : 0, t1 = samples.length ? samples[samples.length - 1].time : 1;
  const x = (t) => pad + ((t - t0) / Math.max(1, t1 - t0)) * (width - 2 * pad);
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  const labels = [];
  for (const [key, name, cls] of series) {
    const line = document.createElementNS(svg.namespaceURI, "polyline");
    line.setAttribute("class", cls);
    line.setAttribute("points", samples.map((s) => `${x(s.time).toFixed(1)},${y(s[key] || 0).toFixed(1)}`).join(" "));
    svg.append(line);
    const last = samples.length ? samples[samples.length - 1][key] : null;
    labels.push(`${name}: ${last === null || last === undefined ? "no data" : last + unit} now`);
  }
  const scale = document.createElementNS(svg.namespaceURI, "text");
  scale.setAttribute("x", "2");
  scale.setAttribute("y", "12");
  scale.textContent = `max ${top}${unit}`;
  svg.append(scale);
  svg.setAttribute("aria-label", labels.join("; "));
  return el("figure", {}, svg, el("figcaption", { class: "legend" }, labels.map((l) => el("span", {}, l))));
}

async function showOverview(view) {
  const answer = await api("/api/overview");
  if (answer.status !== 200) {
    view.append(el("p", {}, answer.body?.error || `The overview is not available (${answer.status}).`));
    return;
  }
  const o = answer.body;
  const counts = Object.entries(o.counts || {});
  const limits = Object.entries((o.quota && o.quota.limits) || {});
  const use = (o.quota && o.quota.use) || {};
  const history = o.history || [];
  view.append(
    el("h2", {}, "Jobs of tenant ", el("span", { class: "mono" }, o.tenant)),
    el("table", { id: "counts" }, el("tbody", {}, counts.map(([s, n]) => el("tr", {}, el("th", { scope: "row" }, s), el("td", {}, n))))),
    el("h2", {}, "Quota"),
    limits.length
      ? el("table", { id: "quota" }, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Limit"), el("th", { scope: "col" }, "In use"),
        el("th", { scope: "col" }, "Allowed"))), el("tbody", {}, limits.map(([name, limit]) =>
        el("tr", {}, el("th", { scope: "row" }, name), el("td", {}, amount(name, use[name] ?? 0)), el("td", {}, amount(name, limit))))))
      : el("p", { id: "quota" }, "No resource quota is set for this tenant. In use: " +
        (Object.entries(use).map(([name, value]) => `${name} ${amount(name, value)}`).join(", ") || "nothing")),
    el("p", { id: "pending" }, `Pending jobs: ${o.quota.pending}` +
      (o.quota.max_pending === null ? " (no limit)" : ` of at most ${o.quota.max_pending}`)),
    el("h2", {}, "Waiting for placement, last hour (whole service)"),
    chart("queue-chart", history, [["waiting", "waiting", "a"]], ""),
    el("h2", {}, "Placement latency, last hour"),
    chart("latency-chart", history, [["latency_p50_ms", "p50", "a"], ["latency_p99_ms", "p99", "b"]], " ms"));
  feed.listener = null;
  const timer = setInterval(route, 10000); // samples come every 10 s
  view.addEventListener("leave", () => clearInterval(timer), { once: true });
}

// -- routing between pages (the hash) and the identity form ----------------------------------

async function route() {
  const view = document.getElementById("view");
  view.dispatchEvent(new Event("leave"));
  const fresh = view.cloneNode(false); // drops the old page's listeners with it
  view.replaceWith(fresh);
  feed.listener = null;
  notice("");
  const hash = location.hash || "#/jobs";
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", hash.startsWith(link.getAttribute("href")));
    if (link.hasAttribute("aria-current")) link.setAttribute("aria-current", "page");
  }
  const job = /^#\/jobs\/(.+)$/.exec(hash);
  if (job) await showJob(fresh, decodeURIComponent(job[1]));
  else if (hash === "#/pools") await showPools(fresh);
  else if (hash === "#/overview") await showOverview(fresh);
  else await showJobs(fresh);
}

async function whoami() {
  const answer = await api("/api/overview");
  const who = document.getElementById("whoami");
  who.textContent = answer.status === 200 ? "tenant " + answer.body.tenant : "";
}

async function begin() {
  notice("");
  await whoami();
  await startFeed();
  await route();
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("identity");
  form.querySelector("#tenant").value = identity.tenant;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    identity.token = form.querySelector("#token").value.trim(); // empty: none
    identity.tenant = form.querySelector("#tenant").value.trim();
    form.querySelector("#token").value = "";
    sessionStorage.setItem("poolq.token", identity.token);
    sessionStorage.setItem("poolq.tenant", identity.tenant);
    begin();
  });
  window.addEventListener("hashchange", route);
  begin();
});
