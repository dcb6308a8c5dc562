"""A reporting model version on disk: the knowledge base, the prompt templates and a manifest, as the
registry stores them (the version's `model/` folder), and how well it reports on the reference cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.reporting import guard, kb, reference, template
from services.reporting.compose import Reporter
from services.reporting.facts import from_findings
from services.reporting.generators import PROMPT_DIR, PROMPT_VERSION

MANIFEST = "reporting.json"
DIGEST_TAG = "content_sha256"  # registry version tag: {relative path: sha256} of the model folder


def write(model_dir: Path, kb_dir: Path = kb.PACKAGED, prompt_dir: Path = PROMPT_DIR, prompt_version: str = PROMPT_VERSION) -> dict:
    """Lay out a reporting model: knowledge/*.md, prompts/*.txt, reporting.json."""
    knowledge = kb.load(kb_dir)  # parses every document: a broken one fails here, not in serving
    shutil.copytree(kb_dir, model_dir / "knowledge", dirs_exist_ok=True)
    shutil.copytree(prompt_dir, model_dir / "prompts", dirs_exist_ok=True)
    if not (model_dir / "prompts" / f"{prompt_version}.txt").exists():
        raise ValueError(f"prompt template {prompt_version}.txt not in {prompt_dir}")
    manifest = {"knowledge_base_version": knowledge.version, "prompt_version": prompt_version,
                "passages": len(knowledge.passages), "sections": list(template.SECTIONS)}  # fmt: skip
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def load(model_dir: Path) -> tuple[kb.KnowledgeBase, str, Path]:
    manifest = json.loads((model_dir / MANIFEST).read_text())
    return kb.load(model_dir / "knowledge"), manifest["prompt_version"], model_dir / "prompts"


def download_verified(registry, version: str, dst: Path, expected: dict[str, str] | None = None) -> Path:
    """The version's model folder, only if every file is the one recorded when it was registered
    (`expected`: the digests of the signed promotion record; default: the registry tag)."""
    from serving.artifacts import TamperedArtifact, verify_tree

    if expected is not None:
        return verify_tree(registry.download("reporting", version, dst), expected)
    recorded = registry.version("reporting", version).tags.get(DIGEST_TAG)
    if not recorded:
        raise TamperedArtifact(f"reporting v{version} has no recorded sha256 ({DIGEST_TAG} tag); register it again "
                               "with `oncoserve reporting register`")  # fmt: skip
    return verify_tree(registry.download("reporting", version, dst), json.loads(recorded))


def evaluate(model_dir: Path) -> dict:
    """Template reports on the reference cases must pass the guard; planted errors must be caught."""
    knowledge, prompt_version, prompt_dir = load(model_dir)
    reporter = Reporter(knowledge, prompt_version=prompt_version, prompt_dir=prompt_dir)
    passed = complete = 0
    for case in reference.CASES:
        report = reporter.report(case)
        passed += report.data["guard"]["passed"]
        complete += all(f"## {s}" in report.markdown for s in template.SECTIONS) and template.DISCLAIMER in report.markdown
    base = reporter.report(reference.BASE)
    caught = sum(
        any(problem in p for p in guard.check(edit(base.markdown), from_findings(reference.BASE),
                                               [c["text"] for c in base.data["citations"]], base.data["references"]).problems)
        for edit, problem in reference.PLANTED
    )  # fmt: skip
    n = len(reference.CASES)
    return {"guard_pass_rate": passed / n, "sections_complete_rate": complete / n,
            "hallucination_detection_rate": caught / len(reference.PLANTED)}  # fmt: skip
