"""Stage 3: canonical pretraining JSONL -> packed ``.bin`` of token ids + JSON sidecar.

Each document becomes ``bos + ids(text) + eos`` (no length limit: a long document simply spans
several training windows). Ids are concatenated into a flat ``uint16`` file (``uint32`` when the
vocabulary has more than 65536 entries). The sidecar ``<name>.json`` records::

    {"dtype", "vocab_size", "tokenizer_fingerprint", "num_tokens", "num_documents", "sources",
     "bos_token_id", "eos_token_id", "max_token_id", "tokenizer", "skipped", "skipped_examples"}

Input is streamed line by line; batches of ``batch_size`` lines are encoded with the fast
tokenizer's batch call (``tokenizer(list_of_texts)``) in ``workers`` processes; output order is
the input order. The ``.bin`` and its sidecar are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError, Report, check_on_error, no_records
from .jsonl import Progress, atomic_open, check_file, ordered_map, parse_json_line, read_byte_range, strip_bom
from .paths import check_output_file

_ENCODE = None
_PACK = None
_SPECIAL: tuple = (None, None)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def batch_encoder(tokenizer, log=None):
    """``list[str] -> list of id sequences`` without special tokens, the ids of ``tokenizer.encode`` per text.

    For a GPT-2-style byte-level BPE (ours, the original's): ``tokenizer.fast_encode`` (tiktoken,
    exact, about 3x less CPU than Hugging Face). Other fast tokenizers: the Rust ``encode_batch_fast``
    (no offsets) on a private copy of the backend with truncation and padding off (2-3x faster than
    ``tokenizer(list_of_texts)``). Slow tokenizers: ``tokenizer(list_of_texts)``.
    """
    return _encoders(tokenizer, log)[0]


def _encoders(tokenizer, log=None):
    """``(encode, encode_packed or None)``; see :func:`batch_encoder`."""
    from tokenizer.fast_encode import fast_encoder

    enc, how = fast_encoder(tokenizer)
    if log:
        log(f"stage 3 encoder: {how if enc else 'Hugging Face batch encoding (' + how + ')'}")
    if enc is not None:
        return enc.encode, enc.encode_packed
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_truncation()
        fast.no_padding()
        return (lambda texts: [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]), None
    return (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]), None


def _init_worker(encoders, bos, eos, in_pool=False):
    global _ENCODE, _PACK, _SPECIAL
    if in_pool:  # one process per core already: no Rust thread pool in each (oversubscription, spinning)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODE, _PACK = encoders  # built once in the parent; forked workers inherit them
    _SPECIAL = (bos, eos)


def encode_batch(task) -> tuple:
    """Worker: ``(path, dtype, start, end, first_line)`` -> ``(bytes, n_docs, max_id, [DataError, ...])``.

    Reads bytes ``[start, end)`` of ``path`` itself (whole lines; line ``first_line`` starts at
    ``start``): the parent sends offsets, not text, so no text is pickled between processes.
    """
    path, dtype, start, end, first_line = task
    lines = read_byte_range(path, start, end)
    texts, errors = [], []
    for line, raw in enumerate(lines, start=first_line):
        raw = strip_bom(raw.rstrip(b"\r\n"), line)
        if not raw.strip():
            continue
        try:
            obj = parse_json_line(raw, path, line)
            if "text" not in obj or obj["text"] is None:
                raise DataError("missing field", file=path, line=line, field="text", reason="missing_field")
            text = obj["text"]
            if not isinstance(text, str):
                raise DataError(f"expected a string, got {type(text).__name__}", file=path, line=line, field="text",
                                reason="wrong_type")
            if not text.strip():
                raise DataError("empty text", file=path, line=line, field="text", reason="empty_text")
            texts.append(text)
        except DataError as e:
            errors.append(e)
    arr = _encode_framed(texts)
    if arr is None:
        return b"", 0, -1, errors
    return arr.astype(dtype).tobytes(), len(texts), int(arr.max()), errors


def _encode_framed(texts: list[str]) -> np.ndarray | None:
    """``bos ids eos`` of each text, concatenated (None for no texts)."""
    if not texts:
        return None
    bos, eos = _SPECIAL
    arr = _PACK(texts, [bos] if bos is not None else [], [eos]) if _PACK is not None else None
    if arr is None:
        head = [np.asarray([bos], dtype=np.int64)] if bos is not None else []
        tail = np.asarray([eos], dtype=np.int64)
        parts = []
        for ids in _ENCODE(texts):
            parts.extend(head)
            parts.append(np.asarray(ids, dtype=np.int64))
            parts.append(tail)
        arr = np.concatenate(parts)
    return arr


def _batches(inputs, dtype, batch_size, limit):
    """``(task, nbytes)`` per run of up to ``batch_size`` non-blank lines; stops after ``limit`` of them."""
    n = 0
    for path in inputs:
        start = pos = 0
        first = 1
        count = 0
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if raw.strip():
                    if limit is not None and n >= limit:
                        break
                    n += 1
                    count += 1
                pos += len(raw)
                if count >= batch_size:
                    yield (str(path), dtype.name, start, pos, first), pos - start
                    start, first, count = pos, line + 1, 0
        if pos > start:
            yield (str(path), dtype.name, start, pos, first), pos - start


def build_bin(inputs, output, tokenizer=None, *, workers: int = 1, batch_size: int = 1000,
              on_error: str = "raise", limit: int | None = None, progress: bool = True, log=print) -> dict:
    """Tokenize canonical pretraining JSONL ``inputs`` into ``output`` (``.bin``) + sidecar; returns the sidecar.

    ``tokenizer``: a directory (default: ``tokenizer.DEFAULT_TOKENIZER_DIR``) or a loaded tokenizer.
    ``on_error="skip"``: malformed lines / missing, wrong-typed or empty ``text`` are counted and
    listed in the sidecar (``skipped``) instead of stopping the build.
    """
    from tokenizer import load_tokenizer, tokenizer_fingerprint

    check_on_error(on_error)
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    for p in inputs:
        check_file(p)
    output = Path(output)
    if output.suffix != ".bin":
        raise ValueError(f"output must end with .bin: {output}")
    check_output_file(output)
    check_output_file(output.with_suffix(".json"), "sidecar path")
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tok = load_tokenizer(tokenizer)
        if tokenizer is None:
            from tokenizer import DEFAULT_TOKENIZER_DIR

            tokenizer = DEFAULT_TOKENIZER_DIR
        tok_name = str(tokenizer)
    else:
        tok, tok_name = tokenizer, getattr(tokenizer, "name_or_path", None)
    if not getattr(tok, "is_fast", False):
        log("warning: not a fast tokenizer; batch encoding will be slow")
    vocab = len(tok)
    dtype = dtype_for_vocab(vocab)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; documents could not be separated")
    report = Report(on_error, name=f"build_bin -> {output}")
    total = sum(p.stat().st_size for p in inputs)
    bar = Progress(total, desc=f"stage 3 {output.name}", enabled=progress)
    sizes: list[int] = []

    def feed():
        for task, nbytes in _batches(inputs, dtype, batch_size, limit):
            sizes.append(nbytes)
            yield task

    num_tokens = num_docs = 0
    max_id = -1
    done = 0
    with atomic_open(output, "wb", encoding=None) as f:
        # the encoders are built once here; forked workers inherit them
        for blob, n_docs, top, errors in ordered_map(encode_batch, feed(), workers, initializer=_init_worker,
                                                       initargs=(_encoders(tok, log), bos, eos, workers > 1)):
            report.seen += n_docs + len(errors)
            for e in errors:  # in line order within the batch
                report.error(e)
            f.write(blob)
            num_tokens += len(blob) // dtype.itemsize
            num_docs += n_docs
            report.keep(n_docs)
            max_id = max(max_id, top)
            bar.update(sizes[done], tokens=num_tokens)
            done += 1
        if max_id >= vocab:
            raise DataError(f"token id {max_id} >= vocab size {vocab}", file=output, reason="id_out_of_range")
        if num_docs == 0:  # nothing is written: an empty .bin would only fail later, in stage 4
            raise no_records(inputs, report, "documents")
    bar.close(tokens=num_tokens, docs=num_docs)
    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "sources": [str(p) for p in inputs],
        "bos_token_id": bos,
        "eos_token_id": eos,
        "max_token_id": max_id,
        "tokenizer": str(tok_name) if tok_name is not None else None,
        "skipped": dict(report.skipped),
        "skipped_examples": report.examples,
    }
    with atomic_open(output.with_suffix(".json")) as f:
        f.write(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
    if log:
        log(f"{output}: {num_docs:,} documents, {num_tokens:,} tokens ({dtype.name}), "
            f"skipped {report.n_skipped}" + "".join(f"\n  skipped {k}: {v}" for k, v in sorted(report.skipped.items()))
            + "".join(f"\n  e.g. {x}" for x in report.examples))
    return meta


def default_workers() -> int:
    """One worker per core, up to 8: the parent only scans line ends and writes (~5% of a core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))
