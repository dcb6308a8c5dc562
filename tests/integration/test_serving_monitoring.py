"""Drift monitoring on the served stack: studies from the training scanner and from a scanner the models
never saw (intensity scale, contrast curve and noise outside anything in training) are analysed; the
platform's drift report flags the unseen site and not the training one, against the champion's own
training reference, and says so on its /metrics and through the CLI."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from oncoserve.object_store import object_store
from serving import monitoring_store
from tests.conftest import oncoserve
from tests.helpers import wait_until

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
N = 6  # studies per site (the drift rule needs at least 5)


def _unseen_scanner(src, dst, seed: int) -> None:
    """A case as a scanner outside the training range would write it: x3 scale, gamma 2.2, 6 % noise."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)
    for path in src.glob("*.nii.gz"):
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if not path.name.endswith("_seg.nii.gz"):
            top = float(data.max()) or 1.0
            data = 3.0 * top * np.clip(data / top, 0, None) ** 2.2 + rng.normal(0, 0.06 * top, data.shape)
        nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), dst / path.name)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """N new cases from the reference scanner the training data also came from, and the same cases
    through the unseen scanner."""
    from imaging.phantoms import synthesise

    root = tmp_path_factory.mktemp("monitoring")
    training_like = synthesise(root / "site-a", n=N, seed=3, sites=1)
    cases = sorted(p for p in training_like.iterdir() if p.is_dir())
    for i, case in enumerate(cases):
        _unseen_scanner(case, root / "scanner-x" / case.name, seed=i)
    return {"site-a": cases, "scanner-x": sorted(p for p in (root / "scanner-x").iterdir())}


def send(served, case_dir, site: str) -> int:
    files = {p.name.split("_")[-1].split(".")[0]: (p.name, p.read_bytes(), "application/gzip")
             for p in sorted(case_dir.glob("*.nii.gz")) if not p.name.endswith("_seg.nii.gz")}  # fmt: skip
    r = httpx.post(f"{served['url']}/v1/localization:predict", headers=served["auth"], files=files,
                   data={"site": site, "case_id": f"{site}-{case_dir.name}"}, timeout=120)  # fmt: skip
    return r.status_code


def drift(days: float = 1.0) -> dict:
    done = oncoserve("monitor", "drift", "--task", "localization", "--days", str(days), "--json")  # the task the studies went to
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_a_site_outside_the_training_range_drifts_and_the_training_site_does_not(served, sites):
    bad = httpx.post(f"{served['url']}/v1/localization:predict", headers=served["auth"],
                     files={"t1": ("t1.nii.gz", b"x", "application/gzip")}, data={"site": "../x"}, timeout=60)  # fmt: skip
    assert bad.status_code == 400 and "site" in bad.json()["error"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        statuses = list(pool.map(lambda item: send(served, item[1], item[0]),
                                 [(site, case) for site, cases in sites.items() for case in cases]))  # fmt: skip
    assert statuses == [200] * (2 * N)

    def counted() -> bool:
        got = drift()["sites"]
        return all(got.get(site, {}).get("studies", 0) >= N for site in sites)

    assert wait_until(counted, timeout_s=120, interval_s=1.0)  # records are written after each answer
    report = drift()
    ARTIFACTS.mkdir(exist_ok=True)  # the figures, for the record (not asserted beyond the decisions below)
    (ARTIFACTS / "drift.json").write_text(json.dumps({site: {**{k: r[k] for k in ("studies", "score", "drifted", "features_drifted")},
                                                             "output_drift": {k: r["output_drift"][k] for k in ("score", "features_tested", "features_drifted")}}
                                                      for site, r in report["sites"].items()}, indent=1) + "\n")  # fmt: skip
    unseen, training = report["sites"]["scanner-x"], report["sites"]["site-a"]
    assert unseen["studies"] == N and training["studies"] == N
    assert unseen["drifted"] and unseen["score"] >= unseen["threshold"], unseen["features_drifted"]
    assert not training["drifted"] and training["score"] < training["threshold"], training["features_drifted"]
    assert {"t1_p99", "t1ce_p99"} <= set(unseen["features_drifted"])  # the scale shift is seen before any z-score
    assert report["reference"]["n_cases"] >= 3 and "Kolmogorov-Smirnov" in report["test"]
    # The answers are tested too, against the champion's answers on its held-out test cases (tumour found).
    assert report["output_reference"]["n_cases"] >= 1 and "answers (output_drift)" in report["test"]
    assert unseen["output_drift"]["studies"] == N and training["output_drift"]["studies"] == N
    settings = served["settings"]
    metrics = httpx.get(f"http://{settings.host}:{settings.platform_port}/metrics", timeout=30).text
    assert 'oncoserve_input_drifted{site="scanner-x",task="localization"} 1.0' in metrics
    assert 'oncoserve_input_drifted{site="site-a",task="localization"} 0.0' in metrics
    assert 'oncoserve_output_drift_score{site="site-a",task="localization"}' in metrics
    printed = oncoserve("monitor", "drift", "--days", "1")
    assert printed.returncode == 0 and "DRIFTED" in printed.stdout, printed.stdout
    # Payload logging is opt-in: statistics were recorded, no image was kept.
    store = object_store(settings)
    assert not list(store.list_objects(settings.bucket_artifacts, prefix=monitoring_store.PAYLOADS + "/", recursive=True))
