// The rollout gate panel (docs/rollout.md): what is on the canaries, its evidence per task, the
// sequential test's progress, every decision and why; promote / reject / on-off for operators.
// Self-contained (its own fetch with the page's stored token); the server enforces roles and
// audits every write.
(() => {
  "use strict";
  const KEY = "fleetloop.dashboard.token";
  const root = document.getElementById("rollout");
  if (!root) return;
  const $r = (sel) => root.querySelector(sel);
  const note = (text, error = false) => (typeof toast === "function" ? toast(text, error) : null);

  async function call(method, path, body) {
    const token = localStorage.getItem(KEY);
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await res.json(); } catch (_) { /* not JSON */ }
    if (!res.ok) throw new Error((data && data.detail) || `${res.status} ${res.statusText}`);
    return data;
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    return td;
  }
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)}%`);
  const when = (ns) => (ns ? new Date(ns / 1e6).toLocaleTimeString() : "–");

  let last = null;

  function render(s) {
    last = s;
    const ev = s.evidence || {};
    const test = ev.test || null;
    const st = $r("#rollout-state");
    st.textContent = "";
    const parts = [
      `gate ${s.enabled ? "on" : "off"}${s.enabled && !s.gate_running ? " (no gate process running)" : ""}`,
      `fleet ${s.baseline || "–"}`,
      s.candidate ? `candidate ${s.candidate} on ${(s.canary_robots || []).join(", ") || "a fraction"}` : "no candidate",
    ];
    if (test) parts.push(`SPRT log-LR ${test.llr} (promote ≥ ${s.settings.promote_at_llr}, refuse ≤ ${s.settings.refuse_at_llr}) after ${test.n} episodes`);
    if (s.watch) {
      const wt = (ev.watch || {}).test;
      parts.push(`watching ${s.watch} against ${s.watch_replaced} on the fleet` +
        (wt ? `: log-LR ${wt.llr} after ${wt.n} episodes (rollback ≤ ${s.settings.refuse_at_llr})` : ""));
    }
    if (s.note) parts.push(s.note);
    st.textContent = parts.join(" · ");
    $r("#rollout-toggle").textContent = s.enabled ? "Turn gate off" : "Turn gate on";
    const viewer = typeof canOperate === "function" && !canOperate();
    $r("#rollout-promote").disabled = viewer || !s.candidate;
    $r("#rollout-reject").disabled = viewer || !s.candidate;
    $r("#rollout-toggle").disabled = viewer;

    const body = $r("#rollout-evidence tbody");
    body.textContent = "";
    const per = (test && test.per_task) || {};
    const base = ev.baseline_evidence || {};
    const tasks = [...new Set([...Object.keys(per), ...Object.keys(base)])].sort();
    for (const t of tasks) {
      const c = per[t] || {};
      const b = base[t] || {};
      const tr = document.createElement("tr");
      tr.append(cell(t), cell(`${pct(b.autonomous_success_rate)} (${b.known || 0})`),
        cell(c.reference === undefined ? "–" : pct(c.reference)),
        cell(c.known ? `${pct(c.autonomous_success_rate)} (${c.autonomous_success}/${c.known})` : "–"),
        cell(c.autonomous_success_ci95 && c.known ? `${pct(c.autonomous_success_ci95[0])}–${pct(c.autonomous_success_ci95[1])}` : "–"),
        cell(c.episodes ? pct(c.intervention_rate) : "–"), cell(c.episodes ? c.mean_steps : "–"),
        cell(c.llr === undefined ? "–" : c.llr, c.llr !== null && c.llr !== undefined && c.llr < 0 ? "bad" : ""));
      body.append(tr);
    }
    const dec = $r("#rollout-decisions tbody");
    dec.textContent = "";
    for (const d of (s.decisions || []).slice(0, 12)) {
      const tr = document.createElement("tr");
      tr.append(cell(when(d.ts_ns)), cell(d.decision), cell(d.version || "–"), cell(d.by), cell(d.reason));
      dec.append(tr);
    }
  }

  async function refresh() {
    try { render(await call("GET", "/api/rollout?decisions=12")); }
    catch (e) { $r("#rollout-state").textContent = `rollout gate: ${e.message}`; }
  }

  async function decide(kind) {
    if (!last || !last.candidate) return;
    const reason = prompt(`${kind === "promote" ? "Promote" : "Reject"} ${last.candidate}: why? (audited)`, "");
    if (reason === null) return;
    try {
      await call("POST", `/api/rollout/${kind}`, { version: last.candidate, reason: reason.slice(0, 200) });
      note(`${kind} ${last.candidate}: done`);
    } catch (e) { note(`${kind}: ${e.message}`, true); }
    refresh();
  }

  $r("#rollout-promote").addEventListener("click", () => decide("promote"));
  $r("#rollout-reject").addEventListener("click", () => decide("reject"));
  $r("#rollout-toggle").addEventListener("click", async () => {
    if (!last) return;
    try {
      await call("PUT", "/api/rollout/enabled", { enabled: !last.enabled });
      note(`rollout gate ${last.enabled ? "off" : "on"}`);
    } catch (e) { note(`rollout gate: ${e.message}`, true); }
    refresh();
  });
  refresh();
  setInterval(refresh, 3000);
})();
