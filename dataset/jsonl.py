"""Streaming JSONL reading with line numbers, atomic writing, ordered multiprocess map, progress.

Nothing here loads a file whole: lines are read one at a time in binary, decoded strictly as UTF-8
(an invalid byte is reported with file, line and byte offset) and parsed as JSON objects.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import DataError, Report, missing_file


def check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, "input file" if not path.exists() else "input file (not a regular file)")
    return path


UTF8_BOM = b"\xef\xbb\xbf"


def strip_bom(raw: bytes, line: int) -> bytes:
    """A UTF-8 byte order mark at the start of the file (line 1) is not part of the first record."""
    return raw[len(UTF8_BOM):] if line == 1 and raw.startswith(UTF8_BOM) else raw


def iter_raw_lines(path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for every line (1-based), newline stripped; streams.
    A UTF-8 byte order mark at the start of the file is removed."""
    path = check_file(path)
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            yield i, strip_bom(raw.rstrip(b"\r\n"), i)


def read_byte_range(path, start: int, end: int) -> list[bytes]:
    """The lines (without their ``\\n``) in bytes ``[start, end)`` of ``path``, a range of whole lines: how
    worker processes read their part of a JSONL file themselves (the parent sends offsets, not text)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return lines


def decode_line(raw: bytes, path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r})", file=path, line=line,
                        reason="invalid_utf8") from None


def parse_json_line(raw: bytes | str, path, line: int) -> dict:
    """Decode (strict UTF-8) and parse one JSONL line into a dict, or raise a located DataError."""
    text = decode_line(raw, path, line) if isinstance(raw, bytes) else raw
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} at column {e.colno}", file=path, line=line,
                        reason="malformed_json") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=path, line=line,
                        reason="wrong_type")
    if "\\ud" in text or "\\uD" in text:  # only a \u escape can make a lone surrogate: check then
        _check_surrogates(obj, path, line)
    return obj


def _check_surrogates(value, path, line: int, field: str | None = None) -> None:
    """Raise for a string holding an unpaired surrogate (e.g. ``"\\ud800"``): not encodable, not text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"lone surrogate U+{ord(value[e.start]):04X} at character {e.start} (an unpaired "
                            f"\\u escape)", file=path, line=line, field=field, reason="invalid_unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_surrogates(k, path, line, field)
            _check_surrogates(v, path, line, k if field is None else f"{field}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_surrogates(v, path, line, f"{field}[{i}]" if field else f"[{i}]")


def iter_jsonl(path, report: Report | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; bad lines go through ``report``
    (raise by default, or counted skips)."""
    for line, raw in iter_raw_lines(path):
        if not raw.strip():
            continue
        if report is not None:
            report.seen += 1
        try:
            yield line, parse_json_line(raw, path, line)
        except DataError as e:
            if report is None:
                raise
            report.error(e)


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer"}


def require(obj: dict, field: str, typ, path, line: int, *, nonempty: bool = False, optional: bool = False):
    """Return ``obj[field]`` checked to be of ``typ``; a missing / wrong-typed / empty field raises."""
    if field not in obj or obj[field] is None:
        if optional:
            return None
        raise DataError("missing field", file=path, line=line, field=field, reason="missing_field")
    value = obj[field]
    if not isinstance(value, typ) or isinstance(value, bool):
        want = _TYPE_NAMES.get(typ, getattr(typ, "__name__", str(typ))) if not isinstance(typ, tuple) else \
            " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in typ)
        raise DataError(f"expected {want}, got {type(value).__name__}", file=path, line=line, field=field,
                        reason="wrong_type")
    if nonempty and (len(value) == 0 or (isinstance(value, str) and not value.strip())):
        raise DataError("empty", file=path, line=line, field=field, reason="empty_text")
    return value


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file next to ``path`` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if "b" in mode:
            f = open(tmp, mode)
        else:
            f = open(tmp, mode, encoding=encoding, newline="\n")
        with f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ": "))


def write_jsonl(path, records: Iterable[dict]) -> int:
    n = 0
    with atomic_open(path) as f:
        for rec in records:
            f.write(dumps(rec) + "\n")
            n += 1
    return n


def ordered_map(fn: Callable, items: Iterable, workers: int = 1, initializer=None, initargs=(),
                max_pending: int | None = None) -> Iterator:
    """``map(fn, items)`` across ``workers`` processes, results in input order, bounded memory.

    ``multiprocessing.Pool.imap`` would do the same, but its feeder thread reads the whole input
    eagerly (a 31 GB file would end up in the task queue). Here a sliding window of at most
    ``max_pending`` (default ``4 * workers``) tasks is in flight (``Pool.apply_async``); results are
    taken in submission order and each one taken lets the next item be read. ``workers <= 1`` runs
    in this process (no pool). Workers are forked, so they inherit ``initargs`` without pickling.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    import itertools
    import multiprocessing as mp

    window = max_pending or 4 * workers
    it = iter(items)
    with mp.get_context("fork").Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        # keep up to `window` chunks in flight: refill as results are consumed (ordered)
        for item in itertools.islice(it, window):
            pending.append(pool.apply_async(fn, (item,)))
        while pending:
            result = pending.popleft().get()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append(pool.apply_async(fn, (nxt,)))
            yield result


_END = object()


class Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (for nohup logs)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "B", interval: float = 10.0,
                 enabled: bool = True, stream=None):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = None
        self.start = self.last = time.time()
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=self.stream)
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, n: int, **postfix) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.time()
        if now - self.last >= self.interval:
            self.last = now
            self._line(postfix)

    def _line(self, postfix: dict) -> None:
        el = max(time.time() - self.start, 1e-9)
        pct = f" {100 * self.n / self.total:5.1f}%" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in postfix.items())
        print(f"[{self.desc}]{pct} {self.n:,} {self.unit} in {el:.0f}s ({self.n / el:,.0f} {self.unit}/s){extra}",
              file=self.stream, flush=True)

    def close(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line(postfix)
