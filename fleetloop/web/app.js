"use strict";
// fleetloop operator dashboard: plain JS, no build step, nothing fetched from outside this server.
//
// One live connection: server-sent events read through fetch(), so the token travels in the
// Authorization header and never in a URL (EventSource cannot send headers). Robot cards are
// built once and touched only when what they show changed, so 100 robots at one snapshot per
// second cost a few string comparisons. Charts, policies and episodes are re-fetched only when
// the server's index version moved, and at most every few seconds.

const TOKEN_KEY = "fleetloop.dashboard.token";
const state = {
  token: null, me: null, snap: null, indexVersion: -1, steeringSig: "", policies: null,
  cards: new Map(), filter: "", epOffset: 0, epLimit: 15, epTotal: 0, thumbs: [],
};

// ---- helpers ---------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}
const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}
const $ = (sel) => document.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pct = (x) => (x == null ? "–" : `${Math.round(x * 100)}%`);
const ciText = (r) => (r && r.n ? `[${pct(r.lo)}–${pct(r.hi)}] n=${r.n}` : "no labelled episodes");
function fmtNum(x) {
  if (x == null || typeof x !== "number") return x == null ? "–" : String(x);
  if (Number.isInteger(x)) return x.toLocaleString();
  return Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(3);
}
function fmtBytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${u[i]}`;
}

// A damaged spool entry (set aside by the robot's uploader, kept on its disk) needs a person.
function spoolText(sp) {
  const base = `${sp.episodes} ep · ${fmtBytes(sp.bytes)}`;
  return sp.damaged_episodes ? `${base} · ${sp.damaged_episodes} damaged` : base;
}
const pad2 = (n) => String(n).padStart(2, "0");
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
function fmtClock(ns, seconds = false) {  // 24-hour local time, the same in every browser locale
  const d = new Date(ns / 1e6);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}${seconds ? `:${pad2(d.getSeconds())}` : ""}`;
}
function fmtTime(ns, withDate = false) {
  const d = new Date(ns / 1e6);
  return withDate ? `${MONTHS[d.getMonth()]} ${d.getDate()} ${fmtClock(ns)}` : fmtClock(ns, true);
}
function ago(ns) {
  const s = Math.max(0, (Date.now() - ns / 1e6) / 1000);
  if (s < 90) return `${Math.round(s)}s ago`;
  if (s < 5400) return `${Math.round(s / 60)}m ago`;
  if (s < 129600) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}
function wilson(k, n, z = 1.96) {  // same interval as fleetloop.stats.wilson_interval
  if (!n) return { k, n, rate: null, lo: 0, hi: 1 };
  const p = k / n, z2 = z * z, d = 1 + z2 / n;
  const c = (p + z2 / (2 * n)) / d, h = (z * Math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / d;
  return { k, n, rate: p, lo: Math.max(0, c - h), hi: Math.min(1, c + h) };
}
function throttled(fn, ms) {
  let last = 0, timer = null;
  return () => {
    const wait = last + ms - Date.now();
    if (wait <= 0) { last = Date.now(); fn(); }
    else if (!timer) timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}
function rateBar(r) {
  const bar = el("div", { class: "ratebar", title: r && r.n ? `${pct(r.rate)} ${ciText(r)}` : "no labelled episodes" });
  if (r && r.n) {
    bar.append(el("div", { class: "ci", style: `left:${r.lo * 100}%;width:${(r.hi - r.lo) * 100}%` }));
    bar.append(el("div", { class: "pt", style: `left:calc(${r.rate * 100}% - 1px)` }));
  }
  return bar;
}
function toast(text, error = false) {
  const t = el("div", { class: error ? "toast err" : "toast", text });
  $("#toasts").append(t);
  setTimeout(() => t.remove(), error ? 7000 : 3500);
}

// ---- token and API ---------------------------------------------------------------------------
function loadToken() {
  // A token may arrive once in the URL (#token=... is never sent to the server); keep it and
  // take it out of the address bar and history.
  const hash = new URLSearchParams(location.hash.slice(1));
  const query = new URLSearchParams(location.search);
  const given = hash.get("token") || query.get("token");
  if (given) {
    localStorage.setItem(TOKEN_KEY, given);
    query.delete("token");
    history.replaceState(null, "", location.pathname + (query.toString() ? `?${query}` : ""));
  }
  state.token = localStorage.getItem(TOKEN_KEY);
}
function authHeaders(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}
async function api(method, path, body) {
  const opts = { method, headers: authHeaders(body !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) opts.body = JSON.stringify(body);
  const res = await fetch(path, opts);
  let data = null;
  try { data = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const err = new Error((data && data.detail) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return data;
}
const canOperate = () => state.me && state.me.role === "operator";
async function act(label, method, path, body) {
  try {
    const r = await api(method, path, body);
    toast(`${label}: done${r && r.ack ? ` (robot: ${r.ack})` : ""}`);
    refreshAudit();
    return r;
  } catch (e) {
    toast(`${label}: ${e.message}`, true);
    if (e.status === 401) askToken();
    refreshAudit();
    return null;
  } finally {
    refreshPolicies();
  }
}
function guardButtons(root = document) {
  for (const b of root.querySelectorAll("button.op")) {
    if (!canOperate()) { b.disabled = true; b.title = "needs an operator token"; }
  }
}

let tokenWaiters = [];
function askToken(message = "") {
  const dlg = $("#token-dialog");
  $("#token-error").textContent = message;
  $("#token-input").value = "";
  if (!dlg.open) dlg.showModal();
  return new Promise((resolve) => tokenWaiters.push(resolve));
}
async function whoami() {
  try {
    state.me = await api("GET", "api/whoami");
  } catch (e) {
    state.me = null;
    if (e.status === 401) {
      await askToken(state.token ? "That token was not accepted." : "");
      return whoami();
    }
    throw e;
  }
  const who = $("#who");
  who.textContent = `${state.me.name} · ${state.me.role}`;
  who.className = `who ${state.me.role}`;
  document.body.classList.toggle("viewer", !canOperate());
  for (const b of document.querySelectorAll("button.op")) { b.disabled = !canOperate(); b.title = canOperate() ? "" : "needs an operator token"; }
  return state.me;
}

// ---- live stream -----------------------------------------------------------------------------
function setLive(kind, text) {
  const n = $("#live");
  n.className = `live ${kind}`;
  n.textContent = text;
}
async function live() {
  for (;;) {
    try {
      const res = await fetch("api/events", { headers: authHeaders({ Accept: "text/event-stream" }), cache: "no-store" });
      if (res.status === 401 || res.status === 403) {
        setLive("bad", "signed out");
        await askToken("The server refused the token.");
        await whoami();
        continue;
      }
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      setLive("ok", "live");
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          handleEvent(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
    } catch (_) { /* reconnect below */ }
    setLive("bad", "reconnecting…");
    await sleep(2000);
  }
}
function handleEvent(block) {
  let type = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  if (type === "fleet") applySnapshot(JSON.parse(data));
  else if (type === "problem") setLive("bad", JSON.parse(data).detail);
}

function applySnapshot(s) {
  state.snap = s;
  setLive("ok", `live · ${fmtTime(s.ts_ns)}`);
  renderStats(s);
  renderGrid(s.robots, s.policy);
  renderLearner(s.learner, s.queue, s.ingest);
  fillSelect($("#ep-filters [name=robot_id]"), s.robots.map((r) => r.robot_id));
  const steering = JSON.stringify([s.policy.pointer, s.policy.canary, s.policy.robot_pins, s.policy.latest]);
  if (s.episodes.index_version !== state.indexVersion) {
    state.indexVersion = s.episodes.index_version;
    refreshSeries();
    refreshEpisodes();
    refreshPolicies();
  } else if (steering !== state.steeringSig) {
    refreshPolicies();
  }
  state.steeringSig = steering;
}

// ---- summary strip ---------------------------------------------------------------------------
function setStat(id, value, sub) {
  $(`#s-${id}`).textContent = value;
  $(`#s-${id}-sub`).textContent = sub;
}
function renderStats(s) {
  const f = s.fleet, e = s.episodes, l = s.learner, p = s.policy;
  setStat("online", `${f.online} / ${f.robots}`,
    `${f.takeovers} takeover · ${f.paused} paused · ${f.spool_episodes} spooled`);
  setStat("success", pct(e.success.rate), ciText(e.success));
  setStat("interv", pct(e.intervention.rate), `${e.intervention.k} of ${e.intervention.n} rollouts`);
  const pin = p.pointer && p.pointer.pinned ? "pinned" : "follows learner";
  const canary = p.canary ? ` · canary ${p.canary.version}` : "";
  setStat("policy", (p.pointer && p.pointer.version) || "none", `${pin}${canary}`);
  setStat("step", l.step == null ? "–" : fmtNum(l.step),
    l.available && !l.fresh ? `stale: updated ${Math.round(l.age_s)}s ago` : l.available ? `${l.step_rate == null ? "–" : l.step_rate.toFixed(2)} steps/s · ${fmtNum(l.samples_per_s)} samples/s`
      : "learner not reporting");
  setStat("episodes", fmtNum(e.indexed), `${fmtNum(s.ingest.episodes_per_s * 60)} /min · ${fmtNum(e.frames)} frames`);
}

// ---- fleet grid ------------------------------------------------------------------------------
function makeCard(id) {
  const c = { id, sig: "" };
  c.dot = el("i", { class: "dot" });
  c.rid = el("span", { class: "rid", text: id, title: "details", onclick: () => openRobot(id) });
  c.chips = el("span", { class: "chips" });
  c.ver = el("span", { class: "ver" });
  c.task = el("div", { class: "task" });
  c.succ = el("span");
  c.bar = el("div");
  c.interv = el("span");
  c.spool = el("span");
  c.take = el("button", { type: "button", class: "op", onclick: () => toggleTakeover(c) });
  c.more = el("button", { type: "button", class: "more", title: "details, pause, pin", text: "⋯", onclick: () => openRobot(id) });
  c.node = el("div", { class: "card", "data-robot": id },
    el("div", { class: "row" }, c.dot, c.rid, c.chips, c.ver),
    c.task,
    el("div", { class: "metric" }, el("span", { text: "success" }), c.succ),
    c.bar,
    el("div", { class: "metric" }, el("span", { text: "interventions" }), c.interv),
    el("div", { class: "metric" }, el("span", { text: "spool" }), c.spool),
    el("div", { class: "buttons" }, c.take, c.more));
  return c;
}
function fillCard(c, r, policy) {
  c.robot = r;
  c.node.classList.toggle("offline", !r.online);
  c.node.classList.toggle("take", r.online && r.takeover_requested);
  c.node.classList.toggle("paused", r.online && r.paused);
  c.dot.className = `dot ${!r.online ? "off" : r.takeover_requested ? "take" : r.paused ? "pause" : "on"}`;
  c.chips.replaceChildren();
  if (r.online && r.takeover_requested) c.chips.append(el("span", { class: "chip warn", text: "takeover" }));
  if (r.online && r.paused) c.chips.append(el("span", { class: "chip pause", text: "paused" }));
  if (r.target_source === "robot_pin") c.chips.append(el("span", { class: "chip pin", text: "pinned", title: `pinned to ${r.target_version}` }));
  if (r.target_source === "canary") c.chips.append(el("span", { class: "chip canary", text: "canary", title: `canary ${r.target_version}` }));
  const next = r.pending_version || (r.target_version && r.target_version !== r.policy_version ? r.target_version : "");
  c.ver.textContent = (r.policy_version || "—") + (next ? ` → ${next}` : "");
  c.ver.title = next ? `running ${r.policy_version}; ${r.pending_version ? "loaded" : "target"} ${next} (swaps at the next episode)` : "policy version running";
  c.task.replaceChildren();
  if (!r.online) c.task.append(`offline · ${r.last_seen_ns ? `last seen ${ago(r.last_seen_ns)}` : "no heartbeat"}`);
  else if (r.task_id) c.task.append(el("b", { text: r.task_id }), " · episode running");
  else c.task.append("idle");
  if (r.upload_error) c.task.title = `upload error: ${r.upload_error}`;
  c.succ.textContent = r.success.n ? `${pct(r.success.rate)}  ${ciText(r.success)}` : "–";
  c.bar.replaceWith((c.bar = rateBar(r.success)));
  c.interv.textContent = r.intervention.n ? `${pct(r.intervention.rate)} of ${r.intervention.n}` : "–";
  c.spool.textContent = spoolText(r.spool);
  c.take.textContent = r.takeover_requested ? "Release" : "Take over";
  c.take.className = r.takeover_requested ? "op" : "op warn";
  c.take.disabled = !canOperate() || !r.online;
  c.take.title = !canOperate() ? "needs an operator token" : !r.online ? "robot is offline" : "";
}
function renderGrid(robots, policy) {
  const grid = $("#grid");
  let added = false;
  const seen = new Set();
  for (const r of robots) {
    seen.add(r.robot_id);
    let c = state.cards.get(r.robot_id);
    if (!c) { c = makeCard(r.robot_id); state.cards.set(r.robot_id, c); added = true; }
    // Only what the card shows goes into the signature (an online robot's age does not).
    const sig = JSON.stringify([r.online, r.task_id, r.policy_version, r.pending_version, r.target_version,
      r.target_source, r.takeover_requested, r.paused, r.success, r.intervention, r.spool, r.upload_error,
      r.online ? 0 : Math.floor((r.age_s || 0) / 30), canOperate()]);
    if (sig !== c.sig) { fillCard(c, r, policy); c.sig = sig; }
    const f = state.filter;
    c.node.hidden = !!f && !r.robot_id.toLowerCase().includes(f) && !(r.task_id || "").toLowerCase().includes(f);
  }
  for (const [id, c] of state.cards) if (!seen.has(id)) { c.node.remove(); state.cards.delete(id); }
  if (added) grid.append(...robots.map((r) => state.cards.get(r.robot_id).node));  // keep id order
  $("#grid-empty").hidden = robots.length > 0;
}
async function toggleTakeover(c) {
  const r = c.robot;
  c.take.disabled = true;  // until the next snapshot shows the new state
  const action = r.takeover_requested ? "release" : "takeover";
  await act(`${action} ${r.robot_id}`, "POST", `api/robots/${encodeURIComponent(r.robot_id)}/${action}`,
    { reason: "dashboard" });
}

// ---- charts ----------------------------------------------------------------------------------
const refreshSeries = throttled(async () => {
  try {
    const [series, policies] = await Promise.all([api("GET", "api/series"), state.policies || api("GET", "api/policies")]);
    renderCharts(series, policies);
    fillSelect($("#ep-filters [name=task_id]"), Object.keys(series.tasks));
  } catch (e) { /* the next index change retries */ }
}, 4000);

function timeTicks(t0, t1, count = 4) {
  const out = [];
  for (let i = 0; i <= count; i++) out.push(t0 + ((t1 - t0) * i) / count);
  return out;
}
function renderCharts(series, policies) {
  const box = $("#charts");
  box.replaceChildren();
  const tasks = Object.entries(series.tasks);
  $("#charts-empty").hidden = tasks.length > 0;
  if (!tasks.length) { $("#timeline").replaceChildren(); return; }
  const t0 = series.t0_ns, t1 = Math.max(series.t1_ns, t0 + 1), longSpan = t1 - t0 > 20 * 3600e9;
  const W = 440, H = 150, L = 34, R = 10, T = 16, B = 20;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v) * (H - T - B);
  const half = (series.bucket_s * 1e9) / 2;
  for (const [task, points] of tasks) {
    const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `success rate of ${task} over time` });
    for (const v of [0, 0.5, 1]) {
      s.append(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      s.append(svg("text", { x: L - 5, y: y(v) + 3, "text-anchor": "end" }, `${v * 100}%`));
    }
    timeTicks(t0, t1).forEach((t, i, all) => {  // the end ticks anchor inwards so they are not clipped
      const anchor = i === 0 ? "start" : i === all.length - 1 ? "end" : "middle";
      s.append(svg("text", { x: x(t), y: H - 5, "text-anchor": anchor }, longSpan ? fmtTime(t, true) : fmtClock(t)));
    });
    for (const v of series.versions) {  // policy timeline: when each version started running
      if (v.first_ns < t0 || v.first_ns > t1) continue;
      s.append(svg("line", { class: "vmark", x1: x(v.first_ns), x2: x(v.first_ns), y1: T - 4, y2: H - B }));
    }
    const labelled = points.filter((p) => p.success.n > 0);
    if (labelled.length) {
      const up = labelled.map((p) => `${x(p.t_ns + half).toFixed(1)},${y(p.success.hi).toFixed(1)}`);
      const down = labelled.slice().reverse().map((p) => `${x(p.t_ns + half).toFixed(1)},${y(p.success.lo).toFixed(1)}`);
      s.append(svg("path", { class: "band", d: `M${up.join("L")}L${down.join("L")}Z` }));
      s.append(svg("path", { class: "line", d: `M${labelled.map((p) => `${x(p.t_ns + half).toFixed(1)},${y(p.success.rate).toFixed(1)}`).join("L")}` }));
    }
    s.append(svg("path", { class: "interv", d: `M${points.map((p) => `${x(p.t_ns + half).toFixed(1)},${y(p.intervention.rate || 0).toFixed(1)}`).join("L")}` }));
    for (const p of labelled) {
      const dot = svg("circle", { class: "pt", cx: x(p.t_ns + half), cy: y(p.success.rate), r: Math.min(4.5, 1.8 + Math.sqrt(p.success.n) / 2) });
      dot.append(svg("title", {}, `${fmtTime(p.t_ns, longSpan)} · success ${pct(p.success.rate)} ${ciText(p.success)} · interventions ${pct(p.intervention.rate)} of ${p.episodes}`));
      s.append(dot);
    }
    const k = points.reduce((a, p) => a + p.success.k, 0), n = points.reduce((a, p) => a + p.success.n, 0);
    const all = wilson(k, n);
    const iv = points.reduce((a, p) => a + p.intervention.k, 0), ne = points.reduce((a, p) => a + p.episodes, 0);
    box.append(el("div", { class: "chart" },
      el("div", { class: "title" }, el("b", { text: task }),
        el("span", { text: `${pct(all.rate)} ${ciText(all)} · interventions ${pct(ne ? iv / ne : null)}` })),
      s));
  }
  renderTimeline(series, policies, t0, t1, longSpan);
}

function renderTimeline(series, policies, t0, t1, longSpan) {
  const versions = series.versions.slice(-8);
  const W = 1200, L = 80, R = 12, row = 16, T = 16;
  const H = T + versions.length * row + 22;
  const x = (t) => L + ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * (W - L - R);
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "policy timeline" });
  const current = policies && policies.pointer ? policies.pointer.version : "";
  const canaryVersion = policies && policies.canary ? policies.canary.version : "";
  versions.forEach((v, i) => {
    const yy = T + i * row;
    s.append(svg("text", { x: L - 8, y: yy + 11, "text-anchor": "end", class: v.version === current ? "vlabel" : "" }, v.version));
    const bar = svg("rect", { x: x(v.first_ns), y: yy + 3, width: Math.max(3, x(v.last_ns) - x(v.first_ns)), height: row - 6, rx: 3,
      fill: v.version === current ? "#3ecf8e" : canaryVersion === v.version ? "#ffd43b" : "#4da3ff",
      opacity: v.version === current ? 0.9 : 0.55 });
    bar.append(svg("title", {}, `${v.version}: ${v.episodes} rollouts, ${fmtTime(v.first_ns, true)} – ${fmtTime(v.last_ns, true)}`));
    s.append(bar);
  });
  const axisY = T + versions.length * row + 4;
  s.append(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: axisY, y2: axisY }));
  timeTicks(t0, t1, 8).forEach((t, i, all) => {
    const anchor = i === 0 ? "start" : i === all.length - 1 ? "end" : "middle";
    s.append(svg("text", { x: x(t), y: axisY + 14, "text-anchor": anchor }, longSpan ? fmtTime(t, true) : fmtClock(t)));
  });
  for (const h of (policies && policies.history) || []) {  // operator steering, as markers on the axis
    if (h.action === "publish" || h.ts_ns < t0 || h.ts_ns > t1 + 3600e9) continue;
    const px = x(h.ts_ns);
    const m = svg("path", { d: `M${px - 4},${axisY} L${px + 4},${axisY} L${px},${axisY - 7} Z`, fill: "#ffa94d" });
    m.append(svg("title", {}, `${fmtTime(h.ts_ns, true)} · ${h.action} ${h.version || ""} ${h.robot_id ? `(${h.robot_id})` : ""} by ${h.by || "?"}`));
    s.append(m);
  }
  $("#timeline").replaceChildren(s);
}

// ---- policies --------------------------------------------------------------------------------
const refreshPolicies = throttled(async () => {
  try {
    state.policies = await api("GET", "api/policies");
    renderPolicies(state.policies);
    fillSelect($("#ep-filters [name=policy_version]"), state.policies.versions.map((v) => v.version));
  } catch (e) { /* shown on the next try */ }
}, 1500);

function renderPolicies(p) {
  const st = $("#policy-state");
  st.replaceChildren(
    el("span", {}, "Fleet ", el("b", { text: (p.pointer && p.pointer.version) || "none" }),
      p.pointer && p.pointer.pinned ? " (pinned)" : " (follows learner)"),
    el("span", { text: "·" }),
    el("span", {}, "Canary ", el("b", { text: p.canary ? p.canary.version : "none" }),
      p.canary ? ` on ${[p.canary.fraction ? `${Math.round(p.canary.fraction * 100)}% of robots` : "",
        ...p.canary.robots].filter(Boolean).join(" + ")}` : ""),
    el("span", { text: "·" }),
    el("span", {}, "Robot pins ", el("b", { text: Object.keys(p.robot_pins).length ? Object.entries(p.robot_pins).map(([r, v]) => `${r}→${v}`).join(", ") : "none" })));
  const body = $("#policy-table tbody");
  body.replaceChildren();
  for (const v of p.versions.slice(0, 14)) {
    const chips = el("span");
    if (v.current) chips.append(el("span", { class: "chip good", text: p.pointer.pinned ? "current · pinned" : "current" }));
    if (v.canary) chips.append(el("span", { class: "chip canary", text: "canary" }));
    if (v.pinned_robots.length) chips.append(el("span", { class: "chip pin", text: `${v.pinned_robots.length} pinned`, title: v.pinned_robots.join(", ") }));
    if (!v.registered) chips.append(el("span", { class: "chip", text: "not in registry" }));
    const metrics = v.metrics || {};
    const lossKey = "loss" in metrics ? "loss" : Object.keys(metrics)[0];
    const enc = encodeURIComponent(v.version);
    const buttons = v.registered ? el("div", { class: "rowact" },
      el("button", { class: "op small", type: "button", text: "Promote", disabled: v.current && !p.pointer.pinned,
        onclick: () => confirm(`Make ${v.version} the fleet's current policy?`) && act(`promote ${v.version}`, "POST", `api/policies/${enc}/promote`) }),
      el("button", { class: "op small", type: "button", text: "Pin fleet",
        onclick: () => confirm(`Pin the whole fleet to ${v.version}? Publishes will not move it until unpinned.`) && act(`pin fleet to ${v.version}`, "POST", "api/fleet/pin", { version: v.version }) }),
      el("button", { class: "op small", type: "button", text: "Canary…",
        onclick: () => {
          const f = prompt(`Run ${v.version} on which fraction of the fleet first? (0–1)`, "0.1");
          if (f != null) act(`canary ${v.version}`, "PUT", "api/canary", { version: v.version, fraction: Number(f) });
        } })) : el("span");
    body.append(el("tr", { class: v.current ? "current" : "" },
      el("td", {}, el("span", { class: "mono", text: v.version }), " ", chips),
      el("td", { text: v.learner_step != null ? fmtNum(v.learner_step) : "–" }),
      el("td", { text: lossKey ? fmtNum(metrics[lossKey]) : "–", title: lossKey || "" }),
      el("td", {}, el("div", {}, pct(v.on_robot.success.rate), el("span", { class: "ci-text", text: ciText(v.on_robot.success) })), rateBar(v.on_robot.success)),
      el("td", { text: String(v.robots_running) }),
      el("td", {}, buttons)));
  }
  guardButtons($("#policies"));
}

// ---- learner ---------------------------------------------------------------------------------
function flatten(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out.push([key, v]);
  }
  return out;
}
function kvBox(target, pairs) {
  const sig = JSON.stringify(pairs);
  if (target.dataset.sig === sig) return;
  target.dataset.sig = sig;
  target.replaceChildren(...pairs.map(([k, v]) => el("div", {}, el("span", { class: "k", text: k, title: k }),
    el("span", { class: "v", text: typeof v === "number" ? fmtNum(v) : String(v) }))));
}
function renderLearner(l, q, ingest) {
  $("#learner-age").textContent = !l.available ? "" : l.age_s == null ? "" :
    `${l.fresh ? "" : "stale · "}updated ${l.age_s < 90 ? `${Math.round(l.age_s)}s` : `${Math.round(l.age_s / 60)}m`} ago`;
  if (!l.available) {
    kvBox($("#learner-body"), [["status", "not reporting"]]);
  } else {
    const skip = new Set(["step", "samples_per_s", "steps_per_s", "updated_ns"]);
    kvBox($("#learner-body"), [["step", l.step], ["steps / s", l.step_rate == null ? "–" : l.step_rate],
      ["samples / s", l.samples_per_s == null ? "–" : l.samples_per_s],
      ...flatten(l.stats).filter(([k, v]) => !skip.has(k) && v != null && v !== "").slice(0, 21)]);
  }
  const pairs = [["stream length", q.stream_length], ["dead letters", q.dead_letters],
    ["ingest / min", ingest.episodes_per_s * 60]];
  for (const g of q.groups) pairs.push([`${g.group} lag`, g.lag == null ? "–" : g.lag], [`${g.group} pending`, g.pending]);
  kvBox($("#queue-body"), pairs);
}

// ---- episodes --------------------------------------------------------------------------------
function fillSelect(select, values) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const v of [...new Set(values)].sort()) if (v && !have.has(v)) select.append(el("option", { value: v, text: v }));
}
const refreshEpisodes = throttled(() => loadEpisodes(), 2500);
async function loadEpisodes() {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#ep-filters"))) if (v) params.set(k, v);
  params.set("offset", state.epOffset);
  params.set("limit", state.epLimit);
  let page;
  try { page = await api("GET", `api/episodes?${params}`); } catch (e) { return; }
  state.epTotal = page.total;
  const body = $("#ep-table tbody");
  body.replaceChildren(...page.episodes.map((e) => el("tr", { class: "click", onclick: () => openEpisode(e.episode_id), title: e.episode_id },
    el("td", { text: fmtTime(e.ended_ns, true) }),
    el("td", { text: e.robot_id }), el("td", { text: e.task_id }), el("td", { class: "mono", text: e.policy_version || "—" }),
    el("td", { text: String(e.num_steps) }),
    el("td", { text: e.intervention_steps ? `${e.intervention_steps} steps` : "—" }),
    el("td", {}, el("span", { class: `outcome-${e.outcome}`, text: e.outcome + (e.incomplete ? " (incomplete)" : "") }),
      e.labelled_by ? el("span", { class: "ci-text", text: `✎ ${e.labelled_by}` }) : null))));
  const last = Math.min(page.total, state.epOffset + page.episodes.length);
  $("#ep-page").textContent = page.total ? `${state.epOffset + 1}–${last} of ${page.total}` : "no episodes";
  $("#ep-prev").disabled = state.epOffset === 0;
  $("#ep-next").disabled = last >= page.total;
}

async function openEpisode(id) {
  let e;
  try { e = await api("GET", `api/episodes/${encodeURIComponent(id)}`); } catch (err) { toast(err.message, true); return; }
  for (const u of state.thumbs) URL.revokeObjectURL(u);
  state.thumbs = [];
  const human = (t) => e.segments.some((s) => s.start_step <= t && t < s.end_step);
  const strip = el("div", { class: "strip" });
  for (const t of e.thumbnail_steps) {
    const img = el("img", { alt: `step ${t}`, loading: "lazy" });
    strip.append(el("figure", { class: human(t) ? "human" : "" }, img, el("figcaption", { text: `t=${t}${human(t) ? " · human" : ""}` })));
    fetch(`api/episodes/${encodeURIComponent(id)}/frames/${t}.png?size=160`, { headers: authHeaders() })
      .then((r) => (r.ok ? r.blob() : null))
      .then((b) => { if (b) { const u = URL.createObjectURL(b); state.thumbs.push(u); img.src = u; } });
  }
  const segbar = el("div", { class: "segbar", title: "intervention segments" });
  for (const s of e.segments) {
    segbar.append(el("span", { style: `left:${(s.start_step / e.num_steps) * 100}%;width:${((s.end_step - s.start_step) / e.num_steps) * 100}%` }));
  }
  const label = (o) => el("button", { class: `op${o === e.outcome ? " primary" : ""}`, type: "button", text: `Label ${o}`,
    onclick: async () => { if (await act(`label ${o}`, "POST", `api/episodes/${encodeURIComponent(id)}/label`, { outcome: o })) { openEpisode(id); loadEpisodes(); } } });
  const body = $("#episode-body");
  body.replaceChildren(
    el("div", { class: "detail-head" }, el("h2", { class: "mono", text: e.episode_id }),
      el("span", { class: `chip ${e.outcome === "success" ? "good" : e.outcome === "failure" ? "bad" : ""}`, text: e.outcome }),
      e.incomplete ? el("span", { class: "chip warn", text: "incomplete" }) : null),
    el("div", { class: "detail-grid" },
      ...[["robot", e.robot_id], ["task", e.task_id], ["policy version", e.policy_version || "—"], ["steps", e.num_steps],
        ["ended", fmtTime(e.ended_ns, true)], ["outcome source", e.outcome_source.replace("LABEL_SOURCE_", "").toLowerCase()],
        ["labelled by", e.labelled_by || "—"], ["intervention steps", e.intervention_steps]]
        .map(([k, v]) => el("div", {}, el("span", { class: "k", text: k }), String(v)))),
    el("div", { class: "muted", text: e.instruction ? `“${e.instruction}”` : "" }),
    el("h3", { text: "Frames" }),
    e.has_images ? strip : el("p", { class: "empty", text: "Recorded without camera images." }),
    el("h3", { text: `Interventions (${e.segments.length})` }), segbar,
    ...e.segments.map((s) => el("div", { class: "muted", text: `steps ${s.start_step}–${s.end_step - 1} · ${s.operator || "unknown operator"} · ${s.reason || "no reason given"}` })),
    el("h3", { text: "Outcome label" }),
    el("div", { class: "action-row" }, label("success"), label("failure"), label("unknown")));
  guardButtons(body);
  const dlg = $("#episode-dialog");
  if (!dlg.open) dlg.showModal();
}

// ---- robot detail ----------------------------------------------------------------------------
async function openRobot(id) {
  let r;
  try { r = await api("GET", `api/robots/${encodeURIComponent(id)}`); } catch (err) { toast(err.message, true); return; }
  const enc = encodeURIComponent(id);
  const control = (action, label, cls = "op") => el("button", { class: cls, type: "button", text: label,
    onclick: async () => { await act(`${action} ${id}`, "POST", `api/robots/${enc}/${action}`, { reason: "dashboard" }); setTimeout(() => openRobot(id), 400); } });
  const versions = (state.policies ? state.policies.versions : []).filter((v) => v.registered).map((v) => v.version);
  const pick = el("select", { "aria-label": "version to pin" }, ...versions.map((v) => el("option", { value: v, text: v })));
  const pinBtn = el("button", { class: "op", type: "button", text: "Pin robot", disabled: !versions.length,
    onclick: async () => { await act(`pin ${id} to ${pick.value}`, "POST", `api/robots/${enc}/pin`, { version: pick.value }); openRobot(id); } });
  const unpinBtn = el("button", { class: "op", type: "button", text: "Unpin", disabled: r.target_source !== "robot_pin",
    onclick: async () => { await act(`unpin ${id}`, "DELETE", `api/robots/${enc}/pin`); openRobot(id); } });
  const byVersion = el("table", { class: "table" }, el("thead", {}, el("tr", {}, ...["version", "rollouts", "success", "interventions"].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...Object.entries(r.by_version).map(([v, t]) => el("tr", {},
      el("td", { class: "mono", text: v || "—" }), el("td", { text: String(t.episodes) }),
      el("td", {}, pct(t.success.rate), el("span", { class: "ci-text", text: ciText(t.success) })),
      el("td", { text: pct(t.intervention.rate) })))));
  const recent = el("table", { class: "table" }, el("tbody", {}, ...r.recent_episodes.map((e) => el("tr", { class: "click", onclick: () => openEpisode(e.episode_id) },
    el("td", { text: fmtTime(e.ended_ns, true) }), el("td", { text: e.task_id }), el("td", { class: "mono", text: e.policy_version }),
    el("td", { text: e.intervention_steps ? `${e.intervention_steps} human steps` : "" }),
    el("td", {}, el("span", { class: `outcome-${e.outcome}`, text: e.outcome }))))));
  const swap = r.swap && r.swap.publish_to_loaded_s && r.swap.publish_to_loaded_s.n
    ? `${r.swap.publish_to_loaded_s.p50}s p50 publish→loaded` : "—";
  $("#robot-body").replaceChildren(
    el("div", { class: "detail-head" }, el("h2", { text: r.robot_id }),
      el("span", { class: `chip ${r.online ? "good" : ""}`, text: r.online ? "online" : "offline" }),
      r.takeover_requested ? el("span", { class: "chip warn", text: "takeover requested" }) : null,
      r.paused ? el("span", { class: "chip pause", text: "paused" }) : null),
    el("div", { class: "detail-grid" },
      ...[["task", r.task_id || "idle"], ["running", r.policy_version || "—"], ["target", r.target_version ? `${r.target_version} (${r.target_source})` : "—"],
        ["pending", r.pending_version || "—"], ["last seen", r.last_seen_ns ? ago(r.last_seen_ns) : "never"],
        ["spool", spoolText(r.spool)], ["weight swap", swap],
        ["last command", r.last_command && r.last_command.action ? `${r.last_command.action.replace("CONTROL_ACTION_", "").toLowerCase()} by ${r.last_command.operator}` : "—"]]
        .map(([k, v]) => el("div", {}, el("span", { class: "k", text: k }), String(v)))),
    el("div", { class: "action-row" },
      r.takeover_requested ? control("release", "Release") : control("takeover", "Take over", "op warn"),
      r.paused ? control("resume", "Resume") : control("pause", "Pause"),
      el("span", { class: "muted", text: "  policy:" }), pick, pinBtn, unpinBtn),
    el("h3", { text: "Success per policy version" }), byVersion,
    el("h3", { text: "Recent episodes" }), recent);
  guardButtons($("#robot-body"));
  const dlg = $("#robot-dialog");
  if (!dlg.open) dlg.showModal();
}

// ---- audit -----------------------------------------------------------------------------------
const refreshAudit = throttled(async () => {
  let log;
  try { log = await api("GET", "api/audit?limit=25"); } catch (e) { return; }
  $("#audit-table tbody").replaceChildren(...log.entries.map((a) => {
    let detail = a.detail || "";
    if (detail.startsWith("{")) { try { detail = Object.entries(JSON.parse(detail)).map(([k, v]) => `${k}: ${v}`).join(" · "); } catch (_) { /* as is */ } }
    return el("tr", {},
      el("td", { text: fmtTime(a.ts_ns, true) }), el("td", { text: `${a.who}${a.role ? ` (${a.role})` : ""}` }),
      el("td", { class: "mono", text: a.action }), el("td", { text: a.target || "" }),
      el("td", {}, el("span", { class: `chip ${a.result === "ok" ? "good" : "bad"}`, text: `${a.result} ${a.status}` })),
      el("td", { class: "muted", text: detail }));
  }));
}, 1000);

// ---- wiring ----------------------------------------------------------------------------------
function bind() {
  $("#who").addEventListener("click", () => askToken());
  $("#token-form").addEventListener("submit", (ev) => {
    const choice = ev.submitter ? ev.submitter.value : "save";
    const value = $("#token-input").value.trim();
    if (choice === "forget") { localStorage.removeItem(TOKEN_KEY); state.token = null; }
    else if (value) { localStorage.setItem(TOKEN_KEY, value); state.token = value; }
    const waiters = tokenWaiters;
    tokenWaiters = [];
    waiters.forEach((w) => w());
    whoami().then(() => { for (const c of state.cards.values()) c.sig = ""; refreshAll(); }).catch(() => {});
  });
  for (const d of document.querySelectorAll("dialog")) {
    d.addEventListener("click", (ev) => { if (ev.target.matches("[data-close]") || ev.target === d) d.close(); });
  }
  $("#robot-filter").addEventListener("input", (ev) => {
    state.filter = ev.target.value.trim().toLowerCase();
    for (const c of state.cards.values()) c.sig = "";
    if (state.snap) renderGrid(state.snap.robots, state.snap.policy);
  });
  $("#ep-filters").addEventListener("change", () => { state.epOffset = 0; loadEpisodes(); });
  $("#ep-prev").addEventListener("click", () => { state.epOffset = Math.max(0, state.epOffset - state.epLimit); loadEpisodes(); });
  $("#ep-next").addEventListener("click", () => { state.epOffset += state.epLimit; loadEpisodes(); });
  const actions = {
    rollback: () => confirm("Roll the fleet back to the previous policy version?") && act("rollback", "POST", "api/policies/rollback", { pin: false }),
    "unpin-fleet": () => act("unpin fleet", "DELETE", "api/fleet/pin"),
    "clear-canary": () => act("clear canary", "DELETE", "api/canary"),
  };
  for (const b of document.querySelectorAll("[data-act]")) b.addEventListener("click", () => actions[b.dataset.act]());
}
function refreshAll() {
  refreshPolicies();
  refreshSeries();
  loadEpisodes();
  refreshAudit();
}

(async function main() {
  loadToken();
  bind();
  await whoami().catch(() => setLive("bad", "server unreachable"));
  refreshAll();
  setInterval(refreshAudit, 10000);
  live();
})();
