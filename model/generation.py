"""The one decoding loop: batched, left-padded, KV-cached, with per-row sampling settings and random
streams, stop strings, per-row finish, a token callback and cancellation.

Every generating component goes through :func:`iter_decode`: the server (``serving.engine`` keeps
only request bookkeeping on top of :func:`generate_requests`), the evaluator's greedy answers
(``evaluation.generate_eval``), the local preference generator (``prefs.generators``), ``chat.py``
and the thin tensor wrappers below::

    from model.generation import generate, stream_generate, stream_text, decode, generate_requests
    ids = generate(model, input_ids, attention_mask, max_new_tokens=64, temperature=0.7, top_p=0.9)
    outs, reasons = decode(model, [prompt_ids, ...], 64, sampling=[Sampling(0.8, 0.9, gen), ...])

* Prompts are token-id lists, left padded into one batch; positions count real tokens, so a padded
  prompt decodes like the same prompt alone. ``max_new_tokens`` counts new tokens only (per row).
* MateConv models decode with a preallocated cache (:class:`StaticKVCache`) and a lean per-step
  path through the layers; any other Hugging Face causal LM (an exported native checkpoint) with
  its own cache through the standard call convention. ``use_cache=False`` recomputes the whole
  sequence at every step (the reference the cache must match).
* Sampling per row (:class:`Sampling`): greedy at temperature ~0, else temperature + top-p with the
  row's ``torch.Generator``. Rows that share a generator (the ``n`` answers of one request) draw from
  it together, for their unfinished rows in row order, every step: a seeded request draws the same
  random numbers whatever else shares the batch.
* A row finishes on an end token (``"stop"``, the end token is not part of its ids), when the token
  callback asks (``"stop"``, e.g. a stop string), at its ``max_new_tokens`` (``"length"``) or when its
  cancel event is set (``"cancelled"``). Finished rows are dropped from the batch (the cache is
  compacted) once enough of them are done.
* Text: :class:`TextStream` decodes a row incrementally, finds stop strings and emits only text that
  is final (no incomplete UTF-8, i.e. no U+FFFD, and no possible stop-string prefix).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .modeling_mateconv import MateConvForCausalLM, build_attention_mask, rope_cos_sin

GREEDY_BELOW = 1e-5  # temperatures at or below this decode greedily
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class StaticKVCache:
    """Preallocated KV cache with the transformers ``Cache`` calls the model uses (``update``, ``get_seq_length``)."""

    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        hd = config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_layers = config.num_hidden_layers
        self.max_len = max_len
        self.pos = 0  # tokens already stored (all layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"StaticKVCache is full ({self.max_len} positions)")
        self.k[layer_idx, :, :, self.pos : end] = k
        self.v[layer_idx, :, :, self.pos : end] = v
        if layer_idx == self.n_layers - 1:
            self.pos = end
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows ``keep`` (finished rows leave the batch)."""
        self.k = self.k[:, keep].contiguous()
        self.v = self.v[:, keep].contiguous()


def sample_next(
    logits: torch.Tensor,
    seen: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token [B] from logits [B, V] (fp32). ``seen`` [B, V] bool marks tokens for the repetition penalty."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:  # CTRL / transformers convention
        pen = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    # inverse-CDF draw: one uniform number per row (cheaper on CPU than torch.multinomial); masked tokens
    # have probability 0, so the search never lands on them
    cum = logits.softmax(-1).cumsum(-1)
    u = (1.0 - torch.rand((cum.shape[0], 1), generator=generator, device=cum.device)) * cum[:, -1:]
    return torch.searchsorted(cum, u).squeeze(-1).clamp_(max=cum.shape[-1] - 1)


# ----------------------------------------------------------------------------------------- settings


@dataclass
class Sampling:
    """How one row picks its tokens; rows sharing ``generator`` draw from it together (in row order)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` (random when None); ValueError for a seed torch refuses."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX):
        raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
    return gen


def end_token_ids(model, tokenizer=None) -> list[int]:
    """The end token ids: the tokenizer's eos and the model's generation config eos (sorted, unique)."""
    eos: list[int] = []
    cands = (getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None,
             getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    for e in cands:
        if isinstance(e, int):
            eos.append(e)
        elif isinstance(e, (list, tuple)):
            eos.extend(int(x) for x in e)
    if not eos and tokenizer is None:
        e = getattr(model.config, "eos_token_id", None)
        eos = [e] if isinstance(e, int) else list(e or [])
    return sorted(set(eos))


def pad_id_for(model, tokenizer=None, eos_ids: Sequence[int] = ()) -> int:
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None) if tokenizer is None else None
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return int(pad)


def context_length(model, tokenizer=None) -> int:
    """The model's context window in tokens (config, else the tokenizer's limit, else 512)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**7:
        return v
    return 512


def _resolve_ids(model, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    """End ids (default: the model config's eos) and the pad id (default: config pad, else the first end id)."""
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


# ----------------------------------------------------------------------------------------- steppers


class _StaticStepper:
    """MateConv: preallocated cache, RoPE table computed once, prebuilt masks (no generic mask logic)."""

    def __init__(self, model, input_ids, mask, max_new: int):
        self.core, self.head = model.model, model.lm_head
        device = input_ids.device
        B, P = input_ids.shape
        self.padded = not bool(mask.all())
        dtype = next(model.parameters()).dtype
        self.cache = StaticKVCache(model.config, B, P + max_new, dtype=dtype, device=device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        h, _ = self.core(input_ids, mask if self.padded else None, pos, self.cache)
        self.logits = self.head(h[:, -1])
        self.next_pos = pos[:, -1:] + 1
        self.mask = mask
        self.rope = rope_cos_sin(torch.arange(P + max_new, device=device), self.core.config.head_dim,
                                 self.core.config.rope_theta)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        am = build_attention_mask(self.mask, 1, self.cache.pos) if self.padded else None
        x = self.core.embed_tokens(tok[:, None])
        cos, sin = self.rope[0][self.next_pos][:, :, None], self.rope[1][self.next_pos][:, :, None]
        for layer in self.core.layers:
            x, _ = layer(x, cos, sin, am, self.cache, None, with_aux=False)
        self.next_pos = self.next_pos + 1
        return self.head(self.core.norm(x)[:, -1])

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
        self.padded = not bool(self.mask.all())


class _HFStepper:
    """Any Hugging Face causal LM: ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values``."""

    def __init__(self, model, input_ids, mask, max_new: int):
        import inspect

        self.model = model
        # transformers 5.x names the cache argument ``cache`` (``past_key_values`` is deprecated)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.past = self._cache_of(out)
        self.logits = out.logits[:, -1, :]
        self.mask, self.next_pos = mask, pos[:, -1:] + 1

    @staticmethod
    def _cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(input_ids=tok[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                         use_cache=True, **{self.cache_arg: self.past})
        self.past = self._cache_of(out)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :]

    def can_select(self) -> bool:
        return hasattr(self.past, "batch_select_indices")

    def select(self, keep: torch.Tensor) -> None:
        self.past.batch_select_indices(keep)
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]


class _UncachedStepper:
    """Recompute the whole sequence at every step (the reference for the cached paths)."""

    def __init__(self, model, input_ids, mask, max_new: int):
        self.model, self.seq, self.mask = model, input_ids, mask
        self.logits = self._run()

    def _run(self) -> torch.Tensor:
        padded = not bool(self.mask.all())
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0) if padded else None
        out = self.model(input_ids=self.seq, attention_mask=self.mask if padded else None, position_ids=pos,
                         use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, :]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self.seq = torch.cat([self.seq, tok[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self._run()

    def select(self, keep: torch.Tensor) -> None:
        self.seq, self.mask = self.seq[keep], self.mask[keep]


# ----------------------------------------------------------------------------------------- the loop


class DecodeState:
    """Per-row results of :func:`iter_decode`: new ids (end token excluded), finish reasons, done flags.

    A consumer of :func:`iter_decode` may call :meth:`finish` between steps (e.g. a stop string)."""

    def __init__(self, n_rows: int):
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.reasons: list[str] = ["length"] * n_rows
        self.done: list[bool] = [False] * n_rows

    def finish(self, row: int, reason: str = "stop") -> None:
        self.done[row], self.reasons[row] = True, reason


def _as_rows(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} rows")
        return list(value)
    return [value] * n


@torch.inference_mode()
def iter_decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    sampling: Sampling | Sequence[Sampling] | None = None,
    *,
    eos_token_ids: Sequence[int] | int | None = None,
    pad_token_id: int | None = None,
    cancel: threading.Event | Sequence[threading.Event | None] | None = None,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    use_cache: bool = True,
    state: DecodeState | None = None,
) -> Iterator[list[tuple[int, int]]]:
    """Decode ``prompts`` (token-id lists) together; yield each step's ``[(row, token), ...]``.

    The yielded tokens include a row's end token (the row is then finished). Results accumulate in
    ``state`` (pass one to read them; :meth:`DecodeState.finish` stops a row before the next step).
    ``sampling``: one :class:`Sampling` for all rows or one per row (default greedy). ``cancel``: one
    event for all rows or one per row. ``eos_token_ids`` default: the model config's eos.
    """
    b = len(prompts)
    state = state if state is not None else DecodeState(b)
    if b == 0:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    max_new = [max(0, int(m)) for m in _as_rows(max_new_tokens, b, "max_new_tokens")]
    sampling = _as_rows(sampling if sampling is not None else Sampling(), b, "sampling")
    cancels = _as_rows(cancel, b, "cancel")
    eos_ids, pad = _resolve_ids(model, eos_token_ids, pad_token_id)
    eos = set(eos_ids)
    for i in range(b):
        if max_new[i] == 0:
            state.finish(i, "length")
    if all(state.done):
        return
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    seen = None
    V = model.config.vocab_size
    if repetition_penalty != 1.0:
        seen = torch.zeros(b, V, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.clamp(0, V - 1), mask.bool())
    was_training = model.training
    model.eval()
    try:
        n_steps = max(max_new)
        if not use_cache:
            stepper = _UncachedStepper(model, input_ids, mask, n_steps)
        elif isinstance(model, MateConvForCausalLM):
            stepper = _StaticStepper(model, input_ids, mask, n_steps)
        else:
            stepper = _HFStepper(model, input_ids, mask, n_steps)
        can_select = getattr(stepper, "can_select", lambda: True)()
        logits = stepper.logits
        active = list(range(b))  # batch position -> row
        any_cancel = any(ev is not None for ev in cancels)
        one_setting = all(s is sampling[0] for s in sampling)  # e.g. one request, or the tensor API
        for _ in range(n_steps):
            if any_cancel:
                for i in active:
                    ev = cancels[i]
                    if ev is not None and not state.done[i] and ev.is_set():
                        state.finish(i, "cancelled")
            if all(state.done[i] for i in active):
                return
            if one_setting:  # rows sharing one Sampling draw together: no grouping needed
                groups = {0: [pos for pos, i in enumerate(active) if not state.done[i]]}
            else:
                groups = {}
                for pos, i in enumerate(active):
                    if not state.done[i]:
                        s = sampling[i]
                        key = ("greedy",) if s.greedy else (s.temperature, s.top_p, id(s.generator))
                        groups.setdefault(key, []).append(pos)
            tok_list = [pad] * len(active)
            for positions in groups.values():
                s = sampling[active[positions[0]]]
                whole = len(positions) == len(active)
                rows_logits = logits if whole else logits[positions]
                rows_seen = None if seen is None else (seen if whole else seen[positions])
                picked = sample_next(rows_logits, rows_seen, s.temperature, top_k, s.top_p, repetition_penalty,
                                     not s.greedy, s.generator)
                for pos, t in zip(positions, picked.tolist()):
                    tok_list[pos] = t
            events, stepped = [], []
            for pos, i in enumerate(active):
                if state.done[i]:
                    continue
                t = tok_list[pos]
                events.append((i, t))
                stepped.append(pos)
                if t in eos:
                    state.finish(i, "stop")
                    continue
                state.ids[i].append(t)
                if len(state.ids[i]) >= max_new[i]:
                    state.finish(i, "length")
            if seen is not None and stepped:
                seen[stepped, [min(tok_list[p], V - 1) for p in stepped]] = True
            yield events
            if all(state.done[i] for i in active):
                return
            n_done = sum(state.done[i] for i in active)
            if can_select and n_done and n_done * 8 >= len(active):  # drop finished rows (copies the cache once)
                keep = [pos for pos, i in enumerate(active) if not state.done[i]]
                keep_t = torch.tensor(keep, device=device)
                stepper.select(keep_t)
                if seen is not None:
                    seen = seen[keep_t]
                tok_list = [tok_list[pos] for pos in keep]
                active = [active[pos] for pos in keep]
            tok = torch.tensor([pad if state.done[i] else t for i, t in zip(active, tok_list)], device=device)
            logits = stepper.step(tok)
    finally:
        model.train(was_training)


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    sampling: Sampling | Sequence[Sampling] | None = None,
    *,
    on_token: Callable[[int, int], bool] | None = None,
    **kwargs,
) -> tuple[list[list[int]], list[str]]:
    """Run :func:`iter_decode` to the end -> ``(new ids per row (end token excluded), finish reasons)``.

    ``on_token(row, token_id)`` is called for each new non-end token; returning True finishes the row
    (reason ``"stop"``). Other keyword arguments as :func:`iter_decode`.
    """
    eos_set = set(_resolve_ids(model, kwargs.get("eos_token_ids"), None)[0])
    state = DecodeState(len(prompts))
    for events in iter_decode(model, prompts, max_new_tokens, sampling, state=state, **kwargs):
        if on_token is None:
            continue
        for row, t in events:
            if t not in eos_set and on_token(row, t):
                state.finish(row, "stop")
    return state.ids, state.reasons


# ----------------------------------------------------------------------------------------- text


class TextStream:
    """Decodes one row's tokens incrementally; finds stop strings; yields safe-to-emit deltas.

    Text is emitted only when final: never an incomplete UTF-8 sequence (U+FFFD) and never a prefix
    of a stop string that the next tokens could complete. Decoding is windowed (the two-offset scheme
    of text-generation-inference): each token decodes only the few ids since the last complete
    character plus some context, so a long answer costs O(length), and tokenizers that drop a leading
    space at the start of a decode still get their spaces right."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # final text so far (complete characters)
        self.emitted = 0
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the context of the pending window
        self._read = 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _advance(self) -> None:
        prefix = self._decode(self.ids[self._prefix:self._read])
        new = self._decode(self.ids[self._prefix:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (delta to emit now, stop string hit)."""
        self.ids.append(token_id)
        if self.stopped:
            return "", True
        self._advance()
        text = self.text
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[:min(hits)]
                self.stopped = True
                delta = self.text[self.emitted:]
                self.emitted = len(self.text)
                return delta, True
        safe = len(text)
        for s in self.stop:  # hold back a possible stop-string prefix
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def set_ids(self, ids: Sequence[int]) -> None:
        """All ids at once (no incremental decoding needed)."""
        self.ids = list(ids)
        self.text = self._decode(self.ids)
        self._prefix = self._read = len(self.ids)

    def finish(self) -> str:
        """Whatever is left to emit at the end of the row (an unfinished UTF-8 tail is dropped)."""
        if not self.stopped:
            prefix = self._decode(self.ids[self._prefix:self._read])
            new = self._decode(self.ids[self._prefix:])
            self.text = (self.text + new[len(prefix):]).rstrip("\ufffd")
            self._prefix = self._read = len(self.ids)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


@dataclass
class Completion:
    text: str
    finish_reason: str
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Request:
    """``n`` samples of each prompt with one set of settings, stop strings and one random stream.

    ``on_delta(row, text)`` (row = prompt_index * n + j) gets text as it becomes final; setting
    ``cancel`` stops the request's rows at the next step. ``seed`` None: a random stream."""

    prompts: Sequence[Sequence[int]]
    n: int = 1
    max_tokens: int | Sequence[int] = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    on_delta: Callable[[int, str], None] | None = None
    cancel: threading.Event | None = None


def generate_requests(model, tokenizer, requests: Sequence[Request], *, eos_token_ids: Sequence[int] | None = None,
                      pad_token_id: int | None = None, max_context: int | None = None
                      ) -> list[list[list[Completion]]]:
    """Decode several requests as one batch (one forward per step for all their rows).

    Each request keeps its own settings, stop strings, callbacks and random stream (seeded requests
    draw the same numbers alone or batched; answers are equal up to the logits' rounding). Each
    row's ``max_tokens`` is clipped to ``max_context`` minus its prompt. Returns
    ``completions[prompt_index][j]`` per request. A seed torch refuses raises ValueError before any work.
    """
    device = next(model.parameters()).device
    eos = list(eos_token_ids) if eos_token_ids is not None else end_token_ids(model, tokenizer)
    pad = pad_token_id if pad_token_id is not None else pad_id_for(model, tokenizer, eos)
    ctx = int(max_context or context_length(model, tokenizer))
    rows, row_max, sampling, cancels, texts, owner, incremental = [], [], [], [], [], [], []
    for k, req in enumerate(requests):
        limits = _as_rows(req.max_tokens, len(req.prompts), "max_tokens")
        gen = None if req.temperature <= GREEDY_BELOW else make_generator(req.seed, device)
        s = Sampling(float(req.temperature), float(req.top_p), gen)
        first = len(rows)
        for p, m in zip(req.prompts, limits):
            for _ in range(req.n):
                owner.append((k, len(rows) - first))
                rows.append(list(p))
                row_max.append(max(0, min(int(m), ctx - len(p))))
                sampling.append(s)
                cancels.append(req.cancel)
                texts.append(TextStream(tokenizer, req.stop))
        incremental.append(req.on_delta is not None or any(req.stop))  # decode as we go, else once at the end
    broken: set[int] = set()  # requests whose callback raised: their rows stop, the batch goes on

    def on_token(r: int, t: int) -> bool:
        k, local = owner[r]
        if k in broken:
            return True
        if not incremental[k]:
            return False
        delta, hit = texts[r].add(t)
        if delta and requests[k].on_delta is not None:
            try:
                requests[k].on_delta(local, delta)
            except Exception:
                broken.add(k)
                return True
        return hit

    results: list[list[list[Completion]]] = [[] for _ in requests]
    if not rows:
        return results
    ids, reasons = decode(model, rows, row_max, sampling, on_token=on_token, eos_token_ids=eos,
                          pad_token_id=pad, cancel=cancels)
    for r, (row_ids, reason) in enumerate(zip(ids, reasons)):
        k, local = owner[r]
        req = requests[k]
        if not incremental[k]:
            texts[r].set_ids(row_ids)
        delta = texts[r].finish()
        if delta and req.on_delta is not None and k not in broken:
            req.on_delta(local, delta)
        if local % req.n == 0:
            results[k].append([])
        results[k][-1].append(Completion(texts[r].text, reason, len(row_ids), list(row_ids)))
    return results


# ----------------------------------------------------------------------------------------- tensor API


def stream_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence ([B] long tensor) until all ended or ``max_new_tokens``.

    ``input_ids`` [B, P] left padded (``attention_mask`` marks real tokens). Sequences that already
    produced the end token yield ``pad_token_id``. ``do_sample`` defaults to ``temperature > 0``;
    greedy decoding when False. One ``generator`` for all rows (drawn for unfinished rows in row order).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, P = input_ids.shape
    eos_ids, pad = _resolve_ids(model, eos_token_id, pad_token_id)
    do_sample = (temperature > 0) if do_sample is None else do_sample
    if attention_mask is None:
        prompts = input_ids.tolist()
    else:
        keep = attention_mask.bool()
        prompts = [row[k].tolist() for row, k in zip(input_ids, keep)]
    s = Sampling(temperature if do_sample and temperature > 0 else 0.0, top_p, generator)
    device = input_ids.device
    for events in iter_decode(model, prompts, max_new_tokens, s, eos_token_ids=eos_ids, pad_token_id=pad,
                              top_k=top_k, repetition_penalty=repetition_penalty, use_cache=use_cache):
        out = [pad] * B
        for row, t in events:
            out[row] = t
        yield torch.tensor(out, dtype=torch.long, device=device)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Prompt + new tokens, [B, P + n_new] (sequences that ended early are padded with ``pad_token_id``).

    Keyword arguments as ``stream_generate``.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = list(stream_generate(model, input_ids, attention_mask, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def stream_text(model, tokenizer, prompt: str | Sequence[int], *, max_new_tokens: int = 128, temperature: float = 1.0,
                top_p: float = 1.0, do_sample: bool | None = None, seed: int | None = None,
                generator: torch.Generator | None = None, stop: Sequence[str] = (),
                eos_token_id: int | list[int] | None = None, cancel: threading.Event | None = None,
                state: DecodeState | None = None, **kwargs) -> Iterator[str]:
    """Stream the decoded text of one prompt (a string, or token ids such as ``tokenizer.chat.encode_chat``'s),
    piece by piece, through :class:`TextStream` (complete characters only; stops at a stop string).

    Sampling: ``temperature`` (``do_sample=False``: greedy), ``top_p``, and ``generator`` or ``seed``.
    ``state`` (a :class:`DecodeState`) receives the ids and the finish reason."""
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    else:
        ids = list(prompt)
    eos = eos_token_id if eos_token_id is not None else end_token_ids(model, tokenizer)
    eos_set = {eos} if isinstance(eos, int) else set(eos or [])
    do_sample = (temperature > 0) if do_sample is None else do_sample
    temp = temperature if do_sample else 0.0
    device = next(model.parameters()).device
    if generator is None and temp > GREEDY_BELOW:
        generator = make_generator(seed, device)
    state = state if state is not None else DecodeState(1)
    text = TextStream(tokenizer, stop)
    pad = kwargs.pop("pad_token_id", None)
    pad = pad if pad is not None else pad_id_for(model, tokenizer, sorted(eos_set))
    for events in iter_decode(model, [ids], max_new_tokens, Sampling(temp, top_p, generator), eos_token_ids=eos,
                              pad_token_id=pad, cancel=cancel, state=state, **kwargs):
        for _, t in events:
            if t in eos_set:
                continue
            delta, hit = text.add(t)
            if delta:
                yield delta
            if hit:
                state.finish(0, "stop")
    rest = text.finish()
    if rest:
        yield rest
