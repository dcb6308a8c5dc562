"""Synthetic phantoms: labels statistically coupled to imaging, site effects, determinism, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imaging.dataset import iter_dataset, read_clinical
from imaging.labels import ED, ET, NCR
from imaging.phantoms import make_case, synthesise, write_dataset

N = 36


@pytest.fixture(scope="module")
def cohort():
    """N phantom cases in memory with their generation records (the truth before label masking)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # The cases are independent and deterministic per index: made on both cores, the same cohort in half
    # the time (spawned workers: no fork of a process whose thread pools may be running).
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        made = list(pool.map(_case, range(N)))
    return [dict(record["truth"], seg=study.segmentation.data, record=record, study=study) for study, record in made]


def _case(index: int):
    return make_case(seed=5, index=index, sites=3)


def fraction(seg: np.ndarray, label: int, of=(NCR, ET)) -> float:
    return float((seg == label).sum()) / max(int(np.isin(seg, of).sum()), 1)


def test_hgg_has_more_necrosis_and_enhancement_than_lgg(cohort):
    hgg = [c for c in cohort if c["grade"] == "HGG"]
    lgg = [c for c in cohort if c["grade"] == "LGG"]
    assert len(hgg) >= 5 and len(lgg) >= 5
    # Ring enhancement: HGG enhancing fraction of the core is high, LGG little or none.
    assert np.mean([fraction(c["seg"], ET) for c in hgg]) > 0.3
    assert np.mean([fraction(c["seg"], ET) for c in lgg]) < 0.1
    assert all((c["seg"] == ET).any() and (c["seg"] == NCR).any() for c in hgg)


def test_idh_wildtype_enhances_more_and_sits_deeper(cohort):
    hgg = [c for c in cohort if c["grade"] == "HGG"]
    wt = [c for c in hgg if c["idh"] == "wildtype"]
    mut = [c for c in cohort if c["idh"] == "mutant"]
    assert wt and mut
    assert np.mean([fraction(c["seg"], ET) for c in wt]) > np.mean([fraction(c["seg"], ET) for c in mut])
    assert np.mean([c["record"]["frontal"] for c in mut]) > np.mean([c["record"]["frontal"] for c in cohort if c["idh"] == "wildtype"])
    assert np.mean([c["record"]["depth_mm"] for c in cohort if c["idh"] == "wildtype"]) > np.mean(
        [c["record"]["depth_mm"] for c in mut]
    )


def test_codeletion_only_in_idh_mutant(cohort):
    assert all(c["idh"] == "mutant" for c in cohort if c["codeletion_1p19q"] == "codeleted")
    assert any(c["codeletion_1p19q"] == "codeleted" for c in cohort)


def test_every_tumour_has_oedema_and_stays_in_the_brain(cohort):
    for c in cohort:
        assert (c["seg"] == ED).any()
        brain = next(iter(c["study"].images.values())).data > 0
        assert not np.any((c["seg"] > 0) & ~brain)


def test_labels_go_missing_like_real_cohorts(cohort):
    known_idh = [c["study"].labels.idh is not None for c in cohort]
    known_mgmt = [c["study"].labels.mgmt is not None for c in cohort]
    assert 0.4 < np.mean(known_idh) < 1.0 and 0.3 < np.mean(known_mgmt) < 0.95
    assert all(c["study"].labels.os_days > 0 and c["study"].labels.os_event in (0, 1) for c in cohort)


def _region_mean(c, modality: str, label: int) -> float:
    image = c["study"].images.get(modality)
    seg = c["study"].segmentation.data
    return float(image.data[seg == label].mean()) if image is not None and (seg == label).any() else float("nan")


def test_idh_mutant_astrocytoma_shows_the_t2_flair_mismatch_whatever_its_grade(cohort):
    """IDH has an imaging signal of its own: the core is dark on FLAIR relative to T2 when IDH-mutant and
    1p/19q intact, in high- and low-grade tumours alike (so grade is not the only route to IDH)."""
    def ratio(c):
        return _region_mean(c, "flair", NCR) / _region_mean(c, "t2", NCR)

    astro = [ratio(c) for c in cohort if c["idh"] == "mutant" and c["codeletion_1p19q"] == "intact"]
    others = [ratio(c) for c in cohort if c["idh"] == "wildtype"]
    astro, others = [r for r in astro if np.isfinite(r)], [r for r in others if np.isfinite(r)]
    assert len(astro) >= 3 and len(others) >= 3
    assert np.median(astro) < 0.8 * np.median(others)


def test_codeleted_tumours_carry_calcifications(cohort):
    """Small foci dark on T2 inside codeleted tumours, seen at the reference scanner's resolution (thick
    slices at other sites blur them away, as they do in practice). Labels do not depend on the site, so
    each case is re-made at the reference site."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    codel_idx = [i for i, c in enumerate(cohort) if c["codeletion_1p19q"] == "codeleted"]
    intact_idx = [i for i, c in enumerate(cohort) if c["idh"] == "mutant" and c["codeletion_1p19q"] == "intact"][:4]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        codel, intact = list(pool.map(_dark_share, codel_idx)), list(pool.map(_dark_share, intact_idx))
    codel, intact = [v for v in codel if np.isfinite(v)], [v for v in intact if np.isfinite(v)]
    assert codel and intact and np.mean(codel) > 0.01 and np.mean(codel) > 5 * np.mean(intact)


def _dark_share(index: int) -> float:
    """Tumour voxels far darker on T2 than the tumour's own median, the case re-made at the reference site."""
    study, _ = make_case(seed=5, index=index, sites=1)
    if "t2" not in study.images:
        return float("nan")
    values = study.images["t2"].data[study.segmentation.data > 0].astype(float)
    return float(np.mean(values < 0.5 * np.median(values)))


def test_site_effects_survive_a_z_score():
    """The same patient at the reference scanner and at another site (one with the same slice spacing, so
    the grids match): after z-scoring inside the brain, as preprocessing does, the images still differ
    the way real scanners do, which a scale and an offset alone would not."""
    from imaging.phantoms import _site_params

    site = next(s for s in range(1, 50) if _site_params(5, s)["slice_mm"] == 0.0)
    reference, _ = make_case(seed=5, index=3, sites=1, first_site=0)
    other, _ = make_case(seed=5, index=3, sites=1, first_site=site)
    np.testing.assert_array_equal(reference.segmentation.data, other.segmentation.data)  # the same patient

    def zscored(study):
        data = study.images["t1ce"].data.astype(float)
        brain = data > 0
        return (data - data[brain].mean()) / data[brain].std(), brain

    (za, brain_a), (zb, brain_b) = zscored(reference), zscored(other)
    both = brain_a & brain_b
    assert np.mean(np.abs(za[both] - zb[both])) > 0.1


def test_molecular_labels_are_missing_as_in_real_cohorts(cohort):
    """1p/19q is tested mostly once a tumour is IDH-mutant; MGMT mostly in high grade."""
    def known_share(rows, label):
        return np.mean([getattr(c["study"].labels, label) is not None for c in rows])

    mutant = [c for c in cohort if c["idh"] == "mutant"]
    wild = [c for c in cohort if c["idh"] == "wildtype"]
    assert known_share(mutant, "codeletion_1p19q") > known_share(wild, "codeletion_1p19q") + 0.3
    hgg = [c for c in cohort if c["grade"] == "HGG"]
    lgg = [c for c in cohort if c["grade"] == "LGG"]
    assert known_share(hgg, "mgmt") > known_share(lgg, "mgmt")


def test_sites_differ_in_intensity_and_slice_thickness(cohort):
    by_site: dict[str, list] = {}
    for c in cohort:
        if "t1" in c["study"].images:
            by_site.setdefault(c["record"]["site"], []).append(c)
    medians = {s: np.median([np.median(c["study"].images["t1"].data[c["study"].images["t1"].data > 0]) for c in cs])
               for s, cs in by_site.items()}  # fmt: skip
    assert len(medians) == 3 and max(medians.values()) / min(medians.values()) > 1.1


def test_same_seed_gives_identical_bytes_and_ood_cases_whatever_the_number_of_processes(tmp_path):
    a = synthesise(tmp_path / "a", n=3, seed=9, ood_fraction=0.34)
    b = synthesise(tmp_path / "b", n=3, seed=9, ood_fraction=0.34, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    rows = read_clinical(a)
    assert len(rows) == 3
    studies = list(iter_dataset(a))
    assert sum(s.segmentation is None for s in studies) == 1  # the OOD case has no tumour label


def _fails_on_the_second_case(i, staging):
    if i == 1:
        raise ValueError("case 1 cannot be made")
    (staging / f"case-{i}").mkdir()
    return {"case_id": f"case-{i}"}, {"i": i}


def test_a_case_that_fails_in_a_worker_fails_the_dataset_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="case 1 cannot be made"):
        write_dataset(tmp_path / "d", 3, _fails_on_the_second_case, {}, lambda done, total: None, workers=2)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its staging folder


def test_synth_refuses_a_non_empty_target(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesise(tmp_path / "d", n=1, seed=0)
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"


def test_synth_and_manifest_cli(tmp_path):
    exe = str(Path(sys.executable).parent / "oncoserve")
    run = subprocess.run([exe, "data", "synth", "--out", str(tmp_path / "d"), "--n", "2", "--seed", "1", "--sites", "2"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    first = subprocess.run([exe, "data", "manifest", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    second = subprocess.run([exe, "data", "manifest", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    digest = first.stdout.strip().splitlines()[-1]
    assert len(digest) == 64 and digest == second.stdout.strip().splitlines()[-1]
    assert (tmp_path / "d" / "manifest.json").exists()
    (tmp_path / "d" / "clinical.csv").write_text("changed")
    third = subprocess.run([exe, "data", "manifest", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert third.stdout.strip().splitlines()[-1] != digest


def test_generator_1_is_reproduced_byte_for_byte_and_generator_2_differs():
    """Datasets made with the round-1 generator (and the demo, which still uses it) stay reproducible."""
    import hashlib

    v1, _ = make_case(seed=7, index=1, sites=2, version=1)
    digest = hashlib.sha256()
    for m in sorted(v1.images):
        digest.update(np.ascontiguousarray(v1.images[m].data).tobytes())
    digest.update(v1.segmentation.data.tobytes())
    assert digest.hexdigest() == "d82d719637d6707b6ccaad3fbbd8ddf09275633d27580bec8aca83da240aa7b3"
    v2, _ = make_case(seed=7, index=1, sites=2)
    assert any(not np.array_equal(v1.images[m].data, v2.images[m].data) for m in v1.images)
    with pytest.raises(ValueError, match="generator version"):
        make_case(seed=7, index=1, version=3)
