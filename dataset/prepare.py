"""Stage 2: cleaning and formatting raw corpora into the canonical formats (module + CLI).

Canonical formats (what every later stage reads):

- **Pretraining** JSONL, one document per line: ``{"text": "..."}``.
- **SFT** JSONL: ``{"id": ..., "conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  (optional ``"task"``); a system message may only come first; earlier turns of a dialogue come
  before the last question; at least one assistant message; the last assistant message is the
  reference answer.
- **Preference pair** JSONL, one pair per line::

      {"id": ...,
       "prompt": [{"role": ..., "content": ...}, ...],   # messages up to and including the last user turn
       "chosen": "answer text", "rejected": "answer text",
       "q": "last user message", "history": [[q, a], ...],   # the original MateConv fields, kept readable
       "pos": "= chosen", "neg": "= rejected",
       "meta": {...}}

  :func:`to_canonical_pair` reads this format, the original MateConv ``{"q", "history", "pos", "neg"}``
  and the ``{"chosen": [msgs], "rejected": [msgs]}`` message-list format (shared prompt, last message
  of each list is the assistant answer); ``prompt`` / ``chosen`` / ``rejected`` decide, the other
  fields are derived for readability.
"""

from __future__ import annotations

import argparse
import ast
import collections
import csv
import functools
import hashlib
import json
import os
import re
import string
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .errors import ON_ERROR_CHOICES, DataError, Report, check_on_error
from .jsonl import (
    Progress,
    atomic_open,
    check_file,
    decode_line,
    iter_raw_lines,
    ordered_map,
    parse_json_line,
)
from .paths import OutputPathError, check_output_file

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- canonical records


def check_conversations(msgs, path=None, line=None, field: str = "conversations", *,
                        need_assistant: bool = True) -> list[dict]:
    """Validate a list of ``{"role", "content"}`` messages; returns clean copies or raises DataError."""
    if msgs is None:
        raise DataError("missing field", file=path, line=line, field=field, reason="missing_field")
    if not isinstance(msgs, list):
        raise DataError(f"expected a list of messages, got {type(msgs).__name__}", file=path, line=line,
                        field=field, reason="wrong_type")
    if not msgs:
        raise DataError("no messages", file=path, line=line, field=field, reason="empty_text")
    out = []
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"expected a message object, got {type(m).__name__}", file=path, line=line,
                            field=where, reason="wrong_type")
        role, content = m.get("role"), m.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise DataError("missing field", file=path, line=line, field=f"{where}.{missing}",
                            reason="missing_field")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} (expected one of {ROLES})", file=path, line=line,
                            field=f"{where}.role", reason="wrong_type")
        if not isinstance(content, str):
            raise DataError(f"expected a string, got {type(content).__name__}", file=path, line=line,
                            field=f"{where}.content", reason="wrong_type")
        if role == "system" and i != 0:
            raise DataError("a system message may only come first", file=path, line=line, field=where,
                            reason="wrong_type")
        if role != "system" and not content.strip():
            raise DataError("empty message", file=path, line=line, field=f"{where}.content", reason="empty_text")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError("no assistant message", file=path, line=line, field=field, reason="missing_field")
    return out


def parse_history(value, path=None, line=None, field: str = "history") -> list[list[str]]:
    """``[[q, a], ...]`` from a list, a JSON string or a Python-literal string (the original CSV)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "[]", "nan", "None"):
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError("not a list of [question, answer] pairs", file=path, line=line, field=field,
                                reason="wrong_type") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list of [question, answer] pairs, got {type(value).__name__}", file=path,
                        line=line, field=field, reason="wrong_type")
    out = []
    for i, pair in enumerate(value):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)):
            raise DataError("expected a [question, answer] pair of strings", file=path, line=line,
                            field=f"{field}[{i}]", reason="wrong_type")
        out.append([pair[0], pair[1]])
    return out


def history_to_messages(history: list[list[str]]) -> list[dict]:
    msgs = []
    for q, a in history:
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": a})
    return msgs


def messages_to_history(msgs: list[dict]) -> tuple[list[list[str]], str | None]:
    """Split prompt messages (ending with a user turn) into ``history`` pairs and the last question."""
    body = [m for m in msgs if m["role"] != "system"]
    q = body[-1]["content"] if body and body[-1]["role"] == "user" else None
    rest = body[:-1] if q is not None else body
    history, pending = [], None
    for m in rest:
        if m["role"] == "user":
            pending = m["content"]
        elif pending is not None:
            history.append([pending, m["content"]])
            pending = None
    return history, q


def _req_str(obj, field, path, line, *, allow_empty=False):
    if field not in obj or obj[field] is None:
        raise DataError("missing field", file=path, line=line, field=field, reason="missing_field")
    v = obj[field]
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {type(v).__name__}", file=path, line=line, field=field,
                        reason="wrong_type")
    if not allow_empty and not v.strip():
        raise DataError("empty", file=path, line=line, field=field, reason="empty_text")
    return v


def make_pair(prompt: list[dict], chosen: str, rejected: str, *, id=None, meta=None) -> dict:
    history, q = messages_to_history(prompt)
    return {"id": id, "prompt": prompt, "chosen": chosen, "rejected": rejected, "q": q, "history": history,
            "pos": chosen, "neg": rejected, "meta": dict(meta or {})}


def to_canonical_pair(obj: dict, path=None, line=None) -> dict:
    """Any accepted preference record -> the canonical pair (see module docstring); raises DataError."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=path, line=line,
                        reason="wrong_type")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if "prompt" in obj:  # canonical
        prompt = check_conversations(obj["prompt"], path, line, "prompt", need_assistant=False)
        if prompt[-1]["role"] != "user":
            raise DataError("the prompt must end with a user message", file=path, line=line, field="prompt",
                            reason="wrong_type")
        chosen = _req_str(obj, "chosen", path, line)
        rejected = _req_str(obj, "rejected", path, line)
        return make_pair(prompt, chosen, rejected, id=obj.get("id"), meta=meta)
    if "pos" in obj or "neg" in obj or "q" in obj:  # original MateConv {"q","history","pos","neg"}
        q = _req_str(obj, "q", path, line)
        history = parse_history(obj.get("history"), path, line)
        chosen = _req_str(obj, "pos", path, line)
        rejected = _req_str(obj, "neg", path, line)
        prompt = history_to_messages(history) + [{"role": "user", "content": q}]
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            prompt.insert(0, {"role": "system", "content": obj["system"]})
        return make_pair(prompt, chosen, rejected, id=obj.get("id"), meta=meta)
    if "chosen" in obj or "rejected" in obj:  # {"chosen": [msgs], "rejected": [msgs]}
        ch = check_conversations(obj.get("chosen"), path, line, "chosen")
        rj = check_conversations(obj.get("rejected"), path, line, "rejected")
        for name, msgs in (("chosen", ch), ("rejected", rj)):
            if msgs[-1]["role"] != "assistant":
                raise DataError("the last message must be the assistant answer", file=path, line=line,
                                field=name, reason="wrong_type")
        if ch[:-1] != rj[:-1]:
            raise DataError("chosen and rejected have different prompts", file=path, line=line,
                            field="rejected", reason="wrong_type")
        prompt = ch[:-1]
        if not prompt or prompt[-1]["role"] != "user":
            raise DataError("the prompt must end with a user message", file=path, line=line, field="chosen",
                            reason="wrong_type")
        return make_pair(prompt, ch[-1]["content"], rj[-1]["content"], id=obj.get("id"), meta=meta)
    raise DataError("not a preference record (expected prompt/chosen/rejected, q/history/pos/neg or "
                    "chosen/rejected message lists)", file=path, line=line, field="chosen", reason="missing_field")


# --------------------------------------------------------------------------- normalisation and filters

_TRANSLATE: dict[int, str | None] = {}
for _lo, _hi in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A)):  # fullwidth digits and Latin letters
    for _cp in range(_lo, _hi + 1):
        _TRANSLATE[_cp] = chr(_cp - 0xFEE0)
for _cp in (0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000):  # exotic spaces -> " "
    _TRANSLATE[_cp] = " "
for _cp in (0x00AD, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x7F, *range(0x80, 0xA0),  # invisible / control
            *(c for c in range(0x20) if c not in (0x09, 0x0A))):
    _TRANSLATE[_cp] = None

_MANY_NEWLINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def normalize_text(text: str) -> str:
    """Unicode clean-up that keeps Chinese punctuation.

    NFC (canonical composition only), then: fullwidth digits and Latin letters -> ASCII
    (``Ａ１`` -> ``A1``); exotic spaces (NBSP, U+2000..U+200A, ideographic space U+3000) -> a space;
    zero-width characters, BOM, soft hyphen and control characters (except tab and newline) removed;
    CR/CRLF -> LF; trailing spaces of lines removed; 3+ newlines -> 2; outer whitespace stripped.
    NFKC is *not* used: it would turn ``，。！？：；（）`` -> ``,.!?:;()`` and change Chinese text.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text).translate(_TRANSLATE)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f\U00030000-\U000323af]")
_PUNCT_CHARS = re.escape(string.punctuation) + (
    "\u00a1\u00a7\u00ab\u00b6\u00b7\u00bb\u00bf"  # Latin-1 punctuation
    "\u2010-\u205e"  # general punctuation: dashes, quotes “”‘’, …, ‧
    "\u3001-\u3003\u3008-\u3011\u3014-\u301f\u30fb"  # CJK punctuation: 、。〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟・
    "\ufe10-\ufe19\ufe30-\ufe6b"  # vertical / compatibility / small forms
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"  # fullwidth ！＂＃…／：；＜＝＞？＠［＼］＾＿｀｛｜｝～ and halfwidth 。「」、・
)
_NOT_COUNTED = re.compile(rf"[\s\d{_PUNCT_CHARS}]")


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among the *counted* characters of ``text``.

    Counted = every character except whitespace, digits and punctuation (ASCII punctuation and
    symbols, general punctuation such as “”…—, CJK punctuation such as ，。、《》「」【】, fullwidth
    forms). Those are script-neutral, so they are left out of both numerator and denominator: a
    Chinese sentence full of ，。 and numbers such as "2023年增长1.3%" still scores 1.0, and "OK!!!"
    scores 0.0. Latin (and any other non-CJK) letters count against. Text with no counted
    character scores 0.0. (Dividing by the raw length instead would let whitespace, punctuation
    and digits push real Chinese text under the 0.7 threshold.)
    """
    counted = len(text) - len(_NOT_COUNTED.findall(text))
    if counted <= 0:
        return 0.0
    return len(_CJK.findall(text)) / counted


def text_hash(text: str) -> int:
    """8-byte hash for exact dedup: a set of these ints costs ~70 bytes per document in CPython,
    i.e. ~7 GB for 100M documents (the seq-monkey corpus has ~13M lines: ~1 GB)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# --------------------------------------------------------------------------- converters (one record each)

PRETRAIN_FORMATS = ("seqmonkey",)
SFT_FORMATS = ("deepctrl", "csv", "sft")
PREF_FORMATS = ("pairs", "chosen_rejected", "canonical")
FORMATS = ("auto", *PRETRAIN_FORMATS, *SFT_FORMATS, *PREF_FORMATS)


def seqmonkey_to_pretrain(obj: dict, path=None, line=None) -> dict:
    """seq-monkey ``{"text": ...}`` (also our canonical pretraining format) -> ``{"text"}``."""
    return {"text": _req_str(obj, "text", path, line)}


def deepctrl_to_sft(obj: dict, path=None, line=None, system: str | None = None) -> dict:
    """deepctrl-sft-data record -> canonical SFT.

    The question is ``instruction`` and ``input`` joined by a newline (either may be empty, not
    both); the answer is ``output``; ``history`` ([[q, a], ...]) becomes earlier turns; ``id`` is
    kept and ``category`` becomes ``task``; ``system`` (optional) is prepended as a system message.
    """
    instruction = _req_str(obj, "instruction", path, line, allow_empty=True) if "instruction" in obj else ""
    inp = _req_str(obj, "input", path, line, allow_empty=True) if "input" in obj else ""
    if "instruction" not in obj and "input" not in obj:
        raise DataError("missing field", file=path, line=line, field="input", reason="missing_field")
    q = "\n".join(x for x in (instruction.strip(), inp.strip()) if x)
    if not q:
        raise DataError("empty question (instruction and input are both empty)", file=path, line=line,
                        field="input", reason="empty_text")
    a = _req_str(obj, "output", path, line)
    history = parse_history(obj.get("history"), path, line)
    msgs = ([{"role": "system", "content": system}] if system else []) + history_to_messages(history)
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    out = {"id": obj.get("id"), "conversations": msgs}
    if isinstance(obj.get("category"), str):
        out["task"] = obj["category"]
    return out


def csv_row_to_sft(row: dict, path=None, line=None, system: str | None = None) -> dict:
    """Original MateConv CSV row (``history,q,a``; history a Python-literal list) -> canonical SFT."""
    q = _req_str(row, "q", path, line)
    a = _req_str(row, "a", path, line)
    history = parse_history(row.get("history"), path, line)
    msgs = ([{"role": "system", "content": system}] if system else []) + history_to_messages(history)
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"id": row.get("id") or None, "conversations": msgs}


def canonical_sft(obj: dict, path=None, line=None, system: str | None = None) -> dict:
    """Canonical SFT record -> itself, validated (extra fields such as ``task``/``answer`` kept)."""
    msgs = check_conversations(obj.get("conversations"), path, line)
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    out = {"id": obj.get("id"), **obj}  # other fields (task, answer, ...) are kept as they are
    out["conversations"] = msgs
    return out


def detect_format(kind: str, path, first: dict | None) -> str:
    """Guess the input format from the file name and the keys of its first record."""
    if str(path).endswith(".csv"):
        return "csv"
    keys = set(first or ())
    if kind == "pretrain":
        return "seqmonkey"
    if kind == "sft":
        if "conversations" in keys:
            return "sft"
        return "deepctrl"
    if "prompt" in keys:
        return "canonical"
    if "chosen" in keys:
        return "chosen_rejected"
    return "pairs"


# --------------------------------------------------------------------------- the cleaning job


@dataclass(frozen=True)
class Options:
    kind: str
    fmt: str = "auto"
    lang: str = "zh"
    zh_ratio: float = 0.7
    en_ratio: float = 0.1
    min_chars: int = 0
    max_chars: int = 0
    min_q_chars: int = 0
    max_q_chars: int = 0
    system: str | None = None
    normalize: bool = True


DEFAULTS = {  # per kind: min_chars, max_chars (answer for sft/prefs), min_q_chars, max_q_chars; 0 = no limit
    "pretrain": (5, 0, 0, 0),  # long documents are kept: stage 3 splits them across windows
    "sft": (5, 512, 10, 512),  # the original MateConv filter (answer 5-512, question 10-512 chars)
    "prefs": (1, 0, 1, 0),
}


def _length_reason(n: int, lo: int, hi: int, what: str) -> str | None:
    if lo and n < lo:
        return f"{what}too_short"
    if hi and n > hi:
        return f"{what}too_long"
    return None


def _lang_reason(text: str, opts: Options) -> str | None:
    if opts.lang == "zh" and not cjk_ratio(text) > opts.zh_ratio:
        return "not_chinese"
    if opts.lang == "en" and not cjk_ratio(text) < opts.en_ratio:
        return "not_english"
    return None


def _norm_msgs(msgs, opts):
    if not opts.normalize:
        return msgs
    return [{"role": m["role"], "content": normalize_text(m["content"])} for m in msgs]


def convert_record(rec, fmt: str, opts: Options, path, line) -> tuple[str, object, int]:
    """One raw record -> ``("keep", canonical_record, hash)`` or ``("drop", reason, 0)``; raises DataError."""
    if opts.kind == "pretrain":
        text = seqmonkey_to_pretrain(rec, path, line)["text"]
        if opts.normalize:
            text = normalize_text(text)
        reason = "empty_after_normalisation" if not text else \
            _length_reason(len(text), opts.min_chars, opts.max_chars, "") or _lang_reason(text, opts)
        return ("drop", reason, 0) if reason else ("keep", {"text": text}, text_hash(text))
    if opts.kind == "sft":
        conv = {"deepctrl": deepctrl_to_sft, "csv": csv_row_to_sft, "sft": canonical_sft}[fmt](
            rec, path, line, system=opts.system)
        msgs = _norm_msgs(conv["conversations"], opts)
        conv["conversations"] = msgs
        body = [m for m in msgs if m["role"] != "system"]
        if any(not m["content"] for m in body):
            return "drop", "empty_after_normalisation", 0
        q = next(m["content"] for m in reversed(body) if m["role"] == "user") if any(
            m["role"] == "user" for m in body) else ""
        a = next(m["content"] for m in reversed(body) if m["role"] == "assistant")
        reason = (_length_reason(len(q), opts.min_q_chars, opts.max_q_chars, "question_")
                  or _length_reason(len(a), opts.min_chars, opts.max_chars, "answer_")
                  or _lang_reason("\n".join(m["content"] for m in body), opts))
        if reason:
            return "drop", reason, 0
        return "keep", conv, text_hash(json.dumps(msgs, ensure_ascii=False, sort_keys=True))
    # prefs
    pair = to_canonical_pair(rec, path, line)
    prompt = _norm_msgs(pair["prompt"], opts)
    chosen, rejected = pair["chosen"], pair["rejected"]
    if opts.normalize:
        chosen, rejected = normalize_text(chosen), normalize_text(rejected)
    if not chosen or not rejected or any(not m["content"] for m in prompt if m["role"] != "system"):
        return "drop", "empty_after_normalisation", 0
    if chosen == rejected:
        return "drop", "identical_pair", 0
    q = prompt[-1]["content"]
    reason = (_length_reason(len(q), opts.min_q_chars, opts.max_q_chars, "question_")
              or _length_reason(min(len(chosen), len(rejected)), opts.min_chars, 0, "answer_")
              or _length_reason(max(len(chosen), len(rejected)), 0, opts.max_chars, "answer_")
              or _lang_reason("\n".join([q, chosen]), opts))
    if reason:
        return "drop", reason, 0
    out = make_pair(prompt, chosen, rejected, id=pair.get("id"), meta=pair.get("meta"))
    return "keep", out, text_hash(json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True))


def process_chunk(opts: Options, chunk) -> list[tuple]:
    """Worker: ``(path, fmt, [(line, raw)])`` -> ``[(line, status, payload, hash)]`` in input order.

    ``raw`` is bytes (a JSONL line) or a dict (a parsed CSV row). status: ``keep`` (payload: the
    output JSON line), ``drop`` (payload: reason) or ``error`` (payload: the DataError).
    """
    path, fmt, items = chunk
    out = []
    for line, raw in items:
        try:
            rec = raw if isinstance(raw, dict) else parse_json_line(raw, path, line)
            status, payload, h = convert_record(rec, fmt, opts, path, line)
            if status == "keep":
                payload = json.dumps(payload, ensure_ascii=False)
            out.append((line, status, payload, h))
        except DataError as e:
            out.append((line, "error", e, 0))
    return out


def _csv_items(path, report: Report):
    """Stream an original-format CSV (``history,q,a``) -> ``(line, row_dict)``; multi-line cells work."""
    state = {"line": 0, "bytes": 0}

    def lines():
        for line, raw in iter_raw_lines(path):
            state["line"] = line
            state["bytes"] += len(raw) + 1
            try:
                yield decode_line(raw, path, line) + "\n"
            except DataError as e:
                report.error(e)

    reader = csv.reader(lines())
    header = next(reader, None)
    if header is None:
        raise DataError("empty CSV (no header)", file=path, line=1, reason="empty_text")
    header = [h.strip() for h in header]
    for col in ("q", "a"):
        if col not in header:
            raise DataError(f"missing column (header is {header})", file=path, line=1, field=col,
                            reason="missing_field")
    end, used = state["line"], 0
    for row in reader:
        start, end = end + 1, state["line"]
        size, used = state["bytes"] - used, state["bytes"]
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            report.seen += 1
            report.error(DataError(f"{len(row)} cells for {len(header)} columns", file=path, line=start,
                                   reason="malformed_csv"))
            continue
        yield start, dict(zip(header, row)), size


def _jsonl_items(path):
    for line, raw in iter_raw_lines(path):
        if raw.strip():
            yield line, raw, len(raw) + 1


def _first_record(path) -> dict | None:
    for line, raw in iter_raw_lines(path):
        if raw.strip():
            try:
                return parse_json_line(raw, path, line)
            except DataError:
                return None
    return None


def prepare(kind: str, inputs, output, *, fmt: str = "auto", lang: str = "zh", workers: int = 1,
            on_error: str = "raise", min_chars: int | None = None, max_chars: int | None = None,
            min_q_chars: int | None = None, max_q_chars: int | None = None, zh_ratio: float = 0.7,
            en_ratio: float = 0.1, system: str | None = None, dedup: bool = True, normalize: bool = True,
            limit: int | None = None, chunk_lines: int = 2000, summary_path=None, progress: bool = True,
            log=print) -> Report:
    """Clean and convert ``inputs`` (files, streamed in order) into one canonical JSONL ``output``.

    Returns the :class:`Report` (kept, dropped by reason, skipped by reason) and writes it as JSON to
    ``summary_path`` (default ``<output>.summary.json``). ``limit``: stop after that many records.
    The output is written atomically; its order follows the input order whatever ``workers`` is.
    """
    if kind not in DEFAULTS:
        raise ValueError(f"kind must be one of {tuple(DEFAULTS)}, got {kind!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if lang not in ("zh", "en", "any"):
        raise ValueError(f"lang must be zh, en or any, got {lang!r}")
    check_on_error(on_error)
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    for p in inputs:
        check_file(p)
    summary_path = Path(summary_path) if summary_path else Path(str(output) + ".summary.json")
    check_output_file(output)  # before any work: a wrong output path is found now, not at the end
    check_output_file(summary_path, "summary path")
    d = DEFAULTS[kind]
    opts = Options(kind=kind, lang=lang, zh_ratio=zh_ratio, en_ratio=en_ratio, system=system, normalize=normalize,
                   min_chars=d[0] if min_chars is None else min_chars,
                   max_chars=d[1] if max_chars is None else max_chars,
                   min_q_chars=d[2] if min_q_chars is None else min_q_chars,
                   max_q_chars=d[3] if max_q_chars is None else max_q_chars)
    report = Report(on_error, name=f"prepare {kind} -> {output}")
    seen_hashes: set[int] = set()
    total_bytes = sum(p.stat().st_size for p in inputs)
    bar = Progress(total_bytes, desc=f"prepare {kind}", enabled=progress)

    def chunks():
        n = 0
        for path in inputs:
            f = fmt
            if f == "auto":
                f = detect_format(kind, path, None if str(path).endswith(".csv") else _first_record(path))
            allowed = {"pretrain": PRETRAIN_FORMATS, "sft": SFT_FORMATS, "prefs": PREF_FORMATS}[kind]
            if f not in allowed:
                raise ValueError(f"format {f!r} is not a {kind} format (one of {allowed})")
            items = _csv_items(path, report) if f == "csv" else _jsonl_items(path)
            buf, nbytes = [], 0
            for line, raw, size in items:
                if limit is not None and n >= limit:
                    break
                n += 1
                buf.append((line, raw))
                nbytes += size
                if len(buf) >= chunk_lines:
                    yield (str(path), f, buf), nbytes
                    buf, nbytes = [], 0
            if buf:
                yield (str(path), f, buf), nbytes
            if limit is not None and n >= limit:
                return

    sizes: collections.deque = collections.deque()

    def feed():
        for chunk, nbytes in chunks():
            sizes.append(nbytes)
            yield chunk

    with atomic_open(output) as out:
        for results in ordered_map(functools.partial(process_chunk, opts), feed(), workers):
            for _line, status, payload, h in results:
                report.seen += 1
                if status == "error":
                    report.error(payload)
                elif status == "drop":
                    report.drop(payload)
                elif dedup and h in seen_hashes:
                    report.drop("duplicate")
                else:
                    if dedup:
                        seen_hashes.add(h)
                    out.write(payload + "\n")
                    report.keep()
            bar.update(sizes.popleft() if sizes else 0, kept=report.kept)
    bar.close(kept=report.kept)
    report.write(summary_path)
    if log:
        log(report.format())
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataset.prepare", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Defaults (0 = no limit): " + ", ".join(
                                     f"{k}: chars {v[0]}-{v[1]}, question {v[2]}-{v[3]}" for k, v in DEFAULTS.items()))
    ap.add_argument("kind", choices=tuple(DEFAULTS), help="pretrain: {text}; sft: conversations; prefs: pairs")
    ap.add_argument("--input", nargs="+", required=True, help="input file(s): JSONL, or CSV (history,q,a)")
    ap.add_argument("--output", required=True, help="canonical JSONL to write")
    ap.add_argument("--format", default="auto", choices=FORMATS, dest="fmt")
    ap.add_argument("--lang", default="zh", choices=("zh", "en", "any"),
                    help="zh keeps CJK ratio > --zh_ratio, en keeps < --en_ratio (see cjk_ratio)")
    ap.add_argument("--zh_ratio", type=float, default=0.7)
    ap.add_argument("--en_ratio", type=float, default=0.1)
    ap.add_argument("--min_chars", type=int, default=None, help="text (pretrain) or answer (sft, prefs) min length")
    ap.add_argument("--max_chars", type=int, default=None)
    ap.add_argument("--min_q_chars", type=int, default=None, help="question min length (sft, prefs)")
    ap.add_argument("--max_q_chars", type=int, default=None)
    ap.add_argument("--system", default=None, help="system message to prepend to SFT conversations")
    ap.add_argument("--no_dedup", action="store_true")
    ap.add_argument("--no_normalize", action="store_true")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--chunk_lines", type=int, default=2000)
    ap.add_argument("--limit", type=int, default=None, help="stop after this many input records")
    ap.add_argument("--on_error", default="raise", choices=ON_ERROR_CHOICES)
    ap.add_argument("--summary", default=None, help="summary JSON (default <output>.summary.json)")
    args = ap.parse_args(argv)
    try:
        prepare(args.kind, args.input, args.output, fmt=args.fmt, lang=args.lang, workers=args.workers,
                on_error=args.on_error, min_chars=args.min_chars, max_chars=args.max_chars,
                min_q_chars=args.min_q_chars, max_q_chars=args.max_q_chars, zh_ratio=args.zh_ratio,
                en_ratio=args.en_ratio, system=args.system, dedup=not args.no_dedup,
                normalize=not args.no_normalize, limit=args.limit, chunk_lines=args.chunk_lines,
                summary_path=args.summary)
    except (DataError, OutputPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
