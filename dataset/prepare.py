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

import ast
import json

from .errors import DataError

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
