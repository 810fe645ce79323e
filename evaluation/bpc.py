"""Bits per character on held-out text: a tokenizer-independent loss, and the fixed validation sample.

Usage (the trainer, once at setup, then at every evaluation)::

    from evaluation.bpc import HeldoutBPC
    bpc = HeldoutBPC(tokenizer, "data/embedded/pretrain_validation.jsonl", n=200, seed=0, max_seq_len=512)
    log(bpc.describe())                                   # "held-out bpc sample: 200 of 4599 texts ..."
    out = bpc.evaluate(model, device, autocast=trainer.autocast, rank=r, world_size=w,
                       all_reduce=dist_utils.all_reduce_sum)
    # out = {"bpc", "loss", "n_texts", "n_chars", "n_tokens"}  -> log as val/bpc (beside val/loss)

Definition (exact). For each text of the sample, the *scored tokens* are predicted one by one by the model
with :func:`model.losses.sequence_nll` (nats, fp32); then, over the sample,

    bpc = (sum of the NLL of all scored tokens) / (sum of the characters they cover) / ln 2
    loss = (the same NLL sum) / (number of scored tokens)            # nats per token of our tokenizer

* Pretraining text (``{"text": ...}`` JSONL, e.g. ``pretrain_validation.jsonl``): the sequence is
  ``bos + tokens(text) + eos``; ``bos`` is context only; every token of the text **and the closing eos**
  are scored (the eos carries the "text ends here" information; it covers no character). Characters =
  ``len(decode(tokens(text)))``, equal to ``len(text)`` for our lossless byte-level tokenizer. A text longer
  than the window is scored in consecutive windows of ``max_seq_len`` predictions over that sequence
  (window ``k`` has inputs ``seq[k*L : (k+1)*L]`` and targets ``seq[k*L+1 : (k+1)*L+1]``): every token is
  scored exactly once, a window's first prediction sees only the previous window's last token as context
  (no overlap), so long texts are not truncated and the character count is exact.
* SFT answers (``{"conversations": [...]}`` JSONL, e.g. ``sft_validation.jsonl``): the conversation is
  encoded by :func:`tokenizer.chat.encode_conversation` (the one chat encoder, the ``SFTDataset`` contract); the scored tokens are the
  assistant answers' tokens and each answer's end token; the prompt is context only. Characters =
  ``len()`` of the answer text(s). A conversation longer than ``max_seq_len + 1`` tokens is cut to one
  window of ``max_seq_len + 1`` tokens placed so that the **first answer and its end token are inside**
  (the window ends at that end token; the start of the prompt is dropped, so the answer keeps as much of
  its prompt as fits); when the answer alone is longer than the window, the window starts one token
  before the answer. Only targets inside the window are scored; an answer cut by the window counts the
  characters of its scored tokens only, ``len(decode(kept answer tokens))``, after dropping trailing
  tokens that end inside a multi-byte character (so that NLL and characters cover the same span). So no
  held-out conversation is left out for its length (``n_skipped`` counts those without any answer).

Validation sample (:func:`spread_sample`): ``n`` items chosen once, with a fixed seed, spread over the
whole held-out file: the records are ordered by *stratum* (SFT: the collection, from the ``id`` prefix
``tang-00041-…`` -> ``tang``, then the task; pretraining text, which has no such field: its position in
the file, which is ordered by collection), cut into ``n`` equal consecutive blocks and one record is drawn
at random from each block (systematic stratified sampling: every collection is represented in proportion
to its size, and the estimate stays unbiased). The same sample is used at every evaluation; its size and
collections are in :meth:`HeldoutBPC.describe` / :attr:`HeldoutBPC.sample_info`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from dataset.collate import pad_collate
from model.losses import IGNORE_INDEX, sequence_nll
from tokenizer.chat import encode_conversation

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------ sampling


def collection_of(rec: dict) -> str | None:
    """The source collection of an embedded record: the ``id`` prefix (``tang-00041-author`` -> ``tang``,
    ``pref-tang-…`` -> ``tang``); ``None`` when the record has no id (pretraining text)."""
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid:
        return None
    parts = rid.split("-")
    if parts[0] == "pref" and len(parts) > 1:
        return parts[1]
    return parts[0]


def stratum_of(rec: dict) -> tuple:
    """Sampling stratum: ``(collection, task)`` ("" where absent)."""
    return (collection_of(rec) or "", str(rec.get("task") or ""))


def spread_sample(records: Sequence[dict] | int, n: int | None, seed: int = 0,
                  stratum: Callable[[dict], tuple] | None = stratum_of) -> list[int]:
    """Indices (sorted) of a seeded systematic stratified sample of ``n`` of ``records`` (see module doc).

    ``records`` may be a count (positions only, e.g. the windows of a packed ``.bin``). ``n`` of ``None`` or
    ``>= len`` keeps everything. Deterministic for a given (records, n, seed)."""
    total = records if isinstance(records, int) else len(records)
    if n is None or n >= total:
        return list(range(total))
    if n <= 0:
        raise ValueError(f"sample size must be positive, got {n}")
    order = np.arange(total)
    if not isinstance(records, int) and stratum is not None:
        keys = [stratum(r) for r in records]
        order = np.array(sorted(range(total), key=lambda i: (keys[i], i)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    bounds = (np.arange(n + 1) * total) // n
    picks = [int(order[rng.integers(bounds[b], bounds[b + 1])]) for b in range(n)]
    return sorted(picks)


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file; a bad line raises ``ValueError`` naming file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    return out


# ------------------------------------------------------------------------------------------ items


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _clean_prefix(tokenizer, ids: list[int], text: str) -> tuple[int, int]:
    """Largest ``k <= len(ids)`` whose decoded tokens are a prefix of ``text`` (no cut multi-byte character);
    returns ``(k, len(decoded))``."""
    for k in range(len(ids), -1, -1):
        s = _decode(tokenizer, ids[:k])
        if text.startswith(s) and "\ufffd" not in s[-1:]:
            return k, len(s)
    return 0, 0


def text_windows(tokenizer, text: str, max_seq_len: int, bos: int, eos: int) -> tuple[list[dict], int]:
    """Scored windows of one pretraining text (``bos text eos``, every target once) and its characters."""
    ids = _ids(tokenizer, text)
    n_chars = len(_decode(tokenizer, ids))
    seq = [bos] + ids + [eos]
    out = []
    for start in range(0, len(seq) - 1, max_seq_len):
        w = seq[start:start + max_seq_len + 1]
        out.append({"input_ids": torch.tensor(w[:-1], dtype=torch.long),
                    "targets": torch.tensor(w[1:], dtype=torch.long)})
    return out, n_chars


def answer_item(tokenizer, conversation: list[dict], max_seq_len: int) -> tuple[dict | None, int]:
    """The scored item of one SFT conversation (targets on answers + end tokens inside the window) and the
    characters of the answer text those targets cover (see module doc); ``(None, 0)`` when nothing is left."""
    ids, mask = encode_conversation(tokenizer, conversation, loss_on="all")
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool).copy()
    mask[0] = False
    if len(ids) > max_seq_len + 1 and mask.any():
        a = int(np.flatnonzero(mask)[0])  # the first answer's span [a, b)
        b = a + int(np.argmin(mask[a:])) if not mask[a:].all() else len(mask)
        start = max(0, b - (max_seq_len + 1)) if b - a <= max_seq_len else a - 1
        start = min(start, a - 1)
        ids, mask = ids[start:start + max_seq_len + 1], mask[start:start + max_seq_len + 1]
        mask[0] = False
    answers = [m["content"] for m in conversation if m.get("role") == "assistant"]
    # runs of target tokens = one answer each (its content tokens, then its end token)
    runs, k = [], 0
    while k < len(mask):
        if mask[k]:
            j = k
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((k, j))
            k = j
        else:
            k += 1
    n_chars = 0
    end_ids = set(getattr(tokenizer, "all_special_ids", None) or []) | {tokenizer.eos_token_id}
    for (a, b), answer in zip(runs, answers):
        run = [int(t) for t in ids[a:b]]
        if run[-1] in end_ids:  # the whole answer and its end token are inside the window
            n_chars += len(answer)
        else:  # cut by the window: score the clean prefix of its tokens only
            keep, chars = _clean_prefix(tokenizer, run, answer)
            mask[a + keep:b] = False
            n_chars += chars
    if not mask.any():
        return None, 0
    tgt = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(ids[:-1].astype(np.int64)),
            "targets": torch.from_numpy(tgt.astype(np.int64))}, n_chars


# ------------------------------------------------------------------------------------------ evaluator


class HeldoutBPC:
    """Bits per character (and nats per token) of a model on a fixed sample of held-out texts.

    ``source``: a JSONL path (records with ``"text"`` = pretraining text, or ``"conversations"`` = SFT
    answers; the kind is read from the first record) or a list of such records / plain strings.
    ``n``: sample size (``None`` = all), drawn once by :func:`spread_sample` with ``seed``.
    ``max_seq_len``: the model window (see the module doc for how longer texts are scored).
    :meth:`evaluate` returns ``{"bpc", "loss", "n_texts", "n_chars", "n_tokens"}`` plus per-text lists
    (``text_nll``, ``text_chars``) when ``per_text=True`` (for bootstrap CIs).
    """

    def __init__(self, tokenizer, source, n: int | None = 200, seed: int = 0, max_seq_len: int = 512,
                 batch_size: int = 16):
        if isinstance(source, (str, Path)):
            self.path = str(source)
            records = read_jsonl(source)
        else:
            self.path = None
            records = [{"text": r} if isinstance(r, str) else r for r in source]
        if not records:
            raise ValueError(f"no held-out records in {self.path or 'the given list'}")
        first = records[0]
        if "conversations" in first:
            self.kind = "sft"
        elif "text" in first:
            self.kind = "text"
        else:
            raise ValueError(f"{self.path or 'record 0'}: a held-out record needs a 'text' or a 'conversations' "
                             f"field (got keys {sorted(first)})")
        for i, r in enumerate(records):
            field = "conversations" if self.kind == "sft" else "text"
            if field not in r:
                raise ValueError(f"{self.path or 'records'}:{i + 1}: missing field {field!r} "
                                 f"(the file's first record has it; one kind per file)")
        self.tokenizer, self.max_seq_len, self.batch_size, self.seed = tokenizer, int(max_seq_len), batch_size, seed
        self.n_total = len(records)
        self.indices = spread_sample(records, n, seed)
        sample = [records[i] for i in self.indices]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        # items: (text index within the sample, scored item); chars per sample text
        self.items: list[tuple[int, dict]] = []
        self.chars: list[int] = []
        self.n_skipped = 0
        if self.kind == "text":
            for t, rec in enumerate(sample):
                wins, chars = text_windows(tokenizer, rec["text"], self.max_seq_len, bos, eos)
                self.items += [(t, w) for w in wins]
                self.chars.append(chars)
        else:
            for rec in sample:
                item, chars = answer_item(tokenizer, rec["conversations"], self.max_seq_len)
                if item is None:
                    self.n_skipped += 1
                    continue
                self.items.append((len(self.chars), item))
                self.chars.append(chars)
        self.n_texts = len(self.chars)
        self.n_chars = int(sum(self.chars))
        self.n_tokens = int(sum(int((it["targets"] != IGNORE_INDEX).sum()) for _, it in self.items))
        cols = Counter(collection_of(r) or "(no id)" for r in sample)
        self.sample_info = {"file": self.path, "kind": self.kind, "n_total": self.n_total, "n_sample": len(sample),
                            "n_texts": self.n_texts, "n_skipped": self.n_skipped, "seed": seed,
                            "n_chars": self.n_chars, "n_tokens": self.n_tokens, "max_seq_len": self.max_seq_len,
                            "collections": dict(sorted(cols.items()))}
        self._collate = pad_collate(self.pad_id)

    def describe(self) -> str:
        """One log line: the sample's size, characters, tokens and collections."""
        s = self.sample_info
        cols = ", ".join(f"{k} {v}" for k, v in sorted(s["collections"].items(), key=lambda kv: -kv[1]))
        skipped = f", {s['n_skipped']} skipped" if s["n_skipped"] else ""
        return (f"held-out bpc sample ({s['kind']}): {s['n_texts']} of {s['n_total']} texts "
                f"(seed {s['seed']}{skipped}), "
                f"{s['n_chars']} chars, {s['n_tokens']} scored tokens, from {s['file'] or 'a list'}"
                + (f"; collections: {cols}" if "(no id)" not in s["collections"] else ""))

    def n_forward_passes(self, world_size: int = 1) -> int:
        """Forward passes per rank of one :meth:`evaluate` (the same on every rank)."""
        per_rank = math.ceil(len(self.items) / world_size)
        return math.ceil(per_rank / self.batch_size)

    @torch.no_grad()
    def evaluate(self, model, device=None, autocast=None, rank: int = 0, world_size: int = 1,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, per_text: bool = False) -> dict:
        """Score the sample with ``model`` (put in eval mode for the call, then restored).

        ``device``: where batches go (default: the model's). ``autocast``: a context-manager factory
        (e.g. ``trainer.autocast``) or ``None``. Distributed: each rank scores items ``rank::world_size`` and
        ``all_reduce`` (a sum over ranks of a float64 tensor, e.g. ``trainer.distributed.all_reduce_sum``)
        combines the sums, so every rank returns the same numbers; every rank runs the same number of
        forward passes (``n_forward_passes``)."""
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
        ctx = autocast or nullcontext
        text_nll = torch.zeros(self.n_texts, dtype=torch.float64)
        text_tok = torch.zeros(self.n_texts, dtype=torch.float64)
        mine = self.items[rank::world_size]
        # every rank runs the same number of forward passes (sharded engines such as ZeRO-3 gather
        # parameters in each one): a rank with fewer items repeats its first one and discards the result
        n_batches = self.n_forward_passes(world_size)
        try:
            for b in range(n_batches):
                chunk = mine[b * self.batch_size:(b + 1) * self.batch_size]
                batch = self._collate([it for _, it in (chunk or self.items[:1])])
                ids, tgt, mask = (batch[k].to(device) for k in ("input_ids", "targets", "attention_mask"))
                with ctx():
                    logits = model(input_ids=ids, attention_mask=mask).logits
                s, c = sequence_nll(logits, tgt)
                for (t, _), sv, cv in zip(chunk, s.double().cpu(), c.cpu()):
                    text_nll[t] += sv
                    text_tok[t] += float(cv)
        finally:
            model.train(was_training)
        if all_reduce is not None and world_size > 1:
            both = all_reduce(torch.cat([text_nll, text_tok]).to(device)).double().cpu()
            text_nll, text_tok = both[: self.n_texts], both[self.n_texts:]
        nll, tok = float(text_nll.sum()), float(text_tok.sum())
        out = {"bpc": nll / self.n_chars / LN2 if self.n_chars else float("nan"),
               "loss": nll / tok if tok else float("nan"),
               "n_texts": self.n_texts, "n_chars": self.n_chars, "n_tokens": int(round(tok))}
        if per_text:
            out["text_nll"] = text_nll.tolist()
            out["text_chars"] = list(self.chars)
            out["text_tokens"] = [int(v) for v in text_tok.tolist()]
        return out
