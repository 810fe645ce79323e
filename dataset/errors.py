"""Data errors that name the file, line and field, and the ``--on_error {raise,skip}`` bookkeeping.

Every record-level problem in the data stages (stage 2 cleaning, stage 3 ``.bin`` build, the torch
datasets) is raised as a :class:`DataError` whose message starts with ``file:line`` (and names the
field when one is at fault), e.g.::

    data/sft.jsonl:17: field 'conversations': expected a list, got str [wrong_type]

With ``on_error="skip"`` a :class:`Report` turns record-level errors into counted skips: the record
is left out, its ``reason`` is counted and the first few messages are kept as examples for the
summary. File-level problems (a missing file, a ``.bin`` built with another tokenizer) always raise.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

ON_ERROR_CHOICES = ("raise", "skip")


class DataError(ValueError):
    """A problem in input data, located by file, line (or token position) and field.

    ``reason`` is a short code used to count skips (``malformed_json``, ``invalid_utf8``, ``invalid_unicode``,
    ``missing_field``, ``wrong_type``, ``empty_text``, ``too_long``, ``id_out_of_range``,
    ``fingerprint_mismatch``, ``missing_file``, ``empty_file``, ``no_usable_records``, ...).
    """

    def __init__(self, message: str, *, file=None, line: int | None = None, field: str | None = None,
                 reason: str = "invalid", position: int | None = None):
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.reason = reason
        self.position = position
        self.detail = message
        loc = self.file or "<input>"
        if line is not None:
            loc += f":{line}"
        if position is not None:
            loc += f" (token {position})"
        text = f"{loc}: "
        if field is not None:
            text += f"field {field!r}: "
        text += f"{message} [{reason}]"
        super().__init__(text)

    def __reduce__(self):  # picklable across worker processes
        return (_rebuild, (self.detail, self.file, self.line, self.field, self.reason, self.position))


def _rebuild(message, file, line, field, reason, position):
    return DataError(message, file=file, line=line, field=field, reason=reason, position=position)


def missing_file(path, what: str = "file") -> DataError:
    return DataError(f"{what} not found", file=path, reason="missing_file")


def no_records(path, report: Report, what: str = "records") -> DataError:
    """The input held nothing usable: it is empty, or every record was skipped or dropped (reasons named)."""
    if isinstance(path, (list, tuple)):
        path = ", ".join(str(p) for p in path)
    if report.seen == 0:
        return DataError(f"no {what}: the input is empty", file=path, reason="empty_file")
    parts = [f"{r} {n}" for r, n in sorted(report.skipped.items())] + \
        [f"dropped {r} {n}" for r, n in sorted(report.dropped.items())]
    msg = f"no usable {what}: all {report.seen} skipped ({', '.join(parts) or 'no reason recorded'})"
    msg += "".join(f"\n  e.g. {x}" for x in report.examples[:5])
    return DataError(msg, file=path, reason="no_usable_records")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


class Report:
    """Counts kept records, filter drops and skipped errors; raises errors when ``on_error='raise'``.

    - ``kept``: records written / used.
    - ``dropped[reason]``: records removed on purpose by a filter (duplicate, too short, language ...).
    - ``skipped[reason]``: bad records left out because ``on_error='skip'``.
    """

    def __init__(self, on_error: str = "raise", max_examples: int = 10, name: str = ""):
        self.on_error = check_on_error(on_error)
        self.name = name
        self.max_examples = max_examples
        self.kept = 0
        self.seen = 0
        self.dropped: Counter = Counter()
        self.skipped: Counter = Counter()
        self.examples: list[str] = []

    def error(self, err: DataError) -> None:
        """Raise ``err`` (on_error=raise) or count it as a skip (on_error=skip)."""
        if self.on_error == "raise":
            raise err
        self.skipped[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def keep(self, n: int = 1) -> None:
        self.kept += n

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: Report) -> None:
        self.kept += other.kept
        self.seen += other.seen
        self.dropped.update(other.dropped)
        self.skipped.update(other.skipped)
        room = self.max_examples - len(self.examples)
        if room > 0:
            self.examples.extend(other.examples[:room])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "records": self.seen,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": list(self.examples),
        }

    def format(self) -> str:
        lines = [f"{self.name or 'summary'}: {self.seen} records, kept {self.kept}, "
                 f"dropped {self.n_dropped}, skipped {self.n_skipped}"]
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {reason}: {n}")
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {n}")
        for ex in self.examples:
            lines.append(f"  e.g. {ex}")
        return "\n".join(lines)

    def write(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
