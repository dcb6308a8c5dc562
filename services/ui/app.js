// The web UI: the clinician viewer (upload -> analyse -> images, findings, report, downloads) and the
// platform console (console.js). Served by the gateway at /ui/; talks to the serving API on this origin
// and to the platform API named in /v1/ui-config.

import { authHeaders, errorText, token } from "./api.js";
import { el, fmt, renderMarkdown, showError, table } from "./dom.js";
import { base64ToBuffer, readNifti } from "./nifti.js";
import { SliceViewer } from "./viewer.js";
import { initConsole, mayReview, platformFetch, refreshConsole, refreshJobs, reviewRole, whoAmI } from "./console.js";

const $ = (id) => document.getElementById(id);
const MODALITIES = ["t1", "t1ce", "t2", "flair"];
const state = { config: null, viewer: new SliceViewer(document), urls: [] };

// -- tabs (WAI-ARIA tabs: arrow keys move between them) ------------------------------------------
function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
  if (tab.id === "tab-console") refreshConsole();
}

function initTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        e.preventDefault();
        selectTab(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
      }
    });
  });
}

// -- the study ----------------------------------------------------------------------------------
async function studyForm() {
  const form = new FormData();
  const demo = $("demo-case").value;
  let files = 0;
  if (demo) {
    const [caseId, present] = demo.split("|");
    for (const m of present.split(",")) {
      const r = await fetch(`../v1/demo-cases/${encodeURIComponent(caseId)}/${m}`);
      if (!r.ok) throw new Error(await errorText(r));
      form.append(m, await r.blob(), `${caseId}_${m}.nii.gz`);
      files++;
    }
    form.append("case_id", caseId);
  } else if ($("file-dicom").files.length) {
    form.append("dicom", $("file-dicom").files[0]);
    files++;
  } else {
    for (const m of MODALITIES) {
      const f = $(`file-${m}`).files[0];
      if (f) {
        form.append(m, f);
        files++;
      }
    }
  }
  if (!files) throw new Error("choose at least one modality file, a DICOM zip or a demo case");
  if ($("age").value) form.append("age", $("age").value);
  if ($("case-id").value && !demo) form.append("case_id", $("case-id").value);
  return form;
}

async function analyse(event) {
  event.preventDefault();
  showError($("error"), "");
  $("review-panel").hidden = true;  // a new upload is not a job under review
  state.reviewing = null;
  const button = $("analyse");
  button.disabled = true;
  const started = performance.now();
  const tick = setInterval(() => {
    $("progress").textContent = `Analysing… ${((performance.now() - started) / 1000).toFixed(0)} s`;
  }, 500);
  $("progress").textContent = "Uploading…";
  if ($("as-job").checked) {
    clearInterval(tick);
    try {
      await analyseAsJob(await studyForm());
    } catch (err) {
      $("progress").textContent = "";
      showError($("error"), err.message || String(err));
    } finally {
      button.disabled = false;
    }
    return;
  }
  try {
    const form = await studyForm();
    const response = await fetch("../v1/studies:analyze?preview=true", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    clearInterval(tick);
    $("progress").textContent = `Analysis complete in ${((performance.now() - started) / 1000).toFixed(1)} s (request ${body.request_id}).`;
    await showResults(body);
  } catch (err) {
    clearInterval(tick);
    $("progress").textContent = "";
    showError($("error"), err.message || String(err));
  } finally {
    clearInterval(tick);
    button.disabled = false;
  }
}

// A long analysis as a platform job: submitted, then followed (state, progress, detail) until it has results.
const JOB_POLL_MS = 1000;
const JOB_DONE = new Set(["completed", "awaiting review", "accepted", "exporting", "exported"]);

async function analyseAsJob(form) {
  if ($("job-export").checked) form.append("export", "true");
  const r = await platformFetch("/v1/jobs", { method: "POST", body: form });
  if (!r.ok) throw new Error(await errorText(r));
  let job = await r.json();
  while (!JOB_DONE.has(job.state)) {
    if (job.state === "failed" || job.state === "rejected") throw new Error(`job ${job.id} ${job.state}: ${job.error || job.detail || ""}`);
    $("progress").textContent = `Job ${job.id}: ${job.state}, ${Math.round(job.progress * 100)} % — ${job.detail || ""}`;
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS));
    const again = await platformFetch(`/v1/jobs/${encodeURIComponent(job.id)}`);
    if (!again.ok) throw new Error(await errorText(again));
    job = await again.json();
  }
  await openJob(job);
}

async function showResults(body) {
  const f = body.findings;
  const images = {};
  for (const [m, b64] of Object.entries(body.images_nifti_gz_b64 || {})) images[m] = await readNifti(base64ToBuffer(b64));
  const mask = await readNifti(base64ToBuffer(body.mask_nifti_gz_b64));
  const box = f.localization.found ? f.localization.bbox_vox.map(Math.round) : null;
  state.viewer.load(images, mask, box);
  $("modality").replaceChildren(...Object.keys(images).map((m) => el("option", { value: m, text: m.toUpperCase() })));
  $("results").hidden = false;
  state.viewer.draw();

  const q = f.quality;
  const notes = [];
  if (q.missing_modalities.length) notes.push(`Missing modalities: ${q.missing_modalities.join(", ")} — results rely on the others.`);
  if (q.flags && q.flags.length) notes.push(`QUALITY CONTROL FAILED: ${q.flags.join(", ")} — analysed because quality_mode=flag; check the preprocessing picture before reading the results.`);
  for (const c of q.implausible || []) notes.push(`IMPLAUSIBLE (${c.check}): ${c.detail} — not to be read as a finding.`);
  const oodWhy = q.ood_threshold == null ? "" : ` > ${fmt(q.ood_threshold, 2)}, ${q.ood_method}`;
  if (q.ood_flag) notes.push(`OUT OF DISTRIBUTION (score ${fmt(q.ood_score, 2)}${oodWhy}): this study differs from the training data; treat every result with caution.`);
  $("quality").replaceChildren(...(notes.length ? notes : ["All four modalities present; the study is within the training distribution."]).map((n) => el("p", { text: n })));
  $("quality").className = notes.length ? "quality warn" : "quality ok";

  const pre = q.preprocessing;
  if (pre) {
    const ran = pre.steps.filter((s) => !s.skipped).map((s) => s.step + (s.modality ? ` ${s.modality}` : ""));
    $("qc-summary").textContent = `${pre.path === "raw" ? "Raw scanner study" : "Skull-stripped study (fast path)"}: ${ran.join(", ")}. Preprocessing ${pre.version}.`;
  }
  if (body.qc_png_b64) {
    $("qc-image").src = `data:image/png;base64,${body.qc_png_b64}`;
    $("qc-image").hidden = false;
  }
  const v = f.segmentation.volumes_ml;
  table($("volumes"), ["region", "volume (mL)"], ["WT", "TC", "ET", "NCR", "ED"].map((k) => [k, fmt(v[k], 1)]), "Tumour volumes");
  const loc = f.localization;
  $("volumes").append(el("tfoot", {}, el("tr", {}, el("td", { colspan: 2, text: loc.found ? `Localized${loc.hemisphere ? ` in the ${loc.hemisphere} hemisphere` : ""}` : "No tumour localized" }))));

  const rows = Object.entries(f.classification).map(([marker, m]) => {
    const top = Math.max(...Object.values(m.probabilities));
    const meter = el("meter", { min: 0, max: 1, value: top, "aria-label": `${marker} probability of ${m.label}` });
    return [marker, m.label, el("span", {}, meter, ` ${fmt(top, 2)}`), `± ${fmt(m.uncertainty, 2)}`];
  });
  table($("classification"), ["marker", "prediction", "probability", "uncertainty"], rows, "Calibrated probabilities (MC-dropout uncertainty)");

  const s = f.survival;
  $("risk").textContent = `Risk group: ${s.risk_group} (score ${fmt(s.risk_score, 2)}); median survival ${s.median_survival_days ? `${Math.round(s.median_survival_days)} days` : "not reached"}.`;
  drawCurve($("curve"), s.curve, s.median_survival_days);

  if (body.report_markdown) renderMarkdown($("report"), body.report_markdown);
  else $("report").replaceChildren(el("p", { text: (f.report && f.report.error) || "No report." }));

  for (const url of state.urls) URL.revokeObjectURL(url);
  state.urls = [];
  const link = (name, blob, what) => {
    const url = URL.createObjectURL(blob);
    state.urls.push(url);
    return el("li", {}, el("a", { href: url, download: name, text: `${what} (${name})` }));
  };
  const items = [link("segmentation.nii.gz", new Blob([base64ToBuffer(body.mask_nifti_gz_b64)]), "Segmentation mask, NIfTI")];
  if (body.dicom_seg_b64) items.push(link("segmentation.dcm", new Blob([base64ToBuffer(body.dicom_seg_b64)], { type: "application/dicom" }), "DICOM SEG"));
  if (body.report_fhir) items.push(link("report.fhir.json", new Blob([JSON.stringify(body.report_fhir, null, 2)], { type: "application/fhir+json" }), "FHIR DiagnosticReport"));
  items.push(link("findings.json", new Blob([JSON.stringify(f, null, 2)], { type: "application/json" }), "Findings JSON"));
  $("downloads").replaceChildren(...items);
  $("versions").textContent = "Model versions: " + Object.entries(f.model_versions).map(([t, v]) => `${t} v${v}`).join(", ") + `; preprocessing ${f.preprocessing_version}.`;
}

function drawCurve(target, points, median) {
  // A survival curve starts at probability 1 on day 0.
  const curve = points.length && points[0].days > 0 ? [{ days: 0, probability: 1 }, ...points] : points;
  const NS = "http://www.w3.org/2000/svg";
  const [W, H, L, B] = [360, 200, 40, 30];
  const maxDays = Math.max(...curve.map((p) => p.days), 1);
  const x = (d) => L + (d / maxDays) * (W - L - 10);
  const y = (p) => 10 + (1 - p) * (H - B - 10);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("id", "survival-curve");
  svg.setAttribute("aria-label", `Predicted survival curve over ${Math.round(maxDays)} days` + (median ? `; median ${Math.round(median)} days` : ""));
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text) n.textContent = text;
    svg.append(n);
  };
  add("line", { x1: L, y1: H - B, x2: W - 10, y2: H - B, class: "axis" });
  add("line", { x1: L, y1: 10, x2: L, y2: H - B, class: "axis" });
  add("text", { x: L - 6, y: 14, "text-anchor": "end", class: "tick" }, "1.0");
  add("text", { x: L - 6, y: H - B, "text-anchor": "end", class: "tick" }, "0");
  add("text", { x: W - 10, y: H - 8, "text-anchor": "end", class: "tick" }, `${Math.round(maxDays)} days`);
  add("path", { d: curve.map((p, i) => `${i ? "L" : "M"}${x(p.days).toFixed(1)},${y(p.probability).toFixed(1)}`).join(" "), class: "curve" });
  if (median) add("line", { x1: x(median), y1: y(0.5), x2: x(median), y2: H - B, class: "median" });
  target.replaceChildren(svg);
}

async function loadDemoCases() {
  if (!state.config.demo_cases) return;
  const r = await fetch("../v1/demo-cases");
  if (!r.ok) return;
  const { cases } = await r.json();
  $("demo-case").replaceChildren(el("option", { value: "", text: "(none — use the files above)" }),
    ...cases.map((c) => el("option", { value: `${c.case_id}|${c.modalities.join(",")}`, text: `${c.case_id} (${c.modalities.join(", ")})` })));
  $("demo-fieldset").hidden = false;
}

// -- a job's stored results, and the clinician's review --------------------------------------------
function bufferToBase64(buffer) {
  let text = "";
  const bytes = new Uint8Array(buffer);
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function jobArtifact(job, name, kind) {
  const r = await platformFetch(`/v1/jobs/${encodeURIComponent(job.id)}/artifacts/${name}`);
  if (r.status === 404) return null;
  if (!r.ok) throw new Error(`${name}: ${await errorText(r)}`);
  return kind === "json" ? r.json() : kind === "text" ? r.text() : r.arrayBuffer();
}

async function openJob(job) {
  showError($("error"), "");
  selectTab($("tab-viewer"));
  $("progress").textContent = `Loading job ${job.id}…`;
  try {
    const [findings, mask, preview, report, fhir] = await Promise.all([
      jobArtifact(job, "findings", "json"), jobArtifact(job, "mask", "binary"), jobArtifact(job, "preview", "json"),
      jobArtifact(job, "report", "text"), jobArtifact(job, "report_fhir", "json")]);
    if (!findings || !mask) throw new Error(`job ${job.id} has no results yet (${job.state})`);
    if (!preview) throw new Error(`job ${job.id} kept no images to view (analysed before the platform stored previews); its findings: ${job.result?.summary || ""}`);
    await showResults({ findings, mask_nifti_gz_b64: bufferToBase64(mask), images_nifti_gz_b64: preview?.images_nifti_gz_b64 || {},
      qc_png_b64: preview?.qc_png_b64, report_markdown: report, report_fhir: fhir });
    $("progress").textContent = `Job ${job.id} (${job.source}): ${job.state}.`;
    showReview(job);
  } catch (err) {
    $("progress").textContent = "";
    showError($("error"), err.message || String(err));
  }
}

function showReview(job) {
  const panel = $("review-panel");
  state.reviewing = job.state === "awaiting review" ? job : null;
  panel.hidden = !state.reviewing;
  if (!state.reviewing) return;
  $("review-job").textContent = `Job ${job.id} from ${job.source}: ${job.result?.summary || ""}. Accepted results are sent to the PACS marked as reviewed; rejected ones are not sent.`;
  $("review-reason").value = "";
  $("review-status").textContent = "";
  const who = whoAmI();
  for (const id of ["review-accept", "review-reject"]) {
    $(id).disabled = !mayReview();
    $(id).title = mayReview() ? "" : `needs the ${reviewRole()} role${who ? ` (you are ${who.role})` : " (enter a token)"}`;
  }
}

async function review(decision) {
  const job = state.reviewing;
  const reason = $("review-reason").value.trim();
  if (!reason) {
    $("review-status").textContent = "Give a reason: it goes to the audit log with your decision.";
    $("review-reason").focus();
    return;
  }
  try {
    const r = await platformFetch(`/v1/jobs/${encodeURIComponent(job.id)}:review`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ decision, reason }),
    });
    if (!r.ok) throw new Error(await errorText(r));
    const after = await r.json();
    $("review-status").textContent = `${decision === "accept" ? "Accepted" : "Rejected"}: job ${job.id} is now ${after.state}.`;
    for (const id of ["review-accept", "review-reject"]) $(id).disabled = true;
    state.reviewing = null;
    refreshJobs();
  } catch (err) {
    $("review-status").textContent = `Not recorded: ${err.message}`;
  }
}

function initViewerControls() {
  for (const id of ["window", "level", "opacity", "show-overlay", "show-box"]) $(id).addEventListener("input", () => state.viewer.draw());
  $("modality").addEventListener("change", (e) => {
    state.viewer.modality = e.target.value;
    state.viewer.draw();
  });
  for (const plane of ["axial", "coronal", "sagittal"]) {
    $(`slice-${plane}`).addEventListener("input", (e) => state.viewer.setSlice(plane, Number(e.target.value)));
  }
}

async function init() {
  initTabs();
  initViewerControls();
  $("token").value = sessionStorage.getItem("oncoserve-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("oncoserve-token", token());
    refreshConsole();
  });
  $("study-form").addEventListener("submit", analyse);
  $("review-accept").addEventListener("click", () => review("accept"));
  $("review-reject").addEventListener("click", () => review("reject"));
  const r = await fetch("../v1/ui-config");
  state.config = r.ok ? await r.json() : { platform_api: null, demo_cases: false };
  initConsole(state.config.platform_api, openJob);
  await loadDemoCases();
  document.body.dataset.ready = "true";
}

init();
