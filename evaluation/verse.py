"""Verse form and degeneration of generated answers (``write_poem`` / ``continue_line``).

Usage::

    from evaluation.verse import verse_summary
    summary = verse_summary(generation_records)   # records of evaluation.generate_eval (task, prompt,
                                                  # prediction, reference); also scores the references

Form (:func:`form_check`), for a request with ``n`` characters per half-line (五言: 5, 七言: 7):

* the text is split into lines at newlines (the corpus writes one couplet per line) and each line into
  half-lines at punctuation; a **half-line** is the Han characters before one of ``，。？！；：、``;
* ``half_lines_ok``: every half-line has exactly ``n`` Han characters and nothing else but its
  punctuation (no Latin, digits, stray symbols);
* ``punctuation_ok``: the half-lines pair up into couplets, the first closed by a mid-line mark
  (``，；：、？！``), the second by an end mark (``。？！；``) (a line may hold one couplet or several);
* ``line_count_ok``: 绝句 = 4 half-lines (2 lines), 律诗 = 8 (4 lines), 排律 = at least 12; 古诗: any even
  number of half-lines of at least 4;
* ``form_ok`` = all three (the *form rate* is its mean over the requests that name a form).

``continue_line`` asks for the line after a given one; in regulated verse it has the same length, so the
request is ``n`` = the length of the given line when it is 5 or 7: ``form_ok`` = the answer is one
half-line of ``n`` Han characters (closing punctuation optional).

Degeneration (:func:`degeneration`), on the characters of the text without whitespace (punctuation
stays: an answer of commas only, ``，，，，``, is as degenerate as ``这这这``):

* ``distinct_1`` / ``distinct_2``: distinct character uni-/bigrams / all uni-/bigrams of the text;
* ``repetition_rate``: share of the text's character bigrams that already occurred earlier in the same
  text (静夜思: 1 of 23 = 0.04; ``这，这，这，``: 3 of 5 = 0.6; ``，，，，``: 2 of 3);
* ``degenerate``: ``repetition_rate >= 0.3``, or ``distinct_1 <= 0.5`` (with at least 3 characters), or a
  loop (a unit of 1-4 characters three times in a row: ``这这这``, ``代的代的代的``, ``《《《``), or an empty text.

:func:`verse_summary` gives, per task and for the two tasks together, the means with bootstrap 95% CIs
over examples of the model's answers and the same measures of the **reference answers** (the floor a
model is compared to: the SFT data's own repetition rate).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .metrics import bootstrap_mean_ci

VERSE_TASKS = ("write_poem", "continue_line")
MID_MARKS = "，；：、？！"
END_MARKS = "。？！；"
ALL_MARKS = "，。？！；：、"
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_LOOP_RE = re.compile(r"(.{1,4})\1\1")  # a unit of 1-4 characters three times in a row
_FORM_RE = re.compile(r"([五七])言(绝句|律诗|排律|古诗)")
_GIVEN_RE = (re.compile(r"“([^”]+)”"), re.compile(r"(?:请接出下一句|对出下句)：\s*(\S+)"))


def han(text: str) -> str:
    return "".join(_HAN.findall(text or ""))


def requested_form(prompt: str) -> dict | None:
    """``{"chars": 5|7, "form": "五言绝句"...}`` from a write-poem request naming a form, else ``None``."""
    m = _FORM_RE.search(prompt or "")
    if not m:
        return None
    return {"chars": 5 if m.group(1) == "五" else 7, "form": m.group(), "kind": m.group(2)}


def given_line(prompt: str) -> str | None:
    """The line a continue-line request gives (``“…”`` or after ``请接出下一句：`` / ``对出下句：``)."""
    for rx in _GIVEN_RE:
        m = rx.search(prompt or "")
        if m:
            return m.group(1).strip().rstrip(ALL_MARKS)
    return None


def _half_lines(line: str) -> list[tuple[str, str]]:
    """(content, closing mark or "") pieces of one line."""
    out, cur = [], ""
    for ch in line:
        if ch in ALL_MARKS:
            out.append((cur, ch))
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append((cur, ""))
    return out


def form_check(text: str, chars: int, kind: str = "绝句") -> dict:
    """Form of a generated poem for a request of ``chars`` per half-line and ``kind`` (绝句/律诗/排律/古诗)."""
    lines = [ln.strip() for ln in (text or "").strip().split("\n") if ln.strip()]
    halves = [h for ln in lines for h in _half_lines(ln)]
    half_ok = bool(halves) and all(len(c) == chars and han(c) == c for c, _ in halves)
    marks = [m for _, m in halves]
    punct_ok = (bool(halves) and len(halves) % 2 == 0 and all(m in MID_MARKS for m in marks[0::2])
                and all(m in END_MARKS for m in marks[1::2]))
    n = len(halves)
    count_ok = {"绝句": n == 4, "律诗": n == 8, "排律": n >= 12 and n % 2 == 0}.get(kind, n >= 4 and n % 2 == 0)
    return {"half_lines_ok": half_ok, "punctuation_ok": punct_ok, "line_count_ok": count_ok,
            "form_ok": half_ok and punct_ok and count_ok, "n_half_lines": n}


def line_check(text: str, chars: int) -> dict:
    """A continue-line answer: one half-line of ``chars`` Han characters, closing punctuation optional."""
    body = (text or "").strip().rstrip(ALL_MARKS)
    ok = len(body) == chars and han(body) == body
    return {"half_lines_ok": ok, "punctuation_ok": ok, "line_count_ok": ok, "form_ok": ok, "n_half_lines": 1}


def _bigrams(s: str) -> list[str]:
    return [s[i:i + 2] for i in range(len(s) - 1)]


def _chars(text: str) -> str:
    return "".join(ch for ch in (text or "") if not ch.isspace())


def degeneration(text: str) -> dict:
    """``distinct_1``, ``distinct_2``, ``repetition_rate``, ``degenerate`` of one text (see module doc)."""
    s = _chars(text)
    bi = _bigrams(s)
    seen, rep = set(), 0
    for b in bi:
        rep += b in seen
        seen.add(b)
    d1 = len(set(s)) / len(s) if s else 0.0
    d2 = len(set(bi)) / len(bi) if bi else (1.0 if s else 0.0)
    rate = rep / len(bi) if bi else 0.0
    loop = _LOOP_RE.search(s) is not None
    degenerate = not s or rate >= 0.3 or (len(s) >= 3 and d1 <= 0.5) or loop
    return {"distinct_1": d1, "distinct_2": d2, "repetition_rate": rate, "degenerate": bool(degenerate)}


def verse_record(task: str, prompt: str, text: str) -> dict | None:
    """Form (where the request names one) and degeneration of one answer; ``None`` for other tasks."""
    if task not in VERSE_TASKS:
        return None
    out = degeneration(text)
    form = None
    if task == "write_poem":
        req = requested_form(prompt)
        if req is not None:
            form = form_check(text, req["chars"], req["kind"])
            out["requested_form"] = req["form"]
    else:
        given = given_line(prompt)
        if given and len(given) in (5, 7) and han(given) == given:
            form = line_check(text, len(given))
            out["requested_form"] = f"{len(given)}字句"
    if form is not None:
        out.update(form)
    return out


def _mean_ci(values: Sequence[float], n_resamples: int, seed: int) -> dict | None:
    vals = [float(v) for v in values]
    if not vals:
        return None
    ci = bootstrap_mean_ci(vals, n_resamples, seed)
    return {"mean": ci["mean"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "n": ci["n"]}


def _summ(rows: list[dict], n_resamples: int, seed: int) -> dict:
    formed = [r for r in rows if "form_ok" in r]
    out = {"n": len(rows), "n_form_requests": len(formed)}
    for k in ("form_ok", "half_lines_ok", "punctuation_ok", "line_count_ok"):
        out[k] = _mean_ci([r[k] for r in formed], n_resamples, seed)
    for k in ("distinct_1", "distinct_2", "repetition_rate", "degenerate"):
        out[k] = _mean_ci([r[k] for r in rows], n_resamples, seed)
    return out


def verse_summary(records: Sequence[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """Per task (``write_poem``, ``continue_line``) and ``all``: ``model`` (the predictions) and
    ``reference`` (the reference answers) summaries: ``form_ok`` (the form rate), its three parts,
    ``distinct_1``/``distinct_2``/``repetition_rate``/``degenerate``, each ``{"mean","ci_low","ci_high","n"}``
    (``None`` where nothing applies); also ``per_example`` rows (id, task, model, reference)."""
    per = []
    for r in records:
        m = verse_record(r.get("task", ""), r.get("prompt", ""), r.get("prediction", ""))
        if m is None:
            continue
        ref = verse_record(r["task"], r.get("prompt", ""), r.get("reference", ""))
        per.append({"id": r.get("id"), "task": r["task"], "model": m, "reference": ref})
    out: dict = {"definitions": "evaluation/verse.py", "tasks": {}}
    for task in (*VERSE_TASKS, "all"):
        rows = [p for p in per if task == "all" or p["task"] == task]
        if not rows:
            continue
        out["tasks"][task] = {"model": _summ([p["model"] for p in rows], n_resamples, seed),
                              "reference": _summ([p["reference"] for p in rows], n_resamples, seed)}
    out["per_example"] = per
    return out
