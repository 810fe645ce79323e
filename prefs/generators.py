"""Candidate generators: K answers per prompt.

- :class:`OpenAIGenerator`: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, ``python -m serving``).
  One call asks for ``n=K`` answers; an endpoint that returns fewer (Ollama ignores ``n``) is topped
  up with single calls, and one that rejects ``n`` is asked K times from then on.
- :class:`LocalGenerator`: samples from a checkpoint directly (on-policy pairs), several prompts x K
  samples per batch with one KV cache: ``model.load``, ``tokenizer.chat`` and the one decoding loop
  (``model.generation.generate_requests``), exactly what the server runs.

``generate(prompts)`` returns, per prompt, a :class:`Candidates` or a :class:`PromptFailed`.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

from .client import ChatCaller, PromptFailed


@dataclass
class Prompt:
    id: str
    messages: list[dict]
    reference: str | None = None
    task: str | None = None


@dataclass
class Candidates:
    texts: list[str]
    usage: dict = field(default_factory=dict)


class OpenAIGenerator:
    batch_size = 1

    def __init__(self, caller: ChatCaller, model: str, k: int, temperature: float, top_p: float,
                 max_tokens: int, use_n: str = "auto", seed: int | None = None):
        self.caller, self.model, self.k = caller, model, k
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.use_n = use_n != "false"
        self.force_n = use_n == "true"
        self.seed = seed
        self._lock = threading.Lock()
        self.name = model

    def _call(self, messages, n: int):
        kw = dict(model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        if self.top_p < 1.0:
            kw["top_p"] = self.top_p
        if n > 1:
            kw["n"] = n
        resp = self.caller.create(**kw)
        u = resp.usage
        usage = {"prompt_tokens": getattr(u, "prompt_tokens", 0) or 0,
                 "completion_tokens": getattr(u, "completion_tokens", 0) or 0} if u is not None else {}
        texts = [c.message.content for c in resp.choices if c.message is not None]
        return [t for t in texts if isinstance(t, str)], usage

    def _one(self, p: Prompt) -> Candidates:
        texts: list[str] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0}

        def add(u):
            for k in usage:
                usage[k] += u.get(k, 0)

        n_rejected = False
        if self.use_n:
            try:
                got, u = self._call(p.messages, self.k)
                texts += got[: self.k]
                add(u)
            except PromptFailed as e:
                if self.force_n or not e.reason.startswith("http_4"):
                    raise
                n_rejected = True
        calls = 0
        while len(texts) < self.k and calls < 2 * self.k:
            got, u = self._call(p.messages, 1)
            texts += got[:1]
            add(u)
            calls += 1
        if n_rejected and texts:
            with self._lock:  # the endpoint rejects n but answers without it: one answer per call from now on
                self.use_n = False
        return Candidates(texts, usage)

    def generate(self, prompts: list[Prompt]) -> list[Candidates | PromptFailed]:
        out = []
        for p in prompts:
            try:
                out.append(self._one(p))
            except PromptFailed as e:
                out.append(e)
        return out


class LocalGenerator:
    """K samples per prompt from a checkpoint; ``batch_size`` prompts per forward batch.

    One batch is one request of ``n=K`` samples per prompt with a seed fixed by ``seed`` and the
    batch's prompt ids (:meth:`batch_seed`): the server answers the same request (same prompt ids,
    ``n``, ``seed``, sampling settings) with the same tokens."""

    def __init__(self, model_dir: str, k: int, temperature: float, top_p: float, max_tokens: int,
                 batch_size: int = 16, tokenizer: str | None = None, device: str = "cpu", seed: int = 42,
                 model=None):
        from pathlib import Path

        from model.generation import context_length

        if model is None:
            from model import load

            self.model, self.tokenizer = load(model_dir, device=device, tokenizer=tokenizer)
        else:  # (model, tokenizer) already loaded
            self.model, self.tokenizer = model
        self.max_context = context_length(self.model, self.tokenizer)
        self.k, self.temperature, self.top_p, self.max_tokens = k, temperature, top_p, max_tokens
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.name = f"local:{Path(model_dir).resolve().name if model_dir else 'model'}"

    def batch_seed(self, prompt_ids: list[str]) -> int:
        """The seed of a batch: fixed by the run's seed and the batch's prompt ids."""
        h = hashlib.sha256(f"{self.seed}:{','.join(prompt_ids)}".encode()).digest()
        return int.from_bytes(h[:8], "little") % (2**63)

    def generate(self, prompts: list[Prompt]) -> list[Candidates | PromptFailed]:
        from model.generation import Request, generate_requests
        from tokenizer.chat import encode_chat

        out: list[Candidates | PromptFailed | None] = [None] * len(prompts)
        ids, idx = [], []
        for i, p in enumerate(prompts):
            try:
                toks = encode_chat(self.tokenizer, p.messages)
            except Exception as e:  # a template error is this prompt's problem only
                out[i] = PromptFailed("bad_prompt", f"{type(e).__name__}: {e}")
                continue
            if len(toks) >= self.max_context:
                out[i] = PromptFailed("prompt_too_long", f"{len(toks)} tokens >= context {self.max_context}")
                continue
            ids.append(toks)
            idx.append(i)
        if ids:
            req = Request(ids, n=self.k, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                          seed=self.batch_seed([prompts[i].id for i in idx]))
            comps = generate_requests(self.model, self.tokenizer, [req], max_context=self.max_context)[0]
            for i, toks, cs in zip(idx, ids, comps):
                ct = sum(c.completion_tokens for c in cs)
                out[i] = Candidates([c.text for c in cs], {"prompt_tokens": len(toks) * self.k,
                                                           "completion_tokens": ct})
        return out  # type: ignore[return-value]
