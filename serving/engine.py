"""Request bookkeeping for the server on top of the one decoding loop (``model.generation``).

:class:`Engine` holds one causal LM and its tokenizer: chat prompts (``tokenizer.chat``), the context
window, and batches of requests (:class:`Job` = ``model.generation.Request``: ``n`` samples of each
prompt with their own settings, stop strings, random stream, text callback and cancel event) run
by :func:`model.generation.generate_requests` under a lock. Serving has no decode loop of its own.
Loading is ``model.load`` (a checkpoint, a trainer run, a pipeline run or an exported native dir).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from model.generation import (
    Completion,
    Request,
    context_length,
    end_token_ids,
    generate_requests,
    make_generator,
)
from model.loading import load_tokenizer_for, resolve_model_dir

VALID_ROLES = ("system", "developer", "user", "assistant")
Job = Request  # one request of the server

__all__ = ["VALID_ROLES", "Completion", "Engine", "Job", "context_length", "load_tokenizer_for", "resolve_model_dir"]


class Engine:
    """One model + tokenizer: chat formatting, validation helpers and batched sampling (thread-safe)."""

    def __init__(self, model, tokenizer, model_name: str = "mateconv", max_context: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = int(max_context or context_length(model, tokenizer))
        self.eos_token_ids = end_token_ids(model, tokenizer)
        if not self.eos_token_ids:
            raise ValueError("the tokenizer has no end-of-sequence token")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self._lock = threading.Lock()
        self._max_chars_per_token: int | None = None

    @classmethod
    def from_dir(cls, model_dir, tokenizer_path=None, model_name: str | None = None, device: str = "cpu",
                 dtype=None, max_context: int | None = None) -> Engine:
        from model import load

        name = model_name or Path(model_dir).resolve().name
        model, tok = load(model_dir, device=device, dtype=dtype, tokenizer=tokenizer_path)
        return cls(model, tok, name, max_context)

    # -- prompts -----------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of the chat prompt (ending where the assistant answer starts); content is plain text."""
        from tokenizer.chat import encode_chat

        msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in messages]
        return encode_chat(self.tokenizer, msgs)

    def min_prompt_tokens(self, messages: Sequence[dict]) -> int:
        """A lower bound of the prompt's token count without tokenizing it (characters / longest token)."""
        if self._max_chars_per_token is None:
            vocab = self.tokenizer.get_vocab()
            self._max_chars_per_token = max([len(t) for t in vocab] or [1])
        chars = sum(len(m["content"]) for m in messages)
        return chars // max(1, self._max_chars_per_token)

    # -- sampling ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_tokens: int | Sequence[int] = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        on_delta: Callable[[int, str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Completion]]:
        """Sample ``n`` answers for each token-id prompt in one batch.

        Row ``r = prompt_index * n + j``; ``on_delta(r, text)`` receives text as it becomes final.
        ``max_tokens`` is per prompt (int or list) and is clipped to the context window.
        Returns ``completions[prompt_index][j]``.
        """
        job = Job(prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                  seed=seed, on_delta=on_delta, cancel=cancel)
        res = self.generate_jobs([job])[0]
        if isinstance(res, Exception):
            raise res
        return res

    def generate_jobs(self, jobs: Sequence[Job]) -> list[list[list[Completion]] | Exception]:
        """Run several requests as one batch (one forward per step for all their rows).

        Each job keeps its own settings, stop strings, callbacks and random stream: a seeded job draws
        the same random numbers alone or batched with others (same answers up to the logits' rounding).
        Returns ``completions[prompt_index][j]`` per job, or the ``ValueError`` of a job that cannot
        run (e.g. a seed out of range): that job fails alone, the others run.
        """
        results: list = [None] * len(jobs)
        good = []
        for k, job in enumerate(jobs):
            try:
                make_generator(job.seed)  # the seed must be one torch accepts
                if any(len(p) == 0 for p in job.prompts):
                    raise ValueError("a prompt has no tokens")
                good.append(k)
            except ValueError as e:
                results[k] = e
        if good:
            with self._lock:
                out = generate_requests(self.model, self.tokenizer, [jobs[k] for k in good],
                                        eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                        max_context=self.max_context)
            for k, r in zip(good, out):
                results[k] = r
        return results
