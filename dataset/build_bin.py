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

from .errors import DataError, Report, check_on_error
from .jsonl import Progress, atomic_open, check_file, iter_raw_lines, ordered_map, parse_json_line

_TOK = None
_ENCODE = None
_SPECIAL: tuple = (None, None)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def batch_encoder(tokenizer):
    """``list[str] -> list[list[int]]`` without special tokens, same ids as ``tokenizer.encode`` per text.

    For a fast tokenizer: the Rust ``encode_batch_fast`` (no offsets) on a private copy of the
    backend with truncation and padding off (2-3x faster than ``tokenizer(list_of_texts)``, which
    builds offsets and Python-side extras); otherwise ``tokenizer(list_of_texts)``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_truncation()
        fast.no_padding()
        return lambda texts: [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def _init_worker(tokenizer_or_path, bos, eos, in_pool=False):
    global _TOK, _ENCODE, _SPECIAL
    if in_pool:  # one process per core already: no Rust thread pool in each (oversubscription, spinning)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if isinstance(tokenizer_or_path, (str, Path)):
        from tokenizer import load_tokenizer

        _TOK = load_tokenizer(tokenizer_or_path)
    else:
        _TOK = tokenizer_or_path
    _ENCODE = batch_encoder(_TOK)
    _SPECIAL = (bos, eos)


def encode_batch(task) -> tuple:
    """Worker: ``(path, dtype, [(line, raw)])`` -> ``(bytes, n_docs, max_id, [DataError, ...])``."""
    path, dtype, items = task
    texts, errors = [], []
    for line, raw in items:
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
    if not texts:
        return b"", 0, -1, errors
    bos, eos = _SPECIAL
    enc = _ENCODE(texts)
    head = [bos] if bos is not None else []
    flat = []
    for ids in enc:
        flat.extend(head)
        flat.extend(ids)
        flat.append(eos)
    arr = np.asarray(flat, dtype=np.int64)
    return arr.astype(dtype).tobytes(), len(texts), int(arr.max()), errors


def _batches(inputs, dtype, batch_size, limit):
    n = 0
    for path in inputs:
        buf, nbytes = [], 0
        for line, raw in iter_raw_lines(path):
            if not raw.strip():
                nbytes += len(raw) + 1
                continue
            if limit is not None and n >= limit:
                break
            n += 1
            buf.append((line, raw))
            nbytes += len(raw) + 1
            if len(buf) >= batch_size:
                yield (str(path), dtype.name, buf), nbytes
                buf, nbytes = [], 0
        if buf or nbytes:
            yield (str(path), dtype.name, buf), nbytes


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
        # workers are forked: they inherit the loaded tokenizer instead of loading it again
        for blob, n_docs, top, errors in ordered_map(encode_batch, feed(), workers, initializer=_init_worker,
                                                       initargs=(tok, bos, eos, workers > 1)):
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
    return max(1, min(4, (os.cpu_count() or 1) - 1))
