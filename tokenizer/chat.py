"""The one chat-prompt encoder: messages -> token ids (and a loss mask), used by datasets, serving,
evaluation, preference generation and ``chat.py``.

The MateConv template (docs/ARCHITECTURE.md)::

    <s>system\\n{s}</s>\\n            (optional, first)
    <s>user\\n{q}</s>\\n<s>assistant\\n{a}</s>\\n ...
    <s>assistant\\n                  (the generation prompt)

**Message content is always plain text.** Only the template's own markers (``<s>``, ``</s>``) become
special ids; a ``</s>`` or ``<s>`` typed inside a message is encoded as ordinary text, so a user
message cannot close its turn and open a system turn. The conversation is built as *chunks*
(template text or message content); template text is split at special-token strings, content is
never split. Text between two markers is encoded as one piece, exactly as Hugging Face encodes a
whole rendered string (it also cuts at special tokens first and encodes the text between them on
its own): for ordinary messages the ids are those of ``tok(rendered_text, add_special_tokens=False)``.

A tokenizer with its own ``chat_template``: when the template renders exactly the MateConv chunks on
probe conversations (ours does) the fast built-in rendering is used; otherwise the template is
rendered with placeholder contents, so its markers are known and the real contents are put back as
plain text. A template that drops or repeats a placeholder (or refuses the messages) falls back to
rendering the real text (:func:`encode_chat`, what serving did before) or to the MateConv template
(:func:`encode_conversation`, what the SFT/preference datasets did before).

Speed (:meth:`ChatEncoder.encode_flat`, what the SFT/DPO token store calls): where the built-in rendering
is used and ``tokenizer.fast_encode`` applies, a whole batch of conversations is rendered into one
string with private-use markers standing for ``<s>``, ``</s>``, "a target starts" and "a conversation
ends", and encoded by one tiktoken call that cuts at the markers (each text between two markers is
encoded on its own, exactly the texts of the reference path); ids, loss mask and lengths come from
the markers. A conversation whose content holds special-token text or a marker character, an unknown
role, a bad message, or a batch with a token fast_encode hands back to Hugging Face, takes the
reference path (chunks -> runs -> one encoder call per text). Same ids and masks either way (checked
on probes when first used; ``tests/test_chat_encoder_fast.py``).

Loss mask (:meth:`ChatEncoder.encode_many`): True on assistant answer tokens and the end token that
closes them; ``loss_on="all"`` (SFT: every assistant answer) or ``"last"`` (preference targets: only
the final answer; earlier answers are context). The answer is encoded separately from its
``assistant\\n`` header, as the model generates it after the generation prompt.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")

# chunk: (text, is_content, is_target)
Chunk = tuple[str, bool, bool]

# The one-call path (ChatEncoder._encode_flat_fast): markers standing for <s>, </s>, "a target starts"
# and "a conversation ends" in the string rendered for a whole batch (private-use characters; a
# conversation whose text holds one of them is encoded by the reference path).
# (and a fifth, a cut before the last character of a whitespace run: tokenizer.fast_encode.cut_whitespace_runs)
_M_BOS, _M_EOS, _M_SEP, _M_END, _M_CUT = "\uf8f0", "\uf8f1", "\uf8f2", "\uf8f3", "\uf8f4"
_MARKERS = _M_BOS + _M_EOS + _M_SEP + _M_END + _M_CUT
_SEP_RANK, _END_RANK, _CUT_RANK = 0xFFFFFFF0, 0xFFFFFFF1, 0xFFFFFFF2  # past every real rank (dropped)
_UNSET = object()

_PLACEHOLDER = "\ue000MateConv{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000MateConv(\\d+)\ue001")
_PROBES = (
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
)


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """``[{"role", "content"}]`` with str content encodable as UTF-8; ValueError naming the message otherwise."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"messages[{i}].content is not valid Unicode text ({e.reason} at character "
                             f"{e.start})") from None
        out.append({"role": role, "content": content})
    return out


class ChatEncoder:
    """Chat encoding for one tokenizer (holds the per-tokenizer decisions and the batch encoder).

    ``template``: ``"auto"`` (the tokenizer's chat template when it has one, else MateConv) or
    ``"mateconv"`` (always the original template). ``encode_texts``: a ``list[str] -> list[ids]``
    batch encoder equal to ``tok.encode(text, add_special_tokens=False)`` per text (the datasets
    pass ``dataset.build_bin.batch_encoder(tok)``); default: ``tokenizer.fast_encode`` when it
    applies, else the tokenizer's own batch call. (The one-call path encodes through
    ``tokenizer.fast_encode`` itself: the same ids, by that contract.)
    """

    def __init__(self, tokenizer, template: str = "auto", encode_texts: Callable | None = None):
        if template not in ("auto", "mateconv"):
            raise ValueError("template must be 'auto' or 'mateconv'")
        self.tok = tokenizer
        self.template = template
        self.bos = tokenizer.bos_token or "<s>"
        self.eos = tokenizer.eos_token or "</s>"
        specials = {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t}
        for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False) and str(added):
                specials.add(str(added))
        self.special_ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
        self.special_ids = {s: int(i) for s, i in self.special_ids.items() if isinstance(i, int) and i >= 0}
        alts = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alts))) if alts else None
        self.end_tokens = sorted({self.eos, *self.special_ids}, key=len, reverse=True)
        self._encode_texts = encode_texts
        self._fast = _UNSET  # the one-call path's state (built on first use), None where it does not apply
        self.use_template = template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self._same_as_builtin = {False: True, True: True}
        if self.use_template:
            for k, probe in enumerate(_PROBES):
                same = self._templated(probe, False, "all") == self._merge(self._builtin(probe, False, "all"))
                same = same and (self._templated(probe[:-1], True, "all")
                                 == self._merge(self._builtin(probe[:-1], True, "all")))
                self._same_as_builtin[bool(k)] = same

    def __getstate__(self):  # the batch encoder is rebuilt in the process that uses it
        state = dict(self.__dict__)
        state["_encode_texts"] = None
        state["_fast"] = _UNSET
        return state

    # -- rendering to chunks ---------------------------------------------------------------------

    def _builtin(self, msgs: Sequence[dict], gen: bool, loss_on: str) -> list[Chunk]:
        b, e = self.bos, self.eos
        last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        out: list[Chunk] = []
        for k, m in enumerate(msgs):
            tgt = m["role"] == "assistant" and (loss_on == "all" or (loss_on == "last" and k == last))
            out += [(f"{b}{m['role']}\n", False, False), (m["content"], True, tgt), (e, False, tgt),
                    ("\n", False, False)]
        if gen:
            out.append((f"{b}assistant\n", False, False))
        return out

    def _templated(self, msgs: Sequence[dict], gen: bool, loss_on: str) -> list[Chunk] | None:
        """Chunks from the tokenizer's template rendered with placeholder contents (None: not usable)."""
        holders = [{"role": m["role"], "content": _PLACEHOLDER.format(k)} for k, m in enumerate(msgs)]
        try:
            text = self.tok.apply_chat_template(holders, tokenize=False, add_generation_prompt=gen)
        except Exception:  # the template refuses these messages
            return None
        if not isinstance(text, str):
            return None
        last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        out: list[Chunk] = []
        pos, want = 0, 0
        for match in _PLACEHOLDER_RE.finditer(text):
            k = int(match.group(1))
            if k != want:
                return None
            want += 1
            m = msgs[k]
            tgt = m["role"] == "assistant" and (loss_on == "all" or (loss_on == "last" and k == last))
            out.append((text[pos:match.start()], False, False))
            out.append((m["content"], True, tgt))
            pos = match.end()
            if tgt:  # the end token right after an answer is part of the target
                for t in self.end_tokens:
                    if text.startswith(t, pos):
                        out.append((t, False, True))
                        pos += len(t)
                        break
        if want != len(msgs):
            return None
        out.append((text[pos:], False, False))
        return self._merge(out)

    @staticmethod
    def _merge(chunks: list[Chunk]) -> list[Chunk]:
        merged: list[Chunk] = []
        for c in chunks:
            if not c[0] and not c[1]:
                continue
            if merged and not c[1] and not merged[-1][1] and merged[-1][2] == c[2]:
                merged[-1] = (merged[-1][0] + c[0], False, c[2])
            else:
                merged.append(c)
        return merged

    def chunks(self, messages: Sequence[dict], add_generation_prompt: bool = False, loss_on: str = "none"
               ) -> list[Chunk] | None:
        """The conversation as chunks; None when the tokenizer's own template could not be used."""
        if loss_on not in ("all", "last", "none"):
            raise ValueError("loss_on must be 'all', 'last' or 'none'")
        msgs = check_messages(messages)
        if self.use_template and not self._same_as_builtin[bool(msgs) and msgs[0]["role"] == "system"]:
            return self._templated(msgs, add_generation_prompt, loss_on)
        return self._merge(self._builtin(msgs, add_generation_prompt, loss_on))

    # -- chunks to ids ---------------------------------------------------------------------------

    def _runs(self, chunks: list[Chunk]) -> list[list]:
        """``["text", str, target, plain]`` / ``["id", token_id, target]``: markers cut, text merged."""
        runs: list[list] = []
        for text, is_content, tgt in chunks:
            if is_content or self._special_re is None:
                parts = [(text, None)]
            else:
                parts, pos = [], 0
                for m in self._special_re.finditer(text):
                    parts += [(text[pos:m.start()], None), (m.group(), self.special_ids[m.group()])]
                    pos = m.end()
                parts.append((text[pos:], None))
            for s, sid in parts:
                if sid is not None:
                    runs.append(["id", sid, tgt])
                    continue
                if not s:
                    continue
                plain = bool(is_content and self._special_re is not None and self._special_re.search(s))
                if runs and runs[-1][0] == "text" and runs[-1][2] == tgt:
                    runs[-1][1] += s
                    runs[-1][3] = runs[-1][3] or plain
                else:
                    runs.append(["text", s, tgt, plain])
        return runs

    def _encoder(self) -> Callable:
        if self._encode_texts is None:
            from .fast_encode import fast_encoder

            enc, _ = fast_encoder(self.tok)
            self._encode_texts = enc.encode if enc is not None else (
                lambda texts: self.tok(texts, add_special_tokens=False)["input_ids"])
        return self._encode_texts

    def _encode_runs(self, all_runs: list[list[list]]) -> list[tuple[np.ndarray, np.ndarray]]:
        normal = [r[1] for runs in all_runs for r in runs if r[0] == "text" and not r[3]]
        plain = [r[1] for runs in all_runs for r in runs if r[0] == "text" and r[3]]
        enc_normal = iter(self._encoder()(normal) if normal else [])
        # text holding special-token strings (only message content): encoded with them as plain text
        enc_plain = iter(self.tok(plain, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                         if plain else [])
        out = []
        for runs in all_runs:
            ids, mask = [], []
            for r in runs:
                if r[0] == "id":
                    e = np.asarray([r[1]], dtype=np.int64)
                else:
                    e = np.asarray(next(enc_plain) if r[3] else next(enc_normal), dtype=np.int64)
                ids.append(e)
                mask.append(np.full(len(e), r[2], dtype=bool))
            out.append((np.concatenate(ids) if ids else np.zeros(0, np.int64),
                        np.concatenate(mask) if mask else np.zeros(0, bool)))
        return out

    def _fallback_text_runs(self, messages: Sequence[dict], gen: bool) -> list[list]:
        """The tokenizer's template rendered with the real text (when placeholders do not survive it)."""
        text = self.tok.apply_chat_template(check_messages(messages), tokenize=False, add_generation_prompt=gen)
        return self._runs([(text, False, False)])

    # -- public ----------------------------------------------------------------------------------

    def _reference_many(self, conversations, loss_on: str, add_generation_prompt: bool = False
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The reference path: chunks -> runs -> one encoder call per text."""
        all_runs = []
        for conv in conversations:
            ch = self.chunks(conv, add_generation_prompt, loss_on)
            if ch is None:  # the tokenizer's template is not usable here: the original template
                ch = self._merge(self._builtin(check_messages(conv), add_generation_prompt, loss_on))
            all_runs.append(self._runs(ch))
        return self._encode_runs(all_runs)

    # -- the one-call path -----------------------------------------------------------------------
    # For the built-in MateConv rendering through tokenizer.fast_encode, the reference path's texts
    # are exactly the pieces of the rendered conversation between its markers and target
    # boundaries, each encoded on its own (as plain text when it holds no special-token text; a
    # text that does goes to the reference path). So a batch is rendered into one string with
    # private-use markers for <s>, </s>, "a target starts here" and "a conversation ends here",
    # encoded by one tiktoken call that cuts at the markers, and the markers give the ids of <s>
    # and </s>, the loss mask and the lengths. The same ids and mask as the reference path, checked
    # on probes when the state is built (and tested on varied conversations).

    def _fast_state(self) -> dict | None:
        if self._fast is not _UNSET:
            return self._fast
        self._fast = None
        from .fast_encode import fast_encoder

        enc, _ = fast_encoder(self.tok)
        b, e = self.bos, self.eos
        if enc is None or b not in self.special_ids or e not in self.special_ids \
                or b not in enc.added_rank or e not in enc.added_rank:
            return None
        bos_r, eos_r = int(enc.added_rank[b][0]), int(enc.added_rank[e][0])
        if int(enc.rank_to_id[bos_r]) != self.special_ids[b] or int(enc.rank_to_id[eos_r]) != self.special_ids[e]:
            return None
        texts = set(self.special_ids) | set(enc.added_rank)  # what the reference path treats specially
        if any(m in t for t in texts for m in _MARKERS):
            return None
        scan = re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True))))
        if any(scan.search(f"{r}\n") for r in ROLES):
            return None
        state = {
            "enc": enc, "eos_rank": eos_r, "scan": scan,
            "encode": enc.marked_encoder({_M_BOS: bos_r, _M_EOS: eos_r, _M_SEP: _SEP_RANK, _M_END: _END_RANK,
                                          _M_CUT: _CUT_RANK}),
            "builtin": {k: not self.use_template or self._same_as_builtin[k] for k in (False, True)},
        }
        probes = [*_PROBES, [{"role": "user", "content": " 两个  空格\n\n"}, {"role": "assistant", "content": "\n答 "}],
                  [{"role": "system", "content": ""}, {"role": "user", "content": "x"},
                   {"role": "assistant", "content": ""}], []]
        for loss_on in ("all", "last", "none"):
            for gen in (False, True):
                got = self._encode_flat_fast(state, probes, loss_on, gen)
                want = self._reference_many(probes, loss_on, gen)
                if got is None or not all(np.array_equal(a, w[0]) and np.array_equal(m, w[1])
                                          for a, m, w in zip(*_split_flat(*got), want)):
                    return None
        self._fast = state
        return state

    def _render_fast(self, st: dict, conv, loss_on: str, gen: bool):
        """``(text, (n_bos, n_eos, n_targets))`` of one conversation, or None for the reference path."""
        try:
            n = len(conv)
            if n and not st["builtin"][conv[0].get("role") == "system"]:
                return None
        except (TypeError, AttributeError):
            return None
        last = -1
        if loss_on == "last":
            last = max((k for k, m in enumerate(conv) if type(m) is dict and m.get("role") == "assistant"), default=-1)
        parts, targets = [], 0
        for k, m in enumerate(conv):
            if type(m) is not dict:
                return None
            r, c = m.get("role"), m.get("content")
            if type(c) is not str or type(r) is not str or r not in ROLES:
                return None
            if r == "assistant" and (loss_on == "all" or k == last):
                parts.append(f"{_M_BOS}assistant\n{_M_SEP}{c}{_M_EOS}\n")
                targets += 1
            else:
                parts.append(f"{_M_BOS}{r}\n{c}{_M_EOS}\n")
        if gen:
            parts.append(f"{_M_BOS}assistant\n")
        parts.append(_M_END)
        return "".join(parts), (n + gen, n, targets)

    @staticmethod
    def _clean(st: dict, text: str, counts) -> bool:
        """No special-token text and no marker in the content (markers only where they were put)."""
        return (st["scan"].search(text) is None and text.count(_M_BOS) == counts[0]
                and text.count(_M_EOS) == counts[1] and text.count(_M_SEP) == counts[2] and text.count(_M_END) == 1
                and _M_CUT not in text)

    @staticmethod
    def _decode(st: dict, ranks: np.ndarray):
        """Ranks of rendered conversations -> ``(ids, mask, lengths)`` (markers dropped), or None
        when a token needs Hugging Face (fast_encode's suspects: the reference path re-encodes)."""
        marks = np.flatnonzero(ranks >= _SEP_RANK)
        kinds = ranks[marks]
        sep, end = marks[kinds == _SEP_RANK], marks[kinds == _END_RANK]
        n = len(ranks)
        if len(sep):  # a target: after its marker, up to and including the </s> that closes it
            eos = np.flatnonzero(ranks == st["eos_rank"])
            close = eos[np.searchsorted(eos, sep)]
            d = np.zeros(n, dtype=np.int8)
            d[sep + 1] = 1  # (sep + 1 <= close < n)
            d[close[close + 1 < n] + 1] = -1
            mask = np.cumsum(d, dtype=np.int8).view(bool)
        else:
            mask = np.zeros(n, dtype=bool)
        keep = np.ones(n, dtype=bool)
        keep[marks] = False
        kept = ranks[keep]
        enc = st["enc"]
        if enc.has_suspects and enc.suspect[kept].any():
            return None
        before_end = end - np.searchsorted(marks, end)  # tokens kept before each end marker
        return enc.rank_to_id[kept], mask[keep], np.diff(before_end, prepend=0)

    def _encode_flat_fast(self, st: dict, conversations, loss_on: str, gen: bool):
        rendered = [self._render_fast(st, conv, loss_on, gen) for conv in conversations]
        good = [r is not None for r in rendered]
        texts = [r[0] for r in rendered if r is not None]
        text = "".join(texts)
        n_all = [sum(r[1][k] for r in rendered if r is not None) for k in range(3)]
        if not (st["scan"].search(text) is None and text.count(_M_BOS) == n_all[0]
                and text.count(_M_EOS) == n_all[1] and text.count(_M_SEP) == n_all[2]
                and text.count(_M_END) == len(texts) and _M_CUT not in text):  # content holds special text / markers
            good = [r is not None and self._clean(st, *r) for r in rendered]
            texts = [r[0] for r, g in zip(rendered, good) if g]
            text = "".join(texts)
        from . import fast_encode

        fast_idx = [k for k, g in enumerate(good) if g]
        groups = []  # (conversation indices, ids, mask, lengths)
        if fast_idx:
            if fast_encode.LOOKAHEAD_FREE:  # cut whitespace runs, then the pattern without its lookahead
                text = fast_encode.cut_whitespace_runs(text, _M_CUT, _MARKERS)
            try:
                out = self._decode(st, st["encode"](text, not fast_encode.LOOKAHEAD_FREE))
            except UnicodeEncodeError:  # a lone surrogate: the reference path reports it
                return None
            if out is None:
                return None
            groups.append((fast_idx, *out))
        slow = [k for k, g in enumerate(good) if not g]
        if slow:
            ref = self._reference_many([conversations[k] for k in slow], loss_on, gen)
            groups.append((slow, np.concatenate([r[0] for r in ref]) if ref else np.zeros(0, np.int64),
                           np.concatenate([r[1] for r in ref]) if ref else np.zeros(0, bool),
                           np.fromiter((len(r[0]) for r in ref), dtype=np.int64, count=len(ref))))
        if len(groups) == 1:
            _, ids, mask, lengths = groups[0]
            return ids.astype(np.int64, copy=False), mask, lengths.astype(np.int64, copy=False)
        if not groups:
            return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64)
        per = [None] * len(conversations)
        for idx, ids, mask, lengths in groups:
            for k, a, m in zip(idx, *_split_flat(ids, mask, lengths)):
                per[k] = (a, m)
        return (np.concatenate([p[0] for p in per]).astype(np.int64, copy=False),
                np.concatenate([p[1] for p in per]),
                np.fromiter((len(p[0]) for p in per), dtype=np.int64, count=len(per)))

    # -- public ----------------------------------------------------------------------------------

    def encode_flat(self, conversations: Sequence[Sequence[dict]], loss_on: str = "all", *,
                    add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch-encode conversations -> ``(ids int64, loss mask bool, lengths int64)``, the sequences
        one after another (what :meth:`encode_many` returns, concatenated)."""
        if loss_on not in ("all", "last", "none"):
            raise ValueError("loss_on must be 'all', 'last' or 'none'")
        st = self._fast_state()
        out = self._encode_flat_fast(st, conversations, loss_on, add_generation_prompt) if st else None
        if out is not None:
            return out
        ref = self._reference_many(conversations, loss_on, add_generation_prompt)
        if not ref:
            return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64)
        return (np.concatenate([r[0] for r in ref]), np.concatenate([r[1] for r in ref]),
                np.fromiter((len(r[0]) for r in ref), dtype=np.int64, count=len(ref)))

    def encode_many(self, conversations: Sequence[Sequence[dict]], loss_on: str = "all", *,
                    add_generation_prompt: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Batch-encode conversations -> ``[(ids int64, loss mask bool)]`` (mask per ``loss_on``)."""
        ids, mask, lengths = self.encode_flat(conversations, loss_on, add_generation_prompt=add_generation_prompt)
        return list(zip(*_split_flat(ids, mask, lengths)))

    def encode_prompts(self, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool = True
                       ) -> list[list[int]]:
        """Batch version of :func:`encode_chat`."""
        st = self._fast_state()
        # (only where the built-in rendering is the template: a template that is not usable falls back
        # to rendering the real text here, not to the built-in one as in encode_many)
        out = self._encode_flat_fast(st, conversations, "none", add_generation_prompt) \
            if st and all(st["builtin"].values()) else None
        if out is not None:
            return [ids.tolist() for ids in _split_flat(*out)[0]]
        all_runs = []
        for conv in conversations:
            ch = self.chunks(conv, add_generation_prompt, "none")
            all_runs.append(self._runs(ch) if ch is not None else self._fallback_text_runs(conv, add_generation_prompt))
        return [ids.tolist() for ids, _ in self._encode_runs(all_runs)]

    def encode(self, messages: Sequence[dict], loss_on: str = "all") -> tuple[np.ndarray, np.ndarray]:
        return self.encode_many([messages], loss_on)[0]


def _split_flat(ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> tuple[list, list]:
    if not len(lengths):
        return [], []
    cuts = np.cumsum(lengths)[:-1]
    return np.split(ids, cuts), np.split(mask, cuts)


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chat_encoder(tokenizer) -> ChatEncoder:
    """The (cached) ``ChatEncoder(tokenizer, "auto")``; rebuilt when the tokenizer's template changes."""
    key = getattr(tokenizer, "chat_template", None)
    try:
        hit = _ENCODERS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return ChatEncoder(tokenizer)
    if hit is None or hit[0] != key:
        hit = (key, ChatEncoder(tokenizer))
        _ENCODERS[tokenizer] = hit
    return hit[1]


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt (by default ending with the ``<s>assistant\\n`` generation prompt)."""
    return chat_encoder(tokenizer).encode_prompts([messages], add_generation_prompt)[0]


def encode_conversation(tokenizer, messages: Sequence[dict], loss_on: str = "all"
                        ) -> tuple[list[int], list[bool]]:
    """``(ids, loss_mask)`` of a whole conversation; mask on assistant answers + their end token
    (``loss_on="all"``: every answer, as SFT; ``"last"``: only the final one, as preference targets)."""
    ids, mask = chat_encoder(tokenizer).encode(messages, loss_on)
    return ids.tolist(), mask.tolist()
