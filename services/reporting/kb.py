"""The knowledge base: short documents written for this project, split into citable passages.

Each document has a small header (id, title, sources) and paragraphs; a passage is one paragraph,
cited as `<doc id>#<n>`. The base is versioned by the sha256 of its files, and travels with the
reporting model in the registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PACKAGED = Path(__file__).with_name("knowledge")


@dataclass(frozen=True)
class Passage:
    id: str  # doc#n
    doc: str
    title: str
    text: str
    sources: str


@dataclass(frozen=True)
class KnowledgeBase:
    passages: tuple[Passage, ...]
    version: str

    def by_id(self, passage_id: str) -> Passage:
        for p in self.passages:
            if p.id == passage_id:
                return p
        raise KeyError(passage_id)

    def doc(self, doc_id: str) -> list[Passage]:
        return [p for p in self.passages if p.doc == doc_id]


def _parse(path: Path) -> list[Passage]:
    text = path.read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path.name}: missing the --- header")
    header, body = text[4:].split("\n---\n", 1)
    meta = dict(line.split(": ", 1) for line in header.strip().splitlines())
    for key in ("id", "title", "sources"):
        if key not in meta:
            raise ValueError(f"{path.name}: header lacks {key}")
    paragraphs = [" ".join(p.split()) for p in body.strip().split("\n\n") if p.strip()]
    return [Passage(f"{meta['id']}#{i}", meta["id"], meta["title"], p, meta["sources"]) for i, p in enumerate(paragraphs, 1)]


def load(folder: Path = PACKAGED) -> KnowledgeBase:
    files = sorted(folder.glob("*.md"))
    if not files:
        raise ValueError(f"{folder}: no knowledge documents (*.md)")
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:12]
    return KnowledgeBase(tuple(p for f in files for p in _parse(f)), f"kb-{digest}")
