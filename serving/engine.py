"""Text generation for serving and for local preference sampling.

:class:`Engine` holds one causal LM and its tokenizer and turns chat messages into sampled answers:
batched rows (several prompts x ``n`` samples each, left padded, one KV cache), temperature / top-p
sampling with a seeded ``torch.Generator``, stop on the tokenizer's end token(s), on ``max_tokens``
and on stop strings, and per-row text deltas for streaming (incomplete UTF-8 and possible stop-string
prefixes are held back until they are decided).

The token loop itself is :func:`sample_tokens`: it needs only the Hugging Face causal-LM call
convention (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values``, ``use_cache``)
that ``MateConvForCausalLM`` follows; when ``model.generation`` offers a batched sampler it is used.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

VALID_ROLES = ("system", "developer", "user", "assistant")


# ---------------------------------------------------------------------------------------------
# loading


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint directory as given, or a trainer run directory -> its latest complete checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    from trainer.checkpoint import resolve_checkpoint

    found = resolve_checkpoint(path)
    return Path(found) if found is not None else path


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """Load a checkpoint directory (or a trainer run directory): a MateConv checkpoint, or any HF causal LM."""
    path = resolve_model_dir(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if model_type == "mateconv":
        from model import MateConvForCausalLM

        model = MateConvForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device).eval()


def load_tokenizer_for(model_dir: str | Path | None, tokenizer_path: str | Path | None = None):
    """The tokenizer given explicitly, else the one saved in the checkpoint, else the project default."""
    from tokenizer import load_tokenizer

    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    if model_dir is not None:
        d = Path(model_dir)
        if any((d / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
            return load_tokenizer(d)
    return load_tokenizer(None)


def context_length(model, tokenizer=None) -> int:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**7:
        return v
    return 512


# ---------------------------------------------------------------------------------------------
# sampling


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Next token per row: greedy at temperature ~0, else temperature + top-p sampling (the model's sampler)."""
    from model.generation import sample_next

    return sample_next(logits, temperature=temperature, top_p=top_p, do_sample=temperature > 1e-5,
                       generator=generator)


@dataclass
class SamplingGroup:
    """Rows that share sampling settings and one random stream (one request)."""

    rows: Sequence[int]
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    cancel: threading.Event | None = None  # set: the group's unfinished rows stop (reason "cancelled")


@torch.no_grad()
def sample_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    groups: Sequence[SamplingGroup],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    on_token: Callable[[int, int], bool] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Sample continuations for a batch of token-id prompts (left padded, one KV cache).

    ``groups`` split the rows by request (each row in exactly one). Each step a group draws only for
    its unfinished rows, in row order,
    from its own generator, so a seeded request samples the same tokens whatever else shares the
    batch. ``on_token(row, token_id)`` is called for each new non-end token; returning True stops
    that row (finish reason ``"stop"``). Returns the new token ids per row (end token excluded) and
    the finish reasons (``"stop"`` on an end token or a stop request, ``"length"`` at
    ``max_new_tokens``, ``"cancelled"`` when the row's group was cancelled).
    """
    device = next(model.parameters()).device
    b = len(prompts)
    if isinstance(max_new_tokens, int):
        max_new = [max_new_tokens] * b
    else:
        max_new = list(max_new_tokens)
    group_of = [0] * b
    for g, grp in enumerate(groups):
        for i in grp.rows:
            group_of[i] = g
    width = max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            input_ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = set(int(e) for e in eos_token_ids)
    outs: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    done = [m <= 0 for m in max_new]
    if all(done):
        return outs, reasons
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    past = out.past_key_values
    logits = out.logits[:, -1, :]
    next_pos = position_ids[:, -1] + 1
    active = list(range(b))  # batch position -> row; finished rows are dropped from the batch
    can_compact = hasattr(past, "batch_select_indices")
    for _ in range(max(max_new)):
        for grp in groups:
            if grp.cancel is not None and grp.cancel.is_set():
                for i in grp.rows:
                    if not done[i]:
                        done[i], reasons[i] = True, "cancelled"
        if all(done):
            break
        by_group: dict[int, list[int]] = {}
        for pos, i in enumerate(active):
            if not done[i]:
                by_group.setdefault(group_of[i], []).append(pos)
        tok_list = [pad_token_id] * len(active)
        for g, positions in by_group.items():
            grp = groups[g]
            rows_logits = logits if len(positions) == len(active) else logits[positions]
            for pos, t in zip(positions, _pick(rows_logits, grp.temperature, grp.top_p, grp.generator).tolist()):
                tok_list[pos] = t
        for pos, t in enumerate(tok_list):
            i = active[pos]
            if done[i]:
                continue
            if t in eos:
                done[i], reasons[i] = True, "stop"
                continue
            outs[i].append(t)
            if on_token is not None and on_token(i, t):
                done[i], reasons[i] = True, "stop"
            elif len(outs[i]) >= max_new[i]:
                done[i], reasons[i] = True, "length"
        if all(done):
            break
        n_done = sum(done[i] for i in active)
        if can_compact and n_done and n_done * 8 >= len(active):  # drop finished rows (copies the cache once)
            keep = [pos for pos, i in enumerate(active) if not done[i]]
            keep_t = torch.tensor(keep, device=device)
            past.batch_select_indices(keep_t)
            mask, next_pos = mask[keep_t], next_pos[keep_t]
            tok_list = [tok_list[pos] for pos in keep]
            active = [active[pos] for pos in keep]
        tok = torch.tensor([pad_token_id if done[i] else t for i, t in zip(active, tok_list)], device=device)
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return outs, reasons


# ---------------------------------------------------------------------------------------------
# text side: incremental decoding with stop strings


class _RowText:
    """Decodes one row's tokens incrementally; finds stop strings; yields safe-to-emit deltas."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (delta to emit now, stop string hit)."""
        self.ids.append(token_id)
        text = self._decode()
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = text[:cut]
                self.stopped = True
                delta = self.text[self.emitted:]
                self.emitted = len(self.text)
                return delta, True
        self.text = text
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # incomplete UTF-8 sequence
            safe -= 1
        for s in self.stop:  # hold back a possible stop-string prefix
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def finish(self) -> str:
        """Whatever is left to emit at the end of the row."""
        final = self.text if self.stopped else self.text.rstrip("\ufffd")
        delta = final[self.emitted:]
        self.emitted = len(final)
        self.text = final
        return delta


@dataclass
class Completion:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class Job:
    """One request: ``n`` samples of each prompt with its own settings, stop strings and random stream.

    ``on_delta(row, text)`` (row = prompt_index * n + j) gets text as it becomes final; setting
    ``cancel`` stops the job's rows at the next step."""

    prompts: Sequence[Sequence[int]]
    n: int = 1
    max_tokens: int | Sequence[int] = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    on_delta: Callable[[int, str], None] | None = None
    cancel: threading.Event | None = None


class Engine:
    """One model + tokenizer: chat formatting, validation helpers and batched sampling (thread-safe)."""

    def __init__(self, model, tokenizer, model_name: str = "mateconv", max_context: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = int(max_context or context_length(model, tokenizer))
        eos = []
        for e in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(e, int):
                eos.append(e)
            elif isinstance(e, (list, tuple)):
                eos.extend(int(x) for x in e)
        if not eos:
            raise ValueError("the tokenizer has no end-of-sequence token")
        self.eos_token_ids = sorted(set(eos))
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, model_dir, tokenizer_path=None, model_name: str | None = None, device: str = "cpu",
                 dtype=None, max_context: int | None = None) -> Engine:
        name = model_name or Path(model_dir).resolve().name
        model_dir = resolve_model_dir(model_dir)
        model = load_model(model_dir, device=device, dtype=dtype)
        tok = load_tokenizer_for(model_dir, tokenizer_path)
        return cls(model, tok, name, max_context)

    # -- prompts -----------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of the chat prompt (ending where the assistant answer starts)."""
        msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # the original MateConv template
            bos, eos = self.tokenizer.bos_token or "<s>", self.tokenizer.eos_token or "</s>"
            text = "".join(f"{bos}{m['role']}\n{m['content']}{eos}\n" for m in msgs) + f"{bos}assistant\n"
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
        return self.generate_jobs([job])[0]

    def generate_jobs(self, jobs: Sequence[Job]) -> list[list[list[Completion]]]:
        """Run several requests as one batch (one forward per step for all their rows).

        Each job keeps its own settings, stop strings, callbacks and random stream: a seeded job draws
        the same random numbers alone or batched with others (same answers up to the logits' rounding).
        Returns ``completions[prompt_index][j]`` per job.
        """
        rows, row_max, groups, texts, owner, incremental = [], [], [], [], [], []
        device = next(self.model.parameters()).device
        for k, job in enumerate(jobs):
            limits = [job.max_tokens] * len(job.prompts) if isinstance(job.max_tokens, int) else job.max_tokens
            first = len(rows)
            for p, m in zip(job.prompts, limits):
                for _ in range(job.n):
                    owner.append((k, len(rows) - first))
                    rows.append(list(p))
                    row_max.append(max(0, min(int(m), self.max_context - len(p))))
                    texts.append(_RowText(self.tokenizer, job.stop))
            gen = None
            if job.temperature > 1e-5:
                gen = torch.Generator(device=device)
                gen.manual_seed(int(job.seed) if job.seed is not None else int(torch.seed() % (2**63)))
            groups.append(SamplingGroup(range(first, len(rows)), job.temperature, job.top_p, gen, job.cancel))
            incremental.append(job.on_delta is not None or any(job.stop))  # decode as we go, else once at the end
        broken: set[int] = set()  # jobs whose callback raised: their rows stop, the batch goes on

        def on_token(r: int, t: int) -> bool:
            k, local = owner[r]
            if k in broken:
                return True
            if not incremental[k]:
                return False
            delta, hit = texts[r].add(t)
            if delta and jobs[k].on_delta is not None:
                try:
                    jobs[k].on_delta(local, delta)
                except Exception:
                    broken.add(k)
                    return True
            return hit

        if not rows:
            return [[] for _ in jobs]
        with self._lock:
            ids, reasons = sample_tokens(self.model, rows, row_max, groups, eos_token_ids=self.eos_token_ids,
                                         pad_token_id=self.pad_token_id, on_token=on_token)
        results: list[list[list[Completion]]] = [[] for _ in jobs]
        for r, (row_ids, reason) in enumerate(zip(ids, reasons)):
            k, local = owner[r]
            job = jobs[k]
            if not incremental[k]:
                texts[r].ids = list(row_ids)
                texts[r].text = texts[r]._decode()
            delta = texts[r].finish()
            if delta and job.on_delta is not None and k not in broken:
                job.on_delta(local, delta)
            if local % job.n == 0:
                results[k].append([])
            results[k][-1].append(Completion(texts[r].text, reason, len(row_ids)))
        return results
