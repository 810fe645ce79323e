"""Tokenise a chat JSONL once into a cached, memory-mapped store (SFT conversations, preference pairs).

The first start streams the file through worker processes (each reads its own byte range, parses,
validates and renders the records with the one chat encoder, :class:`tokenizer.chat.ChatEncoder`,
and encodes each batch of records with one tiktoken call, :meth:`~tokenizer.chat.ChatEncoder.encode_flat`,
sending back ids already in the store's dtype) and writes::

    <file>.mateconv-cache/<kind>-<key16>/        (or <cache_dir>/<file name>-<kind>-<key16>/)
        header.json       format, key, source, tokenizer, counts, recorded errors, array sizes + checksums
        tokens.bin        token ids of every sequence, flat (uint16, or uint32 for vocabularies > 65536)
        mask.bin          uint8 loss mask per token (1: assistant answer token / its end token)
        offsets.npy       int64 [n_seq + 1]: sequence k is tokens[offsets[k]:offsets[k + 1]]
        first_target.npy  int32 [n_seq]: first position >= 1 with mask 1 (INT32_MAX: none)
        lines.npy         int64 [n_records]: source line of each stored record

Sequences are stored whole (not truncated), so one store serves every ``max_seq_len``: at open,
a record is "longer than the context" when ``first_target > max_seq_len`` (no answer token left
after keeping the first ``max_seq_len + 1`` tokens). A preference record is two sequences
(chosen, rejected). Bad records (located :class:`DataError`) are recorded with their reason and
line, so a later start with ``on_error="raise"`` raises the same first error and ``"skip"``
reports the same counts, without reading the file again.

**Key** (the directory name holds its first 16 hex digits, ``header.json`` all of it): sha256 of
the store format version, the kind, the tokenizer fingerprint (``tokenizer.tokenizer_fingerprint``),
its bos/eos strings and chat template, the template mode, the source of ``tokenizer/chat.py`` (any
change to the chat rendering rebuilds), and the source file's size, mtime (ns) and the sha256 of
its first and last MiB. A store is used only when its header parses, carries this key, every array
file has its recorded size and checksum (crc32 of the whole file, ~0.5 s per GB) and the offsets
are consistent; anything else (a foreign, stale, truncated or corrupt store) is rebuilt and
replaced. Builds go to a temporary directory renamed into place, under a file lock, so concurrent
starts (several ranks) build once and an interrupted build leaves nothing that looks valid; a new
store removes those of earlier versions of the same file (stores for other tokenizers stay). When
the location is not writable, the store is built in a temporary directory for this process only
(with a note).

Memory: the token and mask files are memory-mapped (resident memory does not grow with the file);
the small arrays (offsets, lines, first targets: ~20 bytes per record) are loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError
from .jsonl import check_file, ordered_map, parse_json_line, read_byte_range, strip_bom

STORE_FORMAT = 1
NO_TARGET = np.iinfo(np.int32).max
_HEADER = "header.json"
_ARRAYS = ("tokens.bin", "mask.bin", "offsets.npy", "first_target.npy", "lines.npy")
_MIB = 1 << 20
_MAX_RECORDED_ERRORS = 1000  # per store: the first ones (counts are always complete)


def _crc_file(path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 24)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def source_signature(path) -> dict:
    """What identifies the content of ``path`` cheaply: size, mtime and a hash of its first and last MiB."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if st.st_size > 2 * _MIB:
            f.seek(st.st_size - _MIB)
        h.update(f.read(_MIB))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def _chat_source_hash() -> str:
    import tokenizer.chat as chat

    return hashlib.sha256(Path(chat.__file__).read_bytes()).hexdigest()


def store_key(kind: str, path, tokenizer, template: str) -> tuple[str, dict]:
    from tokenizer import tokenizer_fingerprint

    ident = {
        "format": STORE_FORMAT, "kind": kind, "template": template,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "bos": tokenizer.bos_token, "eos": tokenizer.eos_token,
        "chat_template_sha256": hashlib.sha256(str(getattr(tokenizer, "chat_template", None) or "").encode()
                                               ).hexdigest(),
        "chat_encoder_sha256": _chat_source_hash(),
        "source": source_signature(path),
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return key, ident


def store_dir(kind: str, path, key: str, cache_dir=None) -> Path:
    path = Path(path)
    if cache_dir is not None:
        return Path(cache_dir) / f"{path.name}-{kind}-{key[:16]}"
    return path.with_name(path.name + ".mateconv-cache") / f"{kind}-{key[:16]}"


# --------------------------------------------------------------------------------------------- the store


class ChatStore:
    """An opened, validated store (see the module docstring)."""

    def __init__(self, directory: Path, header: dict, tmp_owner=None):
        self.dir = Path(directory)
        self.header = header
        self._tmp_owner = tmp_owner  # keeps a temporary store alive
        self.dtype = np.dtype(header["dtype"])
        self.offsets = np.load(self.dir / "offsets.npy")
        self.first_target = np.load(self.dir / "first_target.npy")
        self.lines = np.load(self.dir / "lines.npy")
        # mapped now: the maps stay valid if the directory is removed later (a temporary store); a copy
        # unpickled in a DataLoader worker maps the files again on first use
        self._tokens = _memmap(self.dir / "tokens.bin", self.dtype)
        self._mask = _memmap(self.dir / "mask.bin", np.uint8)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = _memmap(self.dir / "tokens.bin", self.dtype)
        return self._tokens

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            self._mask = _memmap(self.dir / "mask.bin", np.uint8)
        return self._mask

    def __getstate__(self):  # DataLoader workers reopen the maps
        state = dict(self.__dict__)
        state["_tokens"] = state["_mask"] = None
        state["_tmp_owner"] = None
        return state

    def errors(self) -> list[DataError]:
        return [DataError(e["detail"], file=e["file"], line=e["line"], field=e["field"], reason=e["reason"],
                          position=e.get("position")) for e in self.header["errors"]["recorded"]]

    def sequence(self, k: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence ``k``, its first ``max_len`` tokens: ``(ids int64, mask bool)``; mask[0] is False."""
        a = int(self.offsets[k])
        b = min(int(self.offsets[k + 1]), a + max_len)
        ids = np.asarray(self.tokens[a:b], dtype=np.int64)
        mask = np.asarray(self.mask[a:b], dtype=bool).copy()
        if len(mask):
            mask[0] = False
        return ids, mask


def _memmap(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _validate(directory: Path, key: str) -> dict | None:
    """The header when the store in ``directory`` is complete, ours and intact; else None."""
    try:
        header = json.loads((directory / _HEADER).read_text(encoding="utf-8"))
        if header.get("format") != STORE_FORMAT or header.get("key") != key:
            return None
        arrays = header["arrays"]
        for name in _ARRAYS:
            p = directory / name
            if not p.is_file() or p.stat().st_size != arrays[name]["size"]:
                return None
        for name in _ARRAYS:
            if _crc_file(directory / name) != arrays[name]["crc32"]:
                return None
        offsets = np.load(directory / "offsets.npy")
        n_tok = arrays["tokens.bin"]["size"] // np.dtype(header["dtype"]).itemsize
        if (len(offsets) != header["n_sequences"] + 1 or offsets[0] != 0 or offsets[-1] != n_tok
                or arrays["mask.bin"]["size"] != n_tok or (len(offsets) > 1 and np.any(np.diff(offsets) < 0))):
            return None
        if len(np.load(directory / "lines.npy")) * header["seq_per_record"] != header["n_sequences"]:
            return None
        return header
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------- building


def repeat_cached(encode_texts, max_chars: int = 16, max_entries: int = 4096):
    """``encode_texts`` (``list[str] -> list[ids]``, a pure function of each text) that encodes each
    distinct text of a call once and remembers short ones across calls: the chat template's pieces
    (``"\n"``, ``"assistant\n"``, ...) are a third to a half of all texts and are encoded once."""
    memo: dict = {}

    def encode(texts):
        out = [None] * len(texts)
        todo: dict = {}
        for i, t in enumerate(texts):
            hit = memo.get(t)
            if hit is not None:
                out[i] = hit
            else:
                todo.setdefault(t, []).append(i)
        if todo:
            keys = list(todo)
            for t, ids in zip(keys, encode_texts(keys)):
                for i in todo[t]:
                    out[i] = ids
                if len(t) <= max_chars and len(memo) < max_entries:
                    memo[t] = ids
        return out

    return encode

_W: dict = {}


def _init_worker(encoder, parse, seq_per_record, loss_on, in_pool, dtype=np.int64):
    if in_pool:  # one process per core already: no Rust thread pool in each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(encoder=encoder, parse=parse, n=seq_per_record, loss_on=loss_on, dtype=np.dtype(dtype))


def encode_range(task):
    """Worker: ``(path, start, end, first_line)`` -> arrays of the records in bytes ``[start, end)``."""
    path, start, end, first_line = task
    raw_lines = read_byte_range(path, start, end)
    parse = _W["parse"]
    convs, lines, errors, seen = [], [], [], 0
    for line, raw in enumerate(raw_lines, start=first_line):
        raw = strip_bom(raw.rstrip(b"\r"), line)
        if not raw.strip():
            continue
        seen += 1
        try:
            c = parse(parse_json_line(raw, path, line), path, line)
        except DataError as e:
            errors.append(e)
            continue
        convs.extend(c)
        lines.append(line)
    # one call for the whole batch (tokenizer.chat: one tiktoken call on the rendered batch)
    ids, mask, lengths = _W["encoder"].encode_flat(convs, _W["loss_on"])
    mask = mask.view(np.uint8)
    # first target position >= 1 of each sequence (position 0 is never predicted)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    m = mask.copy()
    m[starts[lengths > 0]] = 0
    hits = np.flatnonzero(m)
    seq_of_hit = np.searchsorted(starts, hits, side="right") - 1
    first = np.full(len(lengths), NO_TARGET, dtype=np.int32)
    at = np.flatnonzero(np.diff(seq_of_hit, prepend=-1))  # (sorted) the first hit of each sequence
    seqs = seq_of_hit[at]
    first[seqs] = (hits[at] - starts[seqs]).astype(np.int32)
    top = int(ids.max()) if len(ids) else -1
    # the store's dtype here, not in the parent: 4x fewer bytes sent back (an id >= the vocabulary
    # size is reported from `top` before anything is used)
    return (ids.astype(_W["dtype"]), mask, lengths, first, np.asarray(lines, dtype=np.int64), errors, seen,
            top)


def _ranges(path: Path, batch_records: int):
    """``(path, start, end, first_line)`` per run of up to ``batch_records`` non-blank lines."""
    start = pos = 0
    first, count = 1, 0
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if raw.strip():
                count += 1
            pos += len(raw)
            if count >= batch_records:
                yield str(path), start, pos, first
                start, first, count = pos, line + 1, 0
    if pos > start:
        yield str(path), start, pos, first


def _error_record(e: DataError) -> dict:
    return {"detail": e.detail, "file": e.file, "line": e.line, "field": e.field, "reason": e.reason,
            "position": e.position}


def build_store(directory: Path, *, path: Path, kind: str, key: str, ident: dict, encoder, parse,
                seq_per_record: int, loss_on: str, on_error: str, vocab_size: int, workers: int = 1,
                batch_records: int = 512, log=None) -> dict:
    """Tokenise ``path`` into ``directory`` (written to a temporary sibling, renamed at the end)."""
    from .build_bin import dtype_for_vocab

    t0 = time.time()
    dtype = dtype_for_vocab(vocab_size)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        lengths, firsts, lines = [], [], []
        counts: dict[str, int] = {}
        recorded: list[dict] = []
        seen = 0
        top = -1
        crc = {"tokens.bin": 0, "mask.bin": 0}  # of the bytes as written (not read back)
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
            results = ordered_map(encode_range, _ranges(path, batch_records), workers, initializer=_init_worker,
                                  initargs=(encoder, parse, seq_per_record, loss_on, workers > 1, dtype))
            for ids, mask, ln, first, rec_lines, errors, n_seen, t in results:
                seen += n_seen
                for e in errors:
                    if on_error == "raise":
                        raise e
                    counts[e.reason] = counts.get(e.reason, 0) + 1
                    if len(recorded) < _MAX_RECORDED_ERRORS:
                        recorded.append(_error_record(e))
                ids = ids.astype(dtype, copy=False)
                ft.write(ids)
                fm.write(mask)
                crc["tokens.bin"] = zlib.crc32(ids, crc["tokens.bin"])
                crc["mask.bin"] = zlib.crc32(mask, crc["mask.bin"])
                lengths.append(ln)
                firsts.append(first)
                lines.append(rec_lines)
                top = max(top, t)
        if top >= vocab_size:
            raise DataError(f"token id {top} >= vocab size {vocab_size}", file=path, reason="id_out_of_range")
        ln = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(ln) + 1, dtype=np.int64)
        np.cumsum(ln, out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "first_target.npy", np.concatenate(firsts) if firsts else np.zeros(0, np.int32))
        np.save(tmp / "lines.npy", np.concatenate(lines) if lines else np.zeros(0, np.int64))
        header = {
            "format": STORE_FORMAT, "key": key, "kind": kind, "ident": ident, "source_path": str(path),
            "dtype": dtype.name, "vocab_size": vocab_size, "max_token_id": top, "seq_per_record": seq_per_record,
            "n_sequences": int(len(ln)), "num_tokens": int(offsets[-1]), "records_seen": seen,
            "errors": {"counts": counts, "recorded": recorded},
            "arrays": {n: {"size": (tmp / n).stat().st_size,
                           "crc32": f"{crc[n]:08x}" if n in crc else _crc_file(tmp / n)} for n in _ARRAYS},
            "build_seconds": round(time.time() - t0, 3), "workers": workers,
        }
        (tmp / _HEADER).write_text(json.dumps(header, ensure_ascii=False, indent=1), encoding="utf-8")
        if directory.exists():  # a stale or corrupt store: replaced
            old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
            os.rename(directory, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, directory)
        _prune_stale(directory, ident["source"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"{path}: tokenised {seen:,} records into {directory} ({header['num_tokens']:,} tokens, "
            f"{time.time() - t0:.1f}s, {workers} worker(s))")
    return header


def _prune_stale(directory: Path, source: dict) -> None:
    """Remove the stores of earlier versions of the same source file (another size / mtime / content);
    stores of the same content for other tokenizers stay."""
    prefix = directory.name[: -16]  # "<kind>-" or "<file name>-<kind>-"
    for other in directory.parent.iterdir():
        if other == directory or not other.is_dir() or not other.name.startswith(prefix) \
                or len(other.name) != len(directory.name):
            continue
        try:
            old_source = json.loads((other / _HEADER).read_text(encoding="utf-8"))["ident"]["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a complete store (maybe being built by another process): left alone
        if old_source != source:
            shutil.rmtree(other, ignore_errors=True)


@contextlib.contextmanager
def _lock(directory: Path):
    import fcntl

    lock_path = directory.with_name(f".{directory.name}.lock")
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_store(path, tokenizer, *, kind: str, template: str, encoder, parse, seq_per_record: int, loss_on: str,
               on_error: str, workers: int = 1, cache_dir=None, log=None) -> ChatStore:
    """The store of ``path`` for this tokenizer: opened when a valid one exists, else built first."""
    path = check_file(path)
    key, ident = store_key(kind, path, tokenizer, template)
    directory = store_dir(kind, path, key, cache_dir)
    kw = dict(path=path, kind=kind, key=key, ident=ident, encoder=encoder, parse=parse,
              seq_per_record=seq_per_record, loss_on=loss_on, on_error=on_error, vocab_size=len(tokenizer),
              workers=workers, log=log)
    header = _validate(directory, key)
    if header is not None:
        return ChatStore(directory, header)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _lock(directory):
            header = _validate(directory, key)  # built by another process meanwhile
            if header is None:
                header = build_store(directory, **kw)
        return ChatStore(directory, header)
    except OSError as e:  # the cache location cannot be written (data errors are DataError, not OSError)
        if log:
            log(f"note: cannot write the token cache at {directory} ({e.strerror or e}); building it in a "
                "temporary directory for this run only")
    owner = tempfile.TemporaryDirectory(prefix="mateconv-cache-")
    tmp_dir = Path(owner.name) / directory.name
    header = build_store(tmp_dir, **kw)
    return ChatStore(tmp_dir, header, tmp_owner=owner)
