"""The pipeline's definition (YAML schema, fingerprints) and the paired comparison statistics."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.pipeline_config import DEFAULT_CONFIG, PipelineConfigError, load_config, task_key
from training import compare


def test_packaged_definition_loads_and_relative_paths_follow_the_file(tmp_path):
    default = load_config(DEFAULT_CONFIG)
    assert default.tasks == ["localization", "segmentation", "classification", "survival"] and default.rollout.promote == "none"
    (tmp_path / "p.yaml").write_text("version: 1\ndata: data\nevaluation_sets: [{name: site-b, path: ../b}]\ngates: g.toml\n")
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.data == tmp_path / "data" and cfg.gates == tmp_path / "g.toml"
    assert cfg.evaluation_sets[0].path == (tmp_path / "../b").resolve()


@pytest.mark.parametrize("text, field", [
    ("version: 2\n", "version"),
    ("tasks: [reporting]\n", "tasks"),
    ("training: {epochs: {segmentation: 0}}\n", "training.epochs"),
    ("training: {lr: {dancing: 0.1}}\n", "training.lr"),
    ("rollout: {promote: everywhere}\n", "rollout.promote"),
    ("surprise: 1\n", "surprise"),
    ("evaluation_sets: [{name: a, path: x}, {name: a, path: y}]\n", "unique"),
    ("evaluation_sets: [{name: 'Bad Name', path: x}]\n", "evaluation_sets.0.name"),
    ("- a list\n", "mapping"),
    ("tasks: [unclosed\n", "not valid YAML"),
])  # fmt: skip
def test_invalid_definitions_name_the_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineConfigError) as err:
        load_config(path)
    assert field in str(err.value) and str(path) in str(err.value)


def test_missing_definition_is_a_message(tmp_path):
    with pytest.raises(PipelineConfigError, match="No such file"):
        load_config(tmp_path / "absent.yaml")


def test_fingerprint_follows_what_shapes_the_model_only(tmp_path):
    base = load_config(DEFAULT_CONFIG)
    key = task_key(base, "segmentation", "d" * 64, "abc")
    assert key == task_key(load_config(DEFAULT_CONFIG), "segmentation", "d" * 64, "abc")
    assert key != task_key(base, "localization", "d" * 64, "abc")
    assert key != task_key(base, "segmentation", "e" * 64, "abc")  # other data
    assert key != task_key(base, "segmentation", "d" * 64, "abd")  # other code
    longer = base.model_copy(deep=True)
    longer.training.epochs["segmentation"] = 99
    assert key != task_key(longer, "segmentation", "d" * 64, "abc")
    # Another task's settings leave this task's fingerprint alone.
    assert task_key(longer, "localization", "d" * 64, "abc") == task_key(base, "localization", "d" * 64, "abc")
    renamed = base.model_copy(update={"name": "other", "compare": base.compare.model_copy(update={"bootstrap": 50})})
    assert task_key(renamed, "segmentation", "d" * 64, "abc") == key  # reporting settings do not retrain


def _seg_rows(dice: list[float], site="site-1") -> list[dict]:
    return [{"case_id": f"c{i}", "site": site, "dice_WT": d, "dice_TC": d, "dice_ET": d, "hd95_WT": 10 * (1 - d)}
            for i, d in enumerate(dice)]  # fmt: skip


def test_a_clear_improvement_is_called_better_and_no_change_is_not():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 0.6, 30).tolist()
    better = compare.compare("segmentation", _seg_rows(a), _seg_rows([x + 0.2 for x in a]), n_boot=300)
    dice = next(m for m in better["metrics"] if m["name"] == "dice_WT")
    assert dice["verdict"] == "better" and dice["difference"]["ci95"][0] > 0.15
    hd = next(m for m in better["metrics"] if m["name"] == "hd95_WT")
    assert hd["verdict"] == "better" and hd["difference"]["value"] < 0  # lower is better
    same = compare.compare("segmentation", _seg_rows(a), _seg_rows(a), n_boot=300)
    assert all(m["verdict"] == "no clear difference" for m in same["metrics"])
    assert dice["a"]["ci95"][0] <= dice["a"]["value"] <= dice["a"]["ci95"][1]


def test_pairs_by_case_sites_and_disagreements():
    a = _seg_rows([0.9, 0.8, 0.7]) + [{**r, "case_id": "s" + r["case_id"], "site": "site-2"} for r in _seg_rows([0.5])]
    b = list(reversed(_seg_rows([0.9, 0.1, 0.7])))  # other order, and no row for the site-2 case
    doc = compare.compare("segmentation", a, b, n_boot=100, top_k=2)
    assert doc["n_cases"] == 3 and list(doc["per_site"]) == ["site-1"]
    assert doc["disagreements"][0]["case_id"] == "c1" and doc["disagreements"][0]["disagreement"] == pytest.approx(0.7)


def test_classification_auc_and_survival_c_index_with_intervals():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    rows = lambda noise: [{"case_id": f"c{i}", "site": "s", **{f"label_{m}": int(y[i]) for m in compare.CLS_TASKS},  # noqa: E731
                           **{f"p_{m}": float(np.clip(y[i] * 0.6 + 0.2 + rng.normal(0, noise), 0, 1)) for m in compare.CLS_TASKS}}
                          for i in range(40)]  # fmt: skip
    doc = compare.compare("classification", rows(0.4), rows(0.05), n_boot=200)
    grade = next(m for m in doc["metrics"] if m["name"] == "grade_auc")
    assert grade["b"]["value"] > grade["a"]["value"] and grade["b"]["value"] > 0.95
    days = rng.uniform(100, 1000, 30)
    surv = lambda risk: [{"case_id": f"c{i}", "risk": float(r), "os_days": float(d), "os_event": 1} for i, (r, d) in enumerate(zip(risk, days))]  # noqa: E731
    doc = compare.compare("survival", surv(-days), surv(rng.normal(size=30)), n_boot=200)
    c = doc["metrics"][0]
    assert c["a"]["value"] == pytest.approx(1.0) and c["verdict"] == "worse"


def test_single_version_report_and_refusals():
    doc = compare.compare("segmentation", None, _seg_rows([0.5, 0.6]), n_boot=100)
    assert "a" not in doc["metrics"][0] and doc["disagreements"] == [] and doc["per_site"]["site-1"]["dice_WT"][0] is None
    with pytest.raises(ValueError, match="share no scored case"):
        compare.compare("segmentation", _seg_rows([0.5]), [{**_seg_rows([0.5])[0], "case_id": "other"}])
    with pytest.raises(ValueError, match="no comparison for task"):
        compare.compare("reporting", None, [{"case_id": "x"}])
