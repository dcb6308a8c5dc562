"""Grounded reports from findings: a knowledge base with retrieval, a deterministic template composer,
optional LLM generators, a grounding guard that falls back to the template, Markdown and FHIR R4."""
