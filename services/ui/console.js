// The platform console: serving status (replicas, versions, latency and errors from the metrics),
// registered versions with metrics, lineage and aliases, promote / roll back with the gate results,
// each task's traffic policy with its candidate evidence and each site's input drift (a bar per site
// against the threshold),
// analysis jobs with their progress (refreshed while any is running) and the results awaiting a
// clinician's review, and the audit log. Promotions and reviews go to the platform API, which checks the
// caller's role (and the gates); the buttons a role may not use are disabled here too, with the reason.

import { authHeaders, errorText, token } from "./api.js";
import { el, fmt, showError, table } from "./dom.js";

const $ = (id) => document.getElementById(id);
const RANK = { viewer: 0, app: 1, clinician: 2, "data-scientist": 3, platform: 4, admin: 5 };
const NEEDS = { candidate: "data-scientist", champion: "platform", rollback: "platform", review: "clinician" };
const RUNNING = new Set(["queued", "preprocessing", "inferring", "reporting", "accepted", "exporting"]);
const JOBS_REFRESH_MS = 2000;
const MODEL_TASKS = ["localization", "segmentation", "classification", "survival"];
let platform = null;
let identity = null;
let openJob = null;
let jobsTimer = null;

// onOpenJob(job): the viewer loads a job's stored results (app.js).
export function initConsole(platformUrl, onOpenJob) {
  platform = platformUrl;
  openJob = onOpenJob;
  $("refresh-console").addEventListener("click", refreshConsole);
  $("jobs-filter").addEventListener("change", refreshJobs);
  $("task-filter").addEventListener("change", refreshRegistry);
  $("drift-task").addEventListener("change", refreshDrift);
  for (const t of ["localization", "segmentation", "classification", "survival", "reporting"]) $("task-filter").append(el("option", { value: t, text: t }));
  for (const t of MODEL_TASKS) $("drift-task").append(el("option", { value: t, text: t, selected: t === "segmentation" }));
  refreshWho();
}

export async function platformFetch(path, options = {}) {
  if (!platform) throw new Error("the platform API address is unknown (no /v1/ui-config)");
  let response;
  try {
    response = await fetch(platform + path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch {
    throw new Error(`the platform API at ${platform} does not answer (is the stack up?)`);
  }
  return response;
}

async function refreshWho() {
  identity = null;
  $("whoami").textContent = "";
  if (!token()) return;
  try {
    const r = await platformFetch("/v1/whoami");
    if (r.ok) {
      identity = await r.json();
      $("whoami").textContent = `${identity.name} (${identity.role})`;
    } else if (r.status === 401) {
      $("whoami").textContent = "unknown token";
    }
  } catch {
    // shown by the console panel when it is opened
  }
}

function allowed(action) {
  return identity !== null && RANK[identity.role] >= RANK[NEEDS[action]];
}

export async function refreshConsole() {
  showError($("console-error"), "");
  await refreshWho();
  await Promise.all([refreshServing(), refreshRegistry(), refreshRollouts(), refreshDrift(), refreshJobs(), refreshAudit()]);
}


export function mayReview() {
  return allowed("review");
}

export function reviewRole() {
  return NEEDS.review;
}

export function whoAmI() {
  return identity;
}

export async function refreshJobs() {
  clearTimeout(jobsTimer);
  try {
    const state = $("jobs-filter").value;
    const r = await platformFetch(`/v1/jobs${state ? `?state=${encodeURIComponent(state)}` : ""}`);
    if (!r.ok) throw new Error(await errorText(r));
    const jobs = await r.json();
    const rows = jobs.map((j) => {
      const progress = el("span", {}, el("meter", { min: 0, max: 1, value: j.progress, "aria-label": `job ${j.id} progress` }), ` ${Math.round(j.progress * 100)} %`);
      const results = j.state === "awaiting review" || (j.result && j.result.artifacts);
      const open = results
        ? el("button", { type: "button", text: j.state === "awaiting review" ? "Open for review" : "Open", "aria-label": `Open job ${j.id}`, onclick: () => openJob(j) })
        : "";
      return [j.id, j.source, j.state, progress, j.error || j.detail || "", new Date(j.created * 1000).toISOString().replace("T", " ").slice(0, 19), open];
    });
    table($("jobs"), ["job", "source", "state", "progress", "detail", "submitted", ""], rows, "Analysis jobs, newest first (yours, or all for clinicians and above)");
    // Keep following the jobs still running; stop when none is.
    if (jobs.some((j) => RUNNING.has(j.state)) && !$("console").hidden) jobsTimer = setTimeout(refreshJobs, JOBS_REFRESH_MS);
  } catch (err) {
    showError($("console-error"), `jobs: ${err.message}`);
  }
}


async function refreshServing() {
  try {
    const r = await fetch("../v1/serving/status");
    if (!r.ok) throw new Error(await errorText(r));
    const s = await r.json();
    const deployments = s.deployments.error ? {} : s.deployments;
    const names = [...new Set([...Object.keys(s.model_versions), ...Object.keys(deployments)])];
    // An alias moved without a signed promotion is refused by the replicas: say so beside the version served.
    const untrusted = s.untrusted_aliases || {};
    table($("serving"), ["deployment", "status", "replicas running", "version", "backend", "champion alias"],
      names.map((n) => [n, deployments[n]?.status ?? "", deployments[n]?.running ?? "", s.model_versions[n] ?? "", s.backends[n] ?? "",
        untrusted[n] ? `UNTRUSTED: moved to v${untrusted[n].version} without a signed promotion (refused)` : "signed"]),
      s.deployments.error || `Serve deployments · serving auth ${s.auth ?? ""}`);
    table($("routes"), ["route", "requests", "p50 (ms)", "p99 (ms)", "5xx rate", "4xx"],
      Object.entries(s.routes).map(([route, m]) => [route, m.requests, fmt(m.p50_ms, 0), fmt(m.p99_ms, 0), `${(m.error_rate * 100).toFixed(1)} %`, m.client_errors]),
      "Requests since the gateway started (from its Prometheus metrics)");
  } catch (err) {
    showError($("console-error"), `serving status: ${err.message}`);
  }
}

function actionButton(label, action, run, subject) {
  const ok = allowed(action);
  return el("button", {
    type: "button", text: label, disabled: !ok, "aria-label": `${label}: ${subject}`,
    title: ok ? "" : `needs the ${NEEDS[action]} role${identity ? ` (you are ${identity.role})` : " (enter a token)"}`,
    onclick: run,
  });
}

async function refreshRegistry() {
  try {
    const r = await platformFetch("/v1/models");
    if (!r.ok) throw new Error(await errorText(r));
    const filter = $("task-filter").value;
    const versions = (await r.json()).filter((v) => !filter || v.task === filter);
    const rows = versions.map((v) => {
      const metrics = Object.entries(v.metrics).filter(([, x]) => typeof x === "number").slice(0, 4).map(([k, x]) => `${k} ${fmt(x)}`).join(", ");
      const lin = v.lineage || {};
      const lineage = el("span", {}, `data ${(lin.dataset_hash || "").slice(0, 10)} · git ${(lin.git_commit || "").slice(0, 8)} · `,
        lin.run_link ? el("a", { href: lin.run_link, text: "run", target: "_blank", rel: "noopener" }) : "");
      const subject = `${v.task} version ${v.version}`;
      const actions = el("span", { class: "actions" },
        actionButton("Promote to candidate", "candidate", () => promote(v.task, v.version, "candidate"), subject),
        actionButton("Promote to champion", "champion", () => promote(v.task, v.version, "champion"), subject),
        v.aliases.includes("champion") ? actionButton("Roll back", "rollback", () => rollback(v.task), `${v.task} champion`) : "");
      return [v.task, v.version, v.aliases.join(", "), metrics, lineage, actions];
    });
    table($("registry"), ["task", "version", "aliases", "metrics (held-out)", "lineage", "actions"], rows, "Registered versions");
  } catch (err) {
    showError($("console-error"), `registry: ${err.message}`);
  }
}

function showGates(title, gates, error) {
  const target = $("gate-results");
  target.replaceChildren(el("h3", { text: title }));
  if (error) target.append(el("p", { class: "error", text: error }));
  if (gates && gates.length) {
    const t = el("table", { id: "gate-table" });
    table(t, ["gate", "result", "value", "threshold", "detail"],
      gates.map((g) => [g.name, el("span", { class: g.passed ? "pass" : "fail", text: g.passed ? "pass" : "FAIL" }), fmt(g.value), String(g.threshold), g.detail || ""]),
      "Promotion gates");
    target.append(t);
  }
}

async function promote(task, version, to) {
  showGates(`Running the gates for ${task} v${version} → ${to}…`);
  try {
    const r = await platformFetch(`/v1/models/${task}/versions/${version}:promote`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ to, reason: "web console" }),
    });
    const body = await r.json().catch(() => ({}));
    if (r.ok) showGates(`${task} v${version} is now ${to} (was ${body.previous_holder || "unset"})`, body.gates);
    else if (r.status === 409) showGates(`Refused: ${task} v${version} → ${to}`, body.gates, body.error);
    else showGates(`Not promoted: ${task} v${version} → ${to}`, [], `HTTP ${r.status}: ${body.error || ""}`);
  } catch (err) {
    showGates(`Not promoted: ${task} v${version} → ${to}`, [], err.message);
  }
  await Promise.all([refreshRegistry(), refreshAudit()]);
}

async function rollback(task) {
  try {
    const r = await platformFetch(`/v1/models/${task}:rollback`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ reason: "web console" }),
    });
    const body = await r.json().catch(() => ({}));
    showGates(r.ok ? `${task}: champion v${body.from} → v${body.to}` : `Rollback refused`, [], r.ok ? "" : `HTTP ${r.status}: ${body.error || ""}`);
  } catch (err) {
    showGates("Rollback failed", [], err.message);
  }
  await Promise.all([refreshRegistry(), refreshAudit()]);
}

async function refreshAudit() {
  try {
    const r = await platformFetch("/v1/audit");
    if (!r.ok) throw new Error(await errorText(r));
    const entries = (await r.json()).slice(-50).reverse();
    table($("audit"), ["when", "who", "action", "task", "version", "to", "status", "reason"],
      entries.map((e) => [new Date((e.time || 0) * 1000).toISOString().replace("T", " ").slice(0, 19), `${e.actor} (${e.role})`, e.action,
        e.task || "", e.version ?? "", e.to || "", e.status + (e.forced ? " (forced)" : ""), e.reason || ""]),
      "Latest 50 actions, newest first");
  } catch (err) {
    showError($("console-error"), `audit: ${err.message}`);
  }
}

function interval(m) {
  return m ? `${fmt(m.mean)} [${fmt(m.ci95[0])}, ${fmt(m.ci95[1])}] (n ${m.n ?? ""})` : "";
}

async function refreshRollouts() {
  try {
    const rows = await Promise.all(MODEL_TASKS.map(async (task) => {
      const r = await platformFetch(`/v1/rollouts/${task}`);
      if (!r.ok) throw new Error(await errorText(r));
      const { policy, champion } = await r.json();
      let evidence = "";
      if (policy.mode !== "champion") {
        const rep = await platformFetch(`/v1/rollouts/${task}/report?seq=${policy.seq}`);
        if (rep.ok) {
          const o = (await rep.json()).overall;
          evidence = `${o.studies} studies, ${o.errors} candidate errors; agreement ${interval(o.agreement.agreement)}`;
        }
      }
      const share = policy.mode === "champion" ? "" : `${Math.round(policy.share * 100)} %`;
      return [task, champion ?? "", policy.mode, policy.version ?? "", share, policy.seq, evidence];
    }));
    table($("rollouts"), ["task", "champion", "policy", "candidate", "share", "policy seq", "evidence"], rows,
      "Traffic policy per task (oncoserve rollout set), signed by the platform");
  } catch (err) {
    showError($("console-error"), `rollouts: ${err.message}`);
  }
}

async function refreshDrift() {
  const task = $("drift-task").value;
  try {
    const r = await platformFetch(`/v1/monitoring/drift?task=${encodeURIComponent(task)}`);
    if (r.status === 400) {  // no champion, or a champion trained before drift monitoring: said, not an error
      $("drift-plot").replaceChildren();
      table($("drift"), [], [], `${task}: ${await errorText(r)}`);
      return;
    }
    if (!r.ok) throw new Error(await errorText(r));
    const report = await r.json();
    const sites = Object.entries(report.sites);
    drawDrift($("drift-plot"), task, sites);
    table($("drift"), ["site", "studies", "drift score", "drifted", "largest shifts", "answers' drift", "QC flagged"],
      sites.map(([site, d]) => [site, d.studies, fmt(d.score, 2), d.drifted ? "DRIFTED" : (d.enough_studies ? "no" : "too few studies"), d.largest_shifts.join(", "),
        d.output_drift ? `${fmt(d.output_drift.score, 2)}${d.output_drift.drifted ? " DRIFTED" : ""}` : "no reference", `${Math.round((d.qc_flagged_share ?? 0) * 100)} %`]),
      `${task} v${report.champion} over ${report.days} days: ${report.test}`);
  } catch (err) {
    showError($("console-error"), `drift: ${err.message}`);
  }
}

// One horizontal bar per site: its drift score (share of input statistics that drifted), with the
// threshold as a vertical line.
function drawDrift(target, task, sites) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 480, ROW = 22, LEFT = 150, H = ROW * Math.max(sites.length, 1) + 24;
  const svg = document.createElementNS(NS, "svg");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("id", "drift-bars");
  svg.setAttribute("aria-label", `${task}: input drift score per site, ${sites.length} site(s)`);
  const scale = (v) => LEFT + v * (W - LEFT - 10);
  sites.forEach(([site, d], i) => {
    const y = 4 + i * ROW;
    add("text", { x: LEFT - 6, y: y + 14, "text-anchor": "end", class: "tick" }, site);
    add("rect", { x: LEFT, y, width: Math.max(1, scale(d.score) - LEFT), height: ROW - 6, class: d.drifted ? "bar drifted" : "bar", "data-site": site });
  });
  const threshold = sites.length ? sites[0][1].threshold : 0.5;
  add("line", { x1: scale(threshold), x2: scale(threshold), y1: 0, y2: H - 20, class: "threshold" });
  add("text", { x: scale(threshold), y: H - 6, "text-anchor": "middle", class: "tick" }, `threshold ${threshold}`);
  target.replaceChildren(svg);
}
