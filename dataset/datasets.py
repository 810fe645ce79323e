"""Torch datasets for pretraining, SFT and preference training (see docs/ARCHITECTURE.md, "Batches").

Every item is a dict of 1-D ``torch.long`` tensors with *pre-shifted* targets: ``input_ids[t]`` is
the input at position t and ``targets[t]`` the token to predict there (``-100``: no loss).

- :func:`window_starts` / :func:`window_item`: the one definition of a text window (``max_seq_len + 1``
  tokens, stride ``max_seq_len``, pre-shifted), used by :class:`PretrainDataset` (a packed ``.bin``)
  and :class:`TextWindows` / :func:`document_windows` (``{"text"}`` documents, one at a time).
- :class:`PretrainDataset` memory-maps a stage 3 ``.bin`` (resident memory does not grow with the
  file; the map is opened lazily in each process, so DataLoader workers do not copy data) and
  serves windows of ``max_seq_len + 1`` tokens with stride ``max_seq_len``.
- :class:`SFTDataset` renders canonical conversations with the chat template and puts targets only
  on assistant answer tokens and their end token.
- :class:`PreferenceDataset` does the same for the chosen and the rejected answer of each pair.

Masks are exact because the sequence is built piece by piece: prompt text (everything up to and
including the assistant header) is tokenized on its own and each answer (with its end token) on
its own, then concatenated. The prompt side is therefore tokenized exactly as at inference time
(``apply_chat_template(..., add_generation_prompt=True)`` or the original template), and the answer
tokens are exactly those the model has to generate.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from model.losses import IGNORE_INDEX
from tokenizer.chat import ChatEncoder

from .build_bin import batch_encoder
from .chat_store import open_store, repeat_cached
from .errors import DataError, Report, check_on_error, missing_file, no_records
from .prepare import check_conversations, to_canonical_pair

__all__ = ["ChatEncoder", "IGNORE_INDEX", "PretrainDataset", "SFTDataset", "PreferenceDataset", "pad_token_id",
           "read_sidecar", "scan_max_id", "training_dataset", "add_data_args", "or_exit", "TextWindows", "document_windows",
           "window_item", "window_starts"]
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a .bin for out-of-range ids
FULL_SCAN_MAX_TOKENS = 1 << 28  # verify="auto": scan every id of files up to 256M tokens


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token when set, else eos (masked anyway)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pid)


# --------------------------------------------------------------------------- pretraining


def read_sidecar(bin_path) -> dict:
    side = Path(bin_path).with_suffix(".json")
    if not side.is_file():
        raise DataError(f"sidecar {side.name} not found next to the .bin (rebuild with 3.pretrain.py, or pass dtype=)",
                        file=bin_path, reason="missing_file")
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"unreadable sidecar: {e}", file=side, reason="malformed_json") from None


def scan_max_id(mm: np.ndarray, vocab_size: int, path) -> int:
    """Max id over a memmap in chunks; raises at the first id >= vocab_size, naming its position."""
    top = -1
    for start in range(0, len(mm), _SCAN_CHUNK):
        chunk = np.asarray(mm[start:start + _SCAN_CHUNK])
        m = int(chunk.max()) if len(chunk) else -1
        if m >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(f"token id {int(mm[pos])} >= vocab size {vocab_size}", file=path, position=pos,
                            reason="id_out_of_range")
        top = max(top, m)
    return top


def window_starts(n_tokens: int, max_seq_len: int, stride: int | None = None, *, partial: bool = False) -> range:
    """Start positions of the windows of ``max_seq_len + 1`` tokens (stride ``max_seq_len``) over a
    sequence of ``n_tokens``: full windows only (a packed ``.bin``), or with ``partial`` also a last
    shorter one, so that every token after the first is predicted exactly once (one document)."""
    stride = int(stride or max_seq_len)
    if partial:
        return range(0, max(n_tokens - 1, 0), stride)
    return range(0, max(n_tokens - max_seq_len, 0), stride)


def window_item(seq, start: int, max_seq_len: int) -> dict:
    """The pre-shifted item of the window at ``start``: ``input_ids = w[:-1]``, ``targets = w[1:]``."""
    w = np.array(seq[start:start + max_seq_len + 1], dtype=np.int64)
    return {"input_ids": torch.from_numpy(w[:-1].copy()), "targets": torch.from_numpy(w[1:].copy())}


def document_windows(texts, tokenizer, max_seq_len: int, *, first_only: bool = False) -> list[list[dict]]:
    """Per text, the items of ``bos text eos`` cut into windows (:func:`window_starts` with ``partial``;
    no window crosses documents); ``first_only``: only each text's first window. Encoded with the
    fast batch encoder (the ids of ``tokenizer.encode(text, add_special_tokens=False)``)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    out = []
    for ids in batch_encoder(tokenizer)(list(texts)) if texts else []:
        seq = np.asarray(head + list(ids) + [eos], dtype=np.int64)
        starts = window_starts(len(seq), max_seq_len, partial=True)
        out.append([window_item(seq, s, max_seq_len) for s in (starts[:1] if first_only else starts)])
    return out


class TextWindows(Dataset):
    """Windows of ``{"text"}`` documents (a JSONL path or a list of texts), each ``bos text eos`` on its
    own (:func:`document_windows`); the in-memory sibling of :class:`PretrainDataset` for small held-out
    files. ``limit``: the first ``limit`` windows (reading stops there). Bad lines follow ``on_error``
    (located errors; ``summary`` counts them)."""

    _CHUNK = 256

    def __init__(self, texts_or_path, tokenizer, max_seq_len: int, *, first_only: bool = False,
                 limit: int | None = None, on_error: str = "raise"):
        from .jsonl import iter_jsonl, require

        name = Path(texts_or_path).name if isinstance(texts_or_path, (str, Path)) else "texts"
        self.report = Report(on_error, name=f"TextWindows({name})")
        self.items: list[dict] = []

        def texts():
            if not isinstance(texts_or_path, (str, Path)):
                yield from texts_or_path
                return
            path = Path(texts_or_path)
            for line, obj in iter_jsonl(path, self.report):
                try:
                    yield require(obj, "text", str, path, line, nonempty=True)
                except DataError as e:
                    self.report.error(e)

        chunk = []
        for text in itertools.chain(texts(), [None]):
            if text is not None:
                chunk.append(text)
                self.report.keep()
                if len(chunk) < self._CHUNK:
                    continue
            for doc in document_windows(chunk, tokenizer, max_seq_len, first_only=first_only):
                self.items.extend(doc)
            chunk = []
            if limit is not None and len(self.items) >= limit:
                break
        if limit is not None:
            del self.items[limit:]

    @property
    def summary(self) -> dict:
        return self.report.to_dict()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PretrainDataset(Dataset):
    """Windows of ``max_seq_len + 1`` tokens over a flat ``.bin`` (stride ``max_seq_len``).

    ``tokenizer``: when given, the sidecar's tokenizer fingerprint must match it and every id must
    be below ``len(tokenizer)``. ``verify``: ``"auto"`` scans all ids (in chunks) for files up to
    ``FULL_SCAN_MAX_TOKENS`` tokens and relies on the sidecar's ``max_token_id`` beyond; ``"full"``
    always scans; ``"sidecar"`` never scans. ``dtype``: read a raw ``.bin`` that has no sidecar
    (e.g. the original project's uint16 file).
    """

    def __init__(self, bin_path, max_seq_len: int, tokenizer=None, *, dtype=None, verify: str = "auto",
                 stride: int | None = None):
        self.path = Path(bin_path)
        if not self.path.is_file():
            raise missing_file(self.path, "pretraining .bin")
        if max_seq_len < 1:
            raise ValueError("max_seq_len must be >= 1")
        self.max_seq_len = int(max_seq_len)
        self.stride = int(stride or max_seq_len)
        if dtype is not None and not self.path.with_suffix(".json").is_file():
            self.meta = {"dtype": np.dtype(dtype).name}
        else:
            self.meta = read_sidecar(self.path)
        try:
            self.dtype = np.dtype(self.meta["dtype"])
        except (KeyError, TypeError) as e:
            raise DataError(f"sidecar has no valid dtype ({e})", file=self.path.with_suffix(".json"),
                            field="dtype", reason="wrong_type") from None
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"file size {size} is not a multiple of {self.dtype.itemsize} ({self.dtype.name})",
                            file=self.path, reason="sidecar_mismatch")
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens == 0:
            raise DataError("empty file (0 tokens): rebuild it with 3.pretrain.py", file=self.path, reason="empty_file")
        if "num_tokens" in self.meta and int(self.meta["num_tokens"]) != self.num_tokens:
            raise DataError(f"sidecar says {self.meta['num_tokens']} tokens, the file holds {self.num_tokens}",
                            file=self.path, reason="sidecar_mismatch")
        vocab = self.meta.get("vocab_size")
        if tokenizer is not None:
            from tokenizer import tokenizer_fingerprint

            fp = tokenizer_fingerprint(tokenizer)
            want = self.meta.get("tokenizer_fingerprint")
            if want is not None and want != fp:
                raise DataError(f"built with tokenizer fingerprint {want} (sidecar), but the tokenizer in use has "
                                f"{fp}: rebuild the .bin with this tokenizer", file=self.path,
                                reason="fingerprint_mismatch")
            vocab = len(tokenizer)
        self.vocab_size = int(vocab) if vocab is not None else None
        if self.vocab_size is not None:
            recorded = self.meta.get("max_token_id")
            if recorded is not None and int(recorded) >= self.vocab_size:
                raise DataError(f"sidecar max_token_id {recorded} >= vocab size {self.vocab_size}", file=self.path,
                                reason="id_out_of_range")
            if verify == "full" or (verify == "auto" and self.num_tokens <= FULL_SCAN_MAX_TOKENS):
                scan_max_id(self._map(), self.vocab_size, self.path)
            elif verify not in ("auto", "full", "sidecar"):
                raise ValueError(f"verify must be auto, full or sidecar, got {verify!r}")
        self._n = len(window_starts(self.num_tokens, self.max_seq_len, self.stride))
        if self._n == 0:
            raise DataError(f"{self.num_tokens} tokens: too few for one window of {self.max_seq_len + 1}",
                            file=self.path, reason="too_short")
        self._mm = None

    def _map(self) -> np.ndarray:
        if getattr(self, "_mm", None) is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._mm

    def __getstate__(self):  # never pickle the map (workers reopen it)
        state = dict(self.__dict__)
        state["_mm"] = None
        return state

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return window_item(self._map(), i * self.stride, self.max_seq_len)


# --------------------------------------------------------------------------- chat datasets


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    return idx


def _parse_sft(obj, path, line) -> list[list[dict]]:
    return [check_conversations(obj.get("conversations"), path, line)]


def _parse_pair(obj, path, line) -> list[list[dict]]:
    p = to_canonical_pair(obj, path, line)
    return [p["prompt"] + [{"role": "assistant", "content": p["chosen"]}],
            p["prompt"] + [{"role": "assistant", "content": p["rejected"]}]]


class _ChatDataset(Dataset):
    """Shared by :class:`SFTDataset` and :class:`PreferenceDataset`: the tokenised store
    (``dataset.chat_store``: built once per file and tokenizer, memory-mapped), the selection of the
    records that fit ``max_seq_len`` and the bad-record bookkeeping."""

    kind = ""
    seq_per_record = 1
    loss_on = "all"
    _parse = staticmethod(_parse_sft)
    _which = ("",)

    def __init__(self, jsonl_path, tokenizer, max_seq_len: int, *, on_error: str = "raise",
                 template: str = "auto", limit: int | None = None, seed: int = 0, workers: int = 1,
                 cache_dir=None, too_long: str = "error", log=None):
        self.path = Path(jsonl_path)
        if not self.path.is_file():
            raise missing_file(self.path, "input file" if not self.path.exists() else
                               "input file (not a regular file)")
        if max_seq_len < 1:
            raise ValueError("max_seq_len must be >= 1")
        if too_long not in ("error", "drop"):
            raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
        self.max_seq_len = int(max_seq_len)
        self.on_error = check_on_error(on_error)
        self.too_long = too_long
        self.encoder = ChatEncoder(tokenizer, template, encode_texts=repeat_cached(batch_encoder(tokenizer)))
        self.report = Report(on_error, name=f"{type(self).__name__}({self.path.name})")
        self.store = open_store(self.path, tokenizer, kind=self.kind, template=template, encoder=self.encoder,
                                parse=self._parse, seq_per_record=self.seq_per_record, loss_on=self.loss_on,
                                on_error=on_error, workers=max(1, int(workers)), cache_dir=cache_dir, log=log)
        self._select(limit, seed)

    def _too_long_error(self, line: int, what: str = "") -> DataError:
        return DataError(f"sample longer than the context ({self.max_seq_len} tokens): no {what}answer token "
                         "left after truncation", file=self.path, line=line, reason="too_long")

    def _select(self, limit, seed):
        st, rep = self.store, self.report
        header = st.header
        rep.seen = int(header["records_seen"])
        if rep.seen == 0:
            raise no_records(self.path, rep)
        lines = st.lines
        first = st.first_target.reshape(-1, self.seq_per_record)
        cut = first > self.max_seq_len  # [records, sequences]: no target token within the context
        long_idx = np.flatnonzero(cut.any(1))
        bad = st.errors()  # recorded bad records (line order)

        def long_err(k):
            which = self._which[int(np.argmax(cut[k]))]
            return self._too_long_error(int(lines[k]), which)

        long_errs = [long_err(k) for k in long_idx[: rep.max_examples]] if self.too_long == "error" else []
        if self.on_error == "raise":
            cands = bad[:1] + long_errs[:1]
            if cands:
                raise min(cands, key=lambda e: e.line)
        for reason, n in sorted(header["errors"]["counts"].items()):
            rep.skipped[reason] += int(n)
        if self.too_long == "error":
            if len(long_idx):
                rep.skipped["too_long"] += len(long_idx)
        elif len(long_idx):
            rep.drop("too_long", len(long_idx))
        rep.examples = [str(e) for e in sorted(bad[: rep.max_examples] + long_errs, key=lambda e: e.line)
                        ][: rep.max_examples]
        kept = np.flatnonzero(~cut.any(1))
        rep.keep(len(kept))
        if len(kept) == 0:
            raise no_records(self.path, rep)
        self._keep = kept[_subsample(len(kept), limit, seed)]
        self.lines = lines[self._keep].tolist()  # source line of each sample

    def _pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.store.sequence(k, self.max_seq_len + 1)
        tgt = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        return torch.from_numpy(ids[:-1].copy()), torch.from_numpy(tgt)

    def __getstate__(self):  # picklable for spawn-started DataLoader workers: no maps, no encoder
        state = dict(self.__dict__)
        state["encoder"] = None
        return state

    def __len__(self) -> int:
        return len(self._keep)

    def lengths(self) -> np.ndarray:
        """Input tokens of each item (the longest of its sequences), without reading the tokens."""
        k = self.seq_per_record
        per_seq = np.minimum(np.diff(self.store.offsets), self.max_seq_len + 1) - 1
        return per_seq.reshape(-1, k)[self._keep].max(1)

    @property
    def summary(self) -> dict:
        return self.report.to_dict()


class SFTDataset(_ChatDataset):
    """Canonical SFT JSONL -> ``{"input_ids", "targets"}`` (targets on assistant answers + end token).

    Conversations are rendered by the one chat encoder (``tokenizer.chat``; message content is plain
    text: a ``</s>`` typed in a message is text, not the end token). Longer samples keep their start;
    a sample whose answers are all cut away is "longer than the context" (``too_long="error"``:
    an error, raised or counted in ``summary`` per ``on_error``; ``"drop"``: counted as dropped).
    ``limit`` with ``seed`` keeps a deterministic random subset. The file is tokenised once into a
    memory-mapped store beside it (``<file>.mateconv-cache/``, or ``cache_dir``; see
    ``dataset.chat_store``; ``workers`` processes build it, same result); ``lines`` holds the source
    line of each sample, ``summary`` the kept/skipped counts.
    """

    kind = "sft"

    def __getitem__(self, i: int) -> dict:
        inp, tgt = self._pair(int(self._keep[i]))
        return {"input_ids": inp, "targets": tgt}


class PreferenceDataset(_ChatDataset):
    """Preference pairs (canonical, original ``q/history/pos/neg`` or chosen/rejected message lists)
    -> ``chosen_input_ids``, ``chosen_targets``, ``rejected_input_ids``, ``rejected_targets``
    with the SFT masking, except that only the final answer (and its end token) is a target: earlier
    assistant turns of the prompt are context. A pair where either answer is cut away entirely is
    "longer than the context".
    """

    kind = "prefs"
    seq_per_record = 2
    loss_on = "last"
    _parse = staticmethod(_parse_pair)
    _which = ("chosen ", "rejected ")

    def __getitem__(self, i: int) -> dict:
        j = int(self._keep[i])
        ci, ct = self._pair(2 * j)
        ri, rt = self._pair(2 * j + 1)
        return {"chosen_input_ids": ci, "chosen_targets": ct, "rejected_input_ids": ri, "rejected_targets": rt}


class ReplayMix(Dataset):
    """Rehearsal against forgetting: the items of ``primary`` (e.g. an :class:`SFTDataset`) followed by
    ``n_replay`` windows of ``replay`` (a :class:`PretrainDataset`) spread evenly over it, so that under the
    trainer's shuffled sampler a fraction ``ratio`` of the items of a batch, on average, is pretraining text.

    ``n_replay = min(len(replay), round(len(primary) * ratio / (1 - ratio)))``; item ``len(primary) + j`` is
    window ``j * len(replay) // n_replay``. Both kinds are ``{"input_ids", "targets"}``; a replay window's
    targets are all its tokens (the loss is the token mean over the batch, so one window weighs as much as
    its ``max_seq_len`` tokens). Deterministic, so a resumed run sees the same items.
    """

    def __init__(self, primary: Dataset, replay: Dataset, ratio: float):
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
        self.primary, self.replay, self.ratio = primary, replay, float(ratio)
        self.n_primary = len(primary)
        self.n_replay = min(len(replay), int(round(self.n_primary * self.ratio / (1.0 - self.ratio))))

    def __len__(self) -> int:
        return self.n_primary + self.n_replay

    def lengths(self) -> np.ndarray:
        """Input tokens of each item: the primary's, then ``max_seq_len`` for every replay window."""
        return np.concatenate([self.primary.lengths(), np.full(self.n_replay, self.replay.max_seq_len, np.int64)])

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i < self.n_primary:
            return self.primary[i]
        return self.replay[(i - self.n_primary) * len(self.replay) // self.n_replay]

    def describe(self) -> str:
        return (f"replay: {self.n_replay} pretraining windows of {getattr(self.replay, 'path', 'replay data')} "
                f"mixed into {self.n_primary} items ({self.n_replay / max(1, len(self)):.0%} of the items)")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def add_data_args(parser) -> None:
    """The chat-data flags of the SFT and DPO stages: ``--on_error``, ``--cache_dir``, ``--data_workers``."""
    from .build_bin import default_workers
    from .errors import ON_ERROR_CHOICES

    parser.add_argument("--on_error", default="raise", choices=ON_ERROR_CHOICES,
                        help="a bad record in the training data: raise (stop, naming file, line and field) or "
                             "skip (leave it out; the counts by reason are printed)")
    parser.add_argument("--cache_dir", default=None,
                        help="where the tokenised data store is kept [<data file>.mateconv-cache/ beside it]")
    parser.add_argument("--data_workers", type=int, default=default_workers(),
                        help="processes that tokenise the data on its first use (one per core, up to 8)")


def or_exit(what: str, build, *args, **kw):
    """``build(*args, **kw)`` for a stage script: a :class:`DataError` ends the run with its located
    message and no traceback (``SystemExit``: "error: <what>: <file>:<line>: ...")."""
    try:
        return build(*args, **kw)
    except DataError as e:
        raise SystemExit(f"error: {what}: {e}") from None


def training_dataset(cls, path, tokenizer, args, *, what: str = "data", log=None, **kw):
    """``cls(path, tokenizer, args.max_seq_len, ...)`` for a training stage, with the flags of
    :func:`add_data_args`: the summary is logged (main process), and a data error ends the run with its
    located message and no traceback (``SystemExit``). Samples longer than the context are counted as
    dropped (``too_long="drop"``), not errors: they depend on ``--max_seq_len``, not on the data."""
    log = log or (print if _is_main_process() else None)
    kw.setdefault("too_long", "drop")
    kw.setdefault("on_error", getattr(args, "on_error", "raise"))
    kw.setdefault("cache_dir", getattr(args, "cache_dir", None))
    kw.setdefault("workers", getattr(args, "data_workers", 1) or 1)
    try:
        ds = cls(path, tokenizer, args.max_seq_len, log=log, **kw)
    except DataError as e:
        hint = "" if kw["on_error"] == "skip" or e.reason in ("no_usable_records", "empty_file") \
            else " (--on_error skip leaves bad records out and counts them)"
        raise SystemExit(f"error: {what}: {e}{hint}") from None
    if log:
        log(ds.report.format())
    return ds
