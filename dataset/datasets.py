"""Torch datasets for pretraining, SFT and preference training (see docs/ARCHITECTURE.md, "Batches").

Every item is a dict of 1-D ``torch.long`` tensors with *pre-shifted* targets: ``input_ids[t]`` is
the input at position t and ``targets[t]`` the token to predict there (``-100``: no loss).

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

import collections
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .build_bin import batch_encoder
from .errors import DataError, Report, check_on_error, missing_file
from .jsonl import iter_jsonl, ordered_map
from .prepare import check_conversations, to_canonical_pair

IGNORE_INDEX = -100
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
        self._n = max(0, (self.num_tokens - 1 - self.max_seq_len) // self.stride + 1) \
            if self.num_tokens > self.max_seq_len else 0
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
        start = i * self.stride
        w = np.array(self._map()[start:start + self.max_seq_len + 1], dtype=np.int64)
        return {"input_ids": torch.from_numpy(w[:-1].copy()), "targets": torch.from_numpy(w[1:].copy())}


# --------------------------------------------------------------------------- chat encoding


class ChatEncoder:
    """Token ids + loss mask for a conversation; mask is True on assistant answers and their end token.

    ``template="auto"`` uses the tokenizer's chat template when it has one (rendering prefixes with
    ``add_generation_prompt=True`` to find where each answer starts), else the original MateConv
    template ``<s>user\\n{q}</s>\\n<s>assistant\\n{a}</s>\\n`` (system: ``<s>system\\n{s}</s>\\n`` first).
    ``template="mateconv"`` forces the original template.
    """

    def __init__(self, tokenizer, template: str = "auto"):
        if template not in ("auto", "mateconv"):
            raise ValueError("template must be 'auto' or 'mateconv'")
        self.tok = tokenizer
        self.bos = tokenizer.bos_token or "<s>"
        self.eos = tokenizer.eos_token or "</s>"
        self.use_template = template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        specials = [t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t]
        self.end_tokens = sorted({self.eos, *specials}, key=len, reverse=True)
        self._encode_texts = batch_encoder(tokenizer)
        # Rendering a Jinja template per turn is slow: when the tokenizer's template gives exactly the
        # original MateConv pieces on probe conversations, use the (fast) built-in rendering.
        self._same_as_builtin = {False: False, True: False}
        if self.use_template:
            for has_system in (False, True):
                probe = ([{"role": "system", "content": "S1"}] if has_system else []) + [
                    {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
                self._same_as_builtin[has_system] = self._merge(self._templated(probe) or []) == \
                    self._merge(self._builtin(probe))

    # pieces: list of (text, is_target)
    def _builtin(self, msgs: list[dict]) -> list[tuple[str, bool]]:
        b, e = self.bos, self.eos
        out = []
        for m in msgs:
            if m["role"] == "assistant":
                out += [(f"{b}assistant\n", False), (m["content"] + e, True), ("\n", False)]
            else:
                out.append((f"{b}{m['role']}\n{m['content']}{e}\n", False))
        return out

    def _render(self, msgs, gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _templated(self, msgs: list[dict]) -> list[tuple[str, bool]] | None:
        out, done = [], ""
        try:
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                prompt = self._render(msgs[:i], True)
                full = self._render(msgs[:i + 1], False)
                if not prompt.startswith(done) or not full.startswith(prompt):
                    return None
                ans = full[len(prompt):]
                k = ans.find(m["content"])
                if k < 0 or ans[:k].strip():
                    return None
                end = k + len(m["content"])
                for t in self.end_tokens:
                    if ans.startswith(t, end):
                        end += len(t)
                        break
                out += [(prompt[len(done):] + ans[:k], False), (ans[k:end], True)]
                done = prompt + ans[:end]
            full = self._render(msgs, False)
            if not full.startswith(done):
                return None
            out.append((full[len(done):], False))
            return out
        except Exception:  # template refuses these messages: fall back to the original template
            return None

    def pieces(self, msgs: list[dict], last_only: bool = False) -> list[tuple[str, bool]]:
        """Text pieces with their target flag; ``last_only``: only the last answer is a target."""
        pieces = None
        if self.use_template and not self._same_as_builtin[bool(msgs) and msgs[0]["role"] == "system"]:
            pieces = self._templated(msgs)
        if pieces is None:
            pieces = self._builtin(msgs)
        if last_only:
            last = max((k for k, (_, t) in enumerate(pieces) if t), default=-1)
            pieces = [(text, tgt and k == last) for k, (text, tgt) in enumerate(pieces)]
        return self._merge(pieces)

    @staticmethod
    def _merge(pieces):
        merged: list[tuple[str, bool]] = []
        for text, tgt in pieces:  # join neighbouring prompt pieces so they tokenize like the whole prompt
            if not text:
                continue
            if merged and not tgt and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + text, False)
            else:
                merged.append((text, tgt))
        return merged

    def encode_many(self, conversations: list[list[dict]], last_only: bool = False
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Batch-encode conversations -> list of (ids int64, mask bool)."""
        all_pieces = [self.pieces(c, last_only) for c in conversations]
        flat = [t for p in all_pieces for t, _ in p]
        enc = self._encode_texts(flat) if flat else []
        out, j = [], 0
        for p in all_pieces:
            ids = [np.asarray(enc[j + k], dtype=np.int64) for k in range(len(p))]
            j += len(p)
            mask = [np.full(len(e), tgt, dtype=bool) for e, (_, tgt) in zip(ids, p)]
            out.append((np.concatenate(ids) if ids else np.zeros(0, np.int64),
                        np.concatenate(mask) if mask else np.zeros(0, bool)))
        return out

    def encode(self, msgs: list[dict], last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_many([msgs], last_only)[0]


def shift_and_truncate(ids: np.ndarray, mask: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the start (at most ``max_seq_len + 1`` tokens) and pre-shift: ``(input_ids, targets)``."""
    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
    inp = ids[:-1]
    tgt = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    return inp, tgt


class _Packed:
    """Variable-length samples stored flat: the truncated token sequence (``uint16``, or ``int32``
    for vocabularies over 65536) and a bool target mask (~3 bytes per token), plus offsets.
    ``get`` shifts on the fly: ``input_ids = seq[:-1]``, ``targets = seq[1:]`` where masked, else -100."""

    def __init__(self, vocab_size: int):
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        self.parts_s, self.parts_m, self.lengths = [], [], []

    def add(self, seq: np.ndarray, mask: np.ndarray):
        self.parts_s.append(seq.astype(self.dtype))
        self.parts_m.append(mask)
        self.lengths.append(len(seq))

    def finish(self):
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.seq = np.concatenate(self.parts_s) if self.parts_s else np.zeros(0, self.dtype)
        self.mask = np.concatenate(self.parts_m) if self.parts_m else np.zeros(0, bool)
        del self.parts_s, self.parts_m, self.lengths
        return self

    @property
    def num_tokens(self) -> int:
        return int(self.seq.size)

    def get(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        seq = self.seq[a:b].astype(np.int64)
        tgt = np.where(self.mask[a + 1:b], seq[1:], IGNORE_INDEX)
        return torch.from_numpy(seq[:-1].copy()), torch.from_numpy(tgt)


def _truncate(ids: np.ndarray, mask: np.ndarray, max_seq_len: int):
    """Keep the start: at most ``max_seq_len + 1`` tokens (inputs and shifted targets both ``max_seq_len``)."""
    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
    mask = mask.copy()
    mask[0] = False  # the first token is never predicted
    return ids, mask, bool(mask.any())


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    return idx


_ENCODER: ChatEncoder | None = None
_LAST_ONLY = False


def _set_encoder(encoder: ChatEncoder, last_only: bool) -> None:
    global _ENCODER, _LAST_ONLY
    _ENCODER, _LAST_ONLY = encoder, last_only


def _encode_task(conversations):
    return _ENCODER.encode_many(conversations, _LAST_ONLY)


class _ChatDataset(Dataset):
    batch_records = 256
    last_only = False

    def __init__(self, jsonl_path, tokenizer, max_seq_len: int, *, on_error: str = "raise",
                 template: str = "auto", limit: int | None = None, seed: int = 0, workers: int = 1):
        self.path = Path(jsonl_path)
        if not self.path.is_file():
            raise missing_file(self.path, "input file")
        self.max_seq_len = int(max_seq_len)
        self.on_error = check_on_error(on_error)
        self.encoder = ChatEncoder(tokenizer, template)
        self.report = Report(on_error, name=f"{type(self).__name__}({self.path.name})")
        self.lines: list[int] = []  # source line of each kept sample
        self._load(workers)
        keep = _subsample(len(self.lines), limit, seed)
        self.lines = [self.lines[i] for i in keep]
        self._keep = keep

    def _batches(self):
        batch = []
        for line, obj in iter_jsonl(self.path, self.report):
            try:
                batch.append((line, self._parse(obj, line)))
            except DataError as e:
                self.report.error(e)
            if len(batch) >= self.batch_records:
                yield batch
                batch = []
        if batch:
            yield batch

    def _load(self, workers: int):
        """Stream the file; parse here, tokenize in ``workers`` forked processes (input order kept)."""
        pending: collections.deque = collections.deque()

        def tasks():
            for batch in self._batches():
                pending.append(batch)
                yield self._conversations(batch)

        for encoded in ordered_map(_encode_task, tasks(), workers, initializer=_set_encoder,
                                   initargs=(self.encoder, self.last_only)):
            self._store(pending.popleft(), encoded)

    def _too_long(self, line, what="") -> DataError:
        return DataError(f"sample longer than the context ({self.max_seq_len} tokens): no {what}answer token "
                         "left after truncation", file=self.path, line=line, reason="too_long")

    def __getstate__(self):  # picklable for spawn-started DataLoader workers: samples only
        state = dict(self.__dict__)
        state["encoder"] = None
        return state

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def summary(self) -> dict:
        return self.report.to_dict()


class SFTDataset(_ChatDataset):
    """Canonical SFT JSONL -> ``{"input_ids", "targets"}`` (targets on assistant answers + end token).

    Longer samples keep their start; a sample whose answers are all cut away raises "sample longer
    than the context" (``on_error="skip"``: counted in ``summary`` and left out). ``limit`` with
    ``seed`` keeps a deterministic random subset. The file is streamed and tokenized once, at
    construction (``workers`` > 1: in forked processes, same result), and stored flat at ~3 bytes
    per token; ``lines`` holds the source line of each sample, ``summary`` the kept/skipped counts.
    """

    def _parse(self, obj, line):
        return check_conversations(obj.get("conversations"), self.path, line)

    def _conversations(self, batch):
        return [m for _, m in batch]

    def _store(self, batch, encoded):
        for (line, _), (ids, mask) in zip(batch, encoded):
            seq, m, ok = _truncate(ids, mask, self.max_seq_len)
            if not ok:
                self.report.error(self._too_long(line))
                continue
            self.report.keep()
            self._samples.add(seq, m)
            self.lines.append(line)

    def _load(self, workers):
        self._samples = _Packed(len(self.encoder.tok))
        super()._load(workers)
        self._samples.finish()

    def __getitem__(self, i: int) -> dict:
        inp, tgt = self._samples.get(int(self._keep[i]))
        return {"input_ids": inp, "targets": tgt}


class PreferenceDataset(_ChatDataset):
    """Preference pairs (canonical, original ``q/history/pos/neg`` or chosen/rejected message lists)
    -> ``chosen_input_ids``, ``chosen_targets``, ``rejected_input_ids``, ``rejected_targets``
    with the SFT masking, except that only the final answer (and its end token) is a target: earlier
    assistant turns of the prompt are context. A pair where either answer is cut away entirely is
    "longer than the context".
    """

    last_only = True

    def _parse(self, obj, line):
        return to_canonical_pair(obj, self.path, line)

    def _conversations(self, batch):
        convs = []
        for _, p in batch:
            convs.append(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}])
            convs.append(p["prompt"] + [{"role": "assistant", "content": p["rejected"]}])
        return convs

    def _store(self, batch, encoded):
        for k, (line, _) in enumerate(batch):
            c = _truncate(*encoded[2 * k], self.max_seq_len)
            r = _truncate(*encoded[2 * k + 1], self.max_seq_len)
            bad = [n for n, x in (("chosen ", c), ("rejected ", r)) if not x[2]]
            if bad:
                self.report.error(self._too_long(line, bad[0]))
                continue
            self.report.keep()
            self._chosen.add(c[0], c[1])
            self._rejected.add(r[0], r[1])
            self.lines.append(line)

    def _load(self, workers):
        self._chosen, self._rejected = _Packed(len(self.encoder.tok)), _Packed(len(self.encoder.tok))
        super()._load(workers)
        self._chosen.finish()
        self._rejected.finish()

    def __getitem__(self, i: int) -> dict:
        j = int(self._keep[i])
        ci, ct = self._chosen.get(j)
        ri, rt = self._rejected.get(j)
        return {"chosen_input_ids": ci, "chosen_targets": ct, "rejected_input_ids": ri, "rejected_targets": rt}
