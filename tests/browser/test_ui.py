"""The web UI in a real browser (Debian's chromium driven by Playwright) against the served stack.

Screenshots are saved to test-artifacts/ui/ (kept by CI as artifacts, ignored by git).
"""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox cannot start.
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture()
def page(browser, served):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(f"{served['url']}/ui/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield page
    context.close()
    # Content-Security-Policy violations and script errors surface here.
    assert not [e for e in errors if "Failed to load resource" not in e], errors


def _citations(markdown: str) -> list[str]:
    import re

    return re.findall(r"\[([A-Za-z0-9_.:#-]+)\]", markdown)


def admin_token(settings) -> str:
    return (settings.home / "token").read_text().strip()


def findings_version(body: dict) -> str:
    return body["findings"]["quality"]["preprocessing"]["version"]


def test_upload_renders_overlay_probabilities_curve_and_report(page, served, tiny_dataset):
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[0]
    page.fill("#token", admin_token(served["settings"]))
    for modality in ("t1", "t1ce", "t2", "flair"):
        page.set_input_files(f"#file-{modality}", str(case / f"{case.name}_{modality}.nii.gz"))
    page.fill("#age", "55")
    assert not page.is_visible("#demo-fieldset")  # no demo dataset configured for this server
    with page.expect_response(lambda r: "studies:analyze" in r.url, timeout=180_000) as answer:
        page.focus("#analyse")
        page.keyboard.press("Enter")  # submitted from the keyboard
    body = answer.value.json()
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    assert "Analysis complete" in page.inner_text("#progress")

    # The overlay: move the axial slider (keyboard) to the slice with the most mask voxels; the canvas
    # then shows exactly that slice's labelled voxels in the label colours.
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["mask_nifti_gz_b64"]))).get_fdata().astype(np.uint8)
    per_slice = (mask > 0).sum(axis=(0, 1))
    assert per_slice.max() > 0, "the served segmentation found no tumour in a phantom with one"
    target = int(per_slice.argmax())
    page.focus("#slice-axial")
    page.keyboard.press("Home")
    for _ in range(target):
        page.keyboard.press("ArrowRight")
    assert page.input_value("#slice-axial") == str(target)
    assert int(page.get_attribute("#canvas-axial", "data-labelled-pixels")) == int(per_slice[target])
    colours = page.evaluate("""() => {
        const c = document.getElementById('canvas-axial'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let coloured = 0; for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2]) coloured++;
        return coloured; }""")
    assert colours >= per_slice[target]  # overlay pixels (and the box) are not grey
    page.uncheck("#show-overlay")
    assert int(page.get_attribute("#canvas-axial", "data-labelled-pixels")) == 0

    # The preprocessing check: what ran, and the QC picture (mask outline, registration checkerboard).
    assert "fast path" in page.inner_text("#qc-summary") and findings_version(body) in page.inner_text("#qc-summary")
    assert page.is_visible("#qc-image") and page.evaluate("document.getElementById('qc-image').naturalWidth") > 100

    findings = body["findings"]
    cls_text = page.inner_text("#classification")
    for marker, m in findings["classification"].items():
        assert marker in cls_text and m["label"] in cls_text
        assert f"{max(m['probabilities'].values()):.2f}" in cls_text and f"± {m['uncertainty']:.2f}" in cls_text
    path = page.get_attribute("#survival-curve path.curve", "d")
    curve = findings["survival"]["curve"]
    assert path.startswith("M") and path.count("L") == len(curve) - (curve[0]["days"] <= 0)  # (+ day 0 at 1.0)
    assert findings["survival"]["risk_group"] in page.inner_text("#risk")
    report = page.inner_text("#report")
    assert findings["report"]["integrated_diagnosis"].split(",")[0] in report
    assert "References" in report and any(f"[{c}]" in report for c in _citations(body["report_markdown"]))
    assert "not a medical device" in page.inner_text("#viewer").lower()
    assert page.locator("#report em").count() >= 1  # the report's own disclaimer, set apart
    downloads = page.inner_text("#downloads")
    assert "segmentation.nii.gz" in downloads and "report.fhir.json" in downloads
    with page.expect_download() as dl:
        page.click("text=Segmentation mask, NIfTI")
    assert Path(dl.value.path()).read_bytes() == base64.b64decode(body["mask_nifti_gz_b64"])
    page.check("#show-overlay")
    page.screenshot(path=str(ARTIFACTS / "viewer-results.png"), full_page=True)


def test_missing_modality_and_bad_upload_are_shown_plainly(page, served, tiny_dataset):
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[1]
    page.set_input_files("#file-flair", str(case / f"{case.name}_flair.nii.gz"))
    page.click("#analyse")  # no token yet: serving refuses anonymous callers, and the page says why
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "HTTP 401" in page.inner_text("#error") and "needs a token" in page.inner_text("#error")
    page.fill("#token", admin_token(served["settings"]))
    page.dispatch_event("#token", "change")
    page.click("#analyse")
    page.wait_for_selector("#results:not([hidden])", timeout=180_000)
    quality = page.inner_text("#quality")
    assert "Missing modalities: t1, t1ce, t2" in quality
    page.screenshot(path=str(ARTIFACTS / "viewer-missing-modalities.png"), full_page=True)
    page.set_input_files("#file-flair", files=[{"name": "x_flair.nii.gz", "mimeType": "application/gzip", "buffer": b"not a nifti"}])
    page.click("#analyse")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "HTTP 4" in page.inner_text("#error")


def test_console_shows_a_refused_promotion_with_its_failing_gate(page, served):
    registry = served["registry"]
    page.fill("#token", admin_token(served["settings"]))
    page.dispatch_event("#token", "change")
    page.focus("#tab-viewer")
    page.keyboard.press("ArrowRight")  # tabs switch from the keyboard
    assert page.is_visible("#console") and not page.is_visible("#viewer")
    page.wait_for_selector("#registry tbody tr", timeout=30_000)
    page.wait_for_selector("#serving tbody tr", timeout=30_000)
    assert "segmentation" in page.inner_text("#serving") and "p50" in page.inner_text("#routes")
    version = registry.alias("survival", "champion")
    candidate_before = registry.alias("survival", "candidate")
    # The test stack's gates (tests.conftest.TEST_GATES) hold survival to an unreachable floor: refused.
    page.click(f"button[aria-label='Promote to candidate: survival version {version}']")
    page.wait_for_selector("#gate-table", timeout=120_000)
    gates = page.inner_text("#gate-results")
    assert "Refused" in gates and "floor:c_index" in gates and "FAIL" in gates
    assert registry.alias("survival", "candidate") == candidate_before
    page.wait_for_function("document.querySelector('#audit').innerText.includes('refused')", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "console-refused.png"), full_page=True)


def test_console_shows_each_tasks_traffic_policy_and_input_drift_per_site(page, served, tiny_dataset):
    from serving import monitoring_store
    from tests.helpers import study_files, wait_until

    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[1]
    for i in range(3):  # studies from a named site, so the drift panel has a bar of its own for it
        r = httpx.post(f"{served['url']}/v1/segmentation:predict", headers=served["auth"], files=study_files(case),
                       data={"case_id": f"ui-drift-{i}", "site": "ui-site"}, timeout=180)  # fmt: skip
        assert r.status_code == 200, r.text[:300]
    bucket = served["settings"].bucket_artifacts
    assert wait_until(lambda: sum(r.get("site") == "ui-site" for r in monitoring_store.records(served["store"], bucket, 1)) >= 3,
                      timeout_s=30, interval_s=0.5)  # fmt: skip
    page.fill("#token", admin_token(served["settings"]))
    page.dispatch_event("#token", "change")
    page.click("#tab-console")
    page.wait_for_selector("#rollouts tbody tr", timeout=30_000)
    rows = page.evaluate("""() => [...document.querySelectorAll('#rollouts tbody tr')].map((tr) => [...tr.cells].map((c) => c.innerText))""")
    assert [row[0] for row in rows] == ["localization", "segmentation", "classification", "survival"]
    registry = served["registry"]
    assert all(row[1] == registry.alias(row[0], "champion") and row[2] in ("champion", "shadow", "canary") for row in rows), rows
    page.wait_for_selector("#drift-bars rect[data-site='ui-site']", timeout=30_000)
    drift = page.inner_text("#drift")
    assert "ui-site" in drift and "Kolmogorov-Smirnov" in drift
    page.screenshot(path=str(ARTIFACTS / "console-rollouts-drift.png"), full_page=True)


def test_roles_disable_what_they_may_not_do(page, served):
    from oncoserve.auth import TokenStore

    store = TokenStore(served["settings"].tokens_file)
    viewer = store.create(f"ui-viewer-{id(page)}", "viewer", store.authenticate(admin_token(served["settings"])))
    page.fill("#token", viewer)
    page.dispatch_event("#token", "change")
    page.click("#tab-console")
    page.wait_for_selector("#registry tbody tr", timeout=30_000)
    page.wait_for_function("document.getElementById('whoami').innerText.includes('viewer')", timeout=10_000)
    # Read in one go: the table re-renders on every refresh.
    state = page.evaluate("""() => [...document.querySelectorAll('#registry button')].map((b) => [b.disabled, b.title])""")
    assert state and all(disabled for disabled, _ in state)
    assert "needs the data-scientist role (you are viewer)" in state[0][1]


def test_a_dicom_study_runs_as_a_job_and_a_clinician_rejects_it_in_the_viewer(page, served, tiny_dataset, tmp_path):
    """A DICOM study submitted from the viewer as a job (results to the PACS after review) shows its
    progress, opens with its stored images and findings, and is rejected with a reason; the console lists
    it; the decision is the job's and the audit's."""
    from pydicom.uid import generate_uid

    from imaging.dataset import read_case
    from oncoserve.audit import AuditLog
    from tests.dicom_factory import series_datasets, write_zip
    from tests.helpers import wait_until

    settings = served["settings"]
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[4]
    study = read_case(tiny_dataset, case.name)
    descriptions = {"t1": "T1 MPRAGE", "t1ce": "T1 post gad", "t2": "T2 TSE", "flair": "FLAIR"}
    archive = write_zip(tmp_path / "study.zip", {m: series_datasets(study.images[m], descriptions[m], generate_uid()) for m in study.present})
    headers = {"authorization": f"Bearer {admin_token(settings)}"}

    page.fill("#token", admin_token(settings))
    page.dispatch_event("#token", "change")
    page.set_input_files("#file-dicom", str(archive))
    page.check("#as-job")
    page.check("#job-export")
    with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST", timeout=120_000) as answer:
        page.click("#analyse")
    job_id = answer.value.json()["id"]
    page.wait_for_selector(f"#progress:has-text('Job {job_id}')", timeout=30_000)  # followed while it runs
    page.wait_for_selector("#review-panel:not([hidden])", timeout=300_000)
    page.wait_for_selector("#results:not([hidden])", timeout=10_000)
    job = httpx.get(f"{settings.platform_url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
    assert job["state"] == "awaiting review" and job["input"]["export"] is True, job
    assert "preview" in job["result"]["artifacts"]
    wt = job["result"]["findings"]["segmentation"]["volumes_ml"]["WT"]
    assert f"{wt:.1f}" in page.inner_text("#volumes")  # the job's stored findings
    assert page.evaluate("() => document.getElementById('modality').options.length") == len(study.present)
    # A decision needs a reason; with one, the rejection is recorded and nothing will be sent.
    page.click("#review-reject")
    assert "Give a reason" in page.inner_text("#review-status")
    page.fill("#review-reason", "motion artefact on FLAIR")
    page.click("#review-reject")
    page.wait_for_selector("#review-status:has-text('Rejected')", timeout=30_000)  # a selector: the CSP forbids eval
    done = httpx.get(f"{settings.platform_url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
    assert done["state"] == "rejected" and done["review"]["decision"] == "reject" and done["review"]["reason"] == "motion artefact on FLAIR"
    assert wait_until(lambda: any(e.get("action") == "review" and e.get("job") == job_id and e.get("decision") == "reject"
                                  for e in AuditLog(settings.audit_file).entries()), timeout_s=30, interval_s=0.3)  # fmt: skip
    # The console lists it with its state; its results open again from there.
    page.click("#tab-console")
    page.wait_for_selector(f"#jobs tbody tr:has-text('{job_id}'):has-text('rejected') meter", timeout=30_000)
    page.click(f"button[aria-label='Open job {job_id}']")
    page.wait_for_selector(f"#progress:has-text('Job {job_id} (api): rejected')", timeout=60_000)
    assert page.is_hidden("#review-panel")  # decided: nothing more to review
    page.screenshot(path=str(ARTIFACTS / "review-rejected.png"), full_page=True)


def test_controls_are_labelled_and_reachable_by_keyboard(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, button, canvas, meter')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !(e.textContent || '').trim())
        .map((e) => e.id || e.outerHTML.slice(0, 60))""")
    assert unlabelled == []
    # Tab order reaches the study form and its submit button from the top of the page.
    seen = []
    for _ in range(30):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id"))
    assert {"tab-viewer", "token", "file-t1", "file-flair", "age", "analyse"} <= set(seen)


def test_ui_security_headers_and_cors(served):
    ui = httpx.get(f"{served['url']}/ui/", timeout=10)
    assert ui.status_code == 200
    csp = ui.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert ui.headers["x-content-type-options"] == "nosniff" and ui.headers["x-frame-options"] == "DENY"
    assert "cdn" not in ui.text.lower() and "http" not in ui.text.split("<body>")[0].replace("http-equiv", "")
    settings = served["settings"]
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
    ok = httpx.options(f"{settings.platform_url}/v1/models", headers={"origin": settings.serve_url, **preflight}, timeout=10)
    assert ok.headers.get("access-control-allow-origin") == settings.serve_url
    evil = httpx.options(f"{settings.platform_url}/v1/models", headers={"origin": "http://evil.example", **preflight}, timeout=10)
    assert "access-control-allow-origin" not in evil.headers


def test_demo_case_files_stay_inside_their_folder(served):
    for path in ("/v1/demo-cases/..%2F..%2Fetc/flair", "/v1/demo-cases/PH-0002-0000/passwd", "/v1/demo-cases/x/flair"):
        r = httpx.get(served["url"] + path, timeout=10)
        assert r.status_code == 404 and "root:" not in r.text
