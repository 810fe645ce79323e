"""Exact, faster batch encoding for GPT-2-style byte-level BPE tokenizers (stage 3's hot loop).

Hugging Face ``tokenizers`` and ``tiktoken`` run the same algorithm on a byte-level BPE with the
GPT-2 split pattern: split the text with the pattern, then in each piece repeatedly merge the
leftmost adjacent pair of lowest rank. tiktoken does it about 2.5x faster on one core. The two can
disagree in exactly three places, and :func:`fast_encoder` checks all three for the tokenizer at
hand, so the ids it returns are always those of ``tokenizer.encode(text, add_special_tokens=False)``:

1. **Pair ranks.** Hugging Face merges a pair only if it is listed in ``merges`` (rank = its line);
   tiktoken merges any two adjacent symbols whose concatenation is a token (rank = that token's
   rank). We rank each merged token by the merge that makes it, so the two agree on every listed
   pair, and they run the same merges in the same order until tiktoken merges an *unlisted* pair
   x+y=t. That needs adjacent symbols exactly x and y. Until something outside t's span merges
   with its edge, Hugging Face merges inside the span exactly as it would on t alone; if that ends
   in [t] (checked once per token), it passes through no other two-part split, so x and y never
   meet. Tokens that fail this check and can be cut into two other tokens, and tokens made by two
   merges, are "dangerous"; an unlisted merge would leave a token containing one in the output, so
   a text whose tiktoken output holds such a token ("suspect") is re-encoded with Hugging Face.
   Our tokenizer and the original's have none (21 and 1,503 tokens have another split; all pass).
2. **Whole-piece shortcut.** tiktoken returns a piece that is itself a token as that token without
   merging; by the same check Hugging Face's merges turn each token's bytes into that token, and
   tokens for which they do not are suspects too.
3. **Added tokens** (``<s>``, ``</s>``, ...) are cut out of the text before the split, longest
   match first, as Hugging Face does; tokenizers with non-special added tokens or added tokens
   with ``lstrip``/``rstrip``/``single_word`` are left to Hugging Face.

The split pattern is the same string in both libraries; that their Unicode classes agree is tested
over every code point (``tests/test_fast_encode.py``), and each encoder checks itself on a probe
text when built. Anything else (a normaliser, another pre-tokenizer, BPE options, no tiktoken
installed) returns ``None`` with the reason, and callers use the Hugging Face batch encoder.
"""

from __future__ import annotations

import json
import re

import numpy as np

# ByteLevel(use_regex=True)'s split pattern in Hugging Face tokenizers (the GPT-2 pattern), verbatim.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same without the lookahead branch, run by the plain regex engine (~20% faster than the
# backtracking one the lookahead needs). The two cut a text alike except at a run of two or more
# whitespace characters followed by a non-space, where the GPT-2 pattern leaves the run's last
# character to the next piece: cutting the text there first (:func:`cut_whitespace_runs`) and
# encoding both sides apart gives exactly the GPT-2 pattern's pieces (see FastEncoder.marked_encoder).
SIMPLE_SPLIT_PATTERN = GPT2_SPLIT_PATTERN.replace(r"\s+(?!\S)|", "")
assert SIMPLE_SPLIT_PATTERN != GPT2_SPLIT_PATTERN
# Unicode White_Space, what \s is in the Rust regex of tiktoken (tests/test_chat_encoder_fast.py
# checks it against tiktoken over every code point), as a character class body.
WHITE_SPACE = "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
LOOKAHEAD_FREE = True  # tokenizer.chat's one-call path uses the cut + simple pattern (False: the GPT-2 one)
_CUT_RE: dict = {}


def cut_whitespace_runs(text: str, cut: str, stop: str = "") -> str:
    """``text`` with ``cut`` inserted before the last character of every run of two or more
    whitespace characters followed by a character that is neither whitespace nor in ``stop`` (the
    characters that end a text, e.g. markers)."""
    key = (cut, stop)
    if key not in _CUT_RE:
        _CUT_RE[key] = (re.compile(f"([{WHITE_SPACE}])([{WHITE_SPACE}])(?=[^{WHITE_SPACE}{re.escape(stop)}])"),
                        "\\1" + cut.replace("\\", "\\\\") + "\\2")
    pattern, repl = _CUT_RE[key]
    return pattern.sub(repl, text)


PROBE_TEXT = (
    "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。  Hello, world! It's 2024: 3.14159 ... "
    "we'll  see\t\ttabs\r\n全角　空格，“引号”《书名》——破折号…… 🙂👍🏽 ① Ⅻ ½ ٣ é ñ ß Ω ж ไทย 한국어 日本語のテキスト "
    "'S 'LL 'Ve x'sy   \n\n\n  end"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by ByteLevel to spell byte tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


class FastEncoder:
    """``encode(texts) -> list[np.ndarray]`` of token ids, equal to the Hugging Face tokenizer's.

    A text with a lone surrogate (not encodable as UTF-8) raises ``UnicodeEncodeError`` (Hugging
    Face raises ``TypeError`` for it).
    """

    def __init__(self, backend, tiktoken_encoding, rank_to_id: np.ndarray, suspect: np.ndarray,
                 added: dict[str, int]):
        self.backend = backend  # a private tokenizers.Tokenizer (no truncation/padding) for re-encoding
        self.encoding = tiktoken_encoding
        self.has_suspects = bool(suspect.any())
        # added tokens get ranks after the merged tokens; the longest match wins, as in Hugging Face
        n = len(rank_to_id)
        self.added_rank = {text: np.asarray([n + k], dtype=np.uint32) for k, text in enumerate(added)}
        self.rank_to_id = np.concatenate([rank_to_id, np.asarray(list(added.values()), dtype=np.int64)])
        self.suspect = np.concatenate([suspect, np.zeros(len(added), dtype=bool)])  # bool per rank
        self.added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        self.fallback_docs = 0  # documents re-encoded by Hugging Face (counted for the curious)
        self._extra: dict[int, int] = {}  # token id -> pseudo rank, for ids framing packed documents

    def _ranks(self, text: str) -> np.ndarray:
        to_numpy = self.encoding.encode_to_numpy
        if self.added_re is None:
            return to_numpy(text, disallowed_special=())
        pieces, pos = [], 0
        for m in self.added_re.finditer(text):  # as Hugging Face: cut out added tokens, encode the rest
            if m.start() > pos:
                pieces.append(to_numpy(text[pos:m.start()], disallowed_special=()))
            pieces.append(self.added_rank[m.group()])
            pos = m.end()
        if not pieces:
            return to_numpy(text, disallowed_special=())
        if pos < len(text):
            pieces.append(to_numpy(text[pos:], disallowed_special=()))
        return np.concatenate(pieces)

    def encode_packed(self, texts: list[str], head: list[int], tail: list[int]) -> np.ndarray | None:
        """``concat(head + ids(text) + tail for text in texts)`` as one int64 array (stage 3's layout),
        or None when a text needs Hugging Face (then use :meth:`encode`)."""
        h, t = self._pseudo_ranks(head), self._pseudo_ranks(tail)
        parts: list[np.ndarray] = []
        for text in texts:
            parts += (h, self._ranks(text), t)
        if not parts:
            return np.zeros(0, dtype=np.int64)
        ranks = np.concatenate(parts)
        if self.has_suspects and self.suspect[ranks].any():
            return None
        return self.rank_to_id[ranks]

    def _pseudo_ranks(self, ids: list[int]) -> np.ndarray:
        """Ranks standing for the given token ids (new ones appended past the tokenizer's)."""
        out = []
        for i in ids:
            if i not in self._extra:
                self._extra[i] = len(self.rank_to_id)
                self.rank_to_id = np.append(self.rank_to_id, np.int64(i))
                self.suspect = np.append(self.suspect, False)
            out.append(self._extra[i])
        return np.asarray(out, dtype=np.uint32)

    def marked_encoder(self, markers: dict[str, int]):
        """``encode(text) -> uint32 ranks`` (a ``tiktoken_buffer``-backed array) of a text holding
        ``markers`` (text -> rank) as cut points, for callers that render many texts into one string.

        Each marker occurrence becomes its rank and the text between two markers is encoded on its
        own (tiktoken's special-token handling: exactly ``_ranks`` of each piece when no piece holds an
        added token). The caller maps the ranks with ``rank_to_id`` and checks ``suspect`` (markers
        must be absent from the real text: the caller checks). ``encode(text, False)`` splits with
        the pattern minus its ``\\s+(?!\\S)`` branch: pass a text cut by :func:`cut_whitespace_runs`
        (with a marker as the cut) and the pieces are the GPT-2 pattern's. Why: that branch differs from
        ``\\s+`` only at a maximal run of two or more whitespace characters followed by a non-space,
        where it ends the piece before the run's last character; no piece of the GPT-2 pattern crosses
        that point (the pieces before a whitespace run end at its start), so encoding both sides of it
        apart changes nothing, and on each side no such run is left. Both calls release the GIL."""
        import tiktoken

        key = tuple(sorted(markers.items()))
        cached = getattr(self, "_marked", None)
        if cached is None or cached[0] != key:
            ranks = self.encoding._mergeable_ranks
            full = tiktoken.Encoding("mateconv_marked", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=dict(markers))
            simple = tiktoken.Encoding("mateconv_marked_simple", pat_str=SIMPLE_SPLIT_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=dict(markers))
            allowed = set(markers)
            full_core, simple_core = full._core_bpe, simple._core_bpe

            def encode(text: str, lookahead: bool = True) -> np.ndarray:
                core = full_core if lookahead else simple_core
                return np.frombuffer(core.encode_to_tiktoken_buffer(text, allowed), dtype=np.uint32)

            self._marked = cached = (key, encode)
        return cached[1]

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        parts = [self._ranks(text) for text in texts]
        ranks = np.concatenate(parts)
        bounds = np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)))[:-1]
        out = np.split(self.rank_to_id[ranks], bounds)
        if self.has_suspects:
            redo = sorted(set(np.searchsorted(bounds, np.flatnonzero(self.suspect[ranks]), side="right").tolist()))
            if redo:
                self.fallback_docs += len(redo)
                again = self.backend.encode_batch_fast([texts[i] for i in redo], add_special_tokens=False)
                for i, e in zip(redo, again):
                    out[i] = np.asarray(e.ids, dtype=np.int64)
        return out


def _bpe_spec(spec: dict) -> str | None:
    """Why the tokenizer spec is outside what FastEncoder reproduces, or None when it is inside."""
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return f"its pre-tokenizer is not ByteLevel(use_regex=True, add_prefix_space=False): {pre.get('type')}"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return "its BPE uses dropout, subword prefixes/suffixes or byte fallback"
    return None


_CACHE: dict[tuple, tuple] = {}  # the last tokenizer's (serialisation, split_special_tokens) -> result


def fast_encoder(tokenizer) -> tuple[FastEncoder | None, str]:
    """``(FastEncoder, description)`` for a byte-level BPE fast tokenizer, else ``(None, reason)``.

    The analysis takes ~0.1 s; the result for the last tokenizer seen is kept (stage 3 builds
    train, validation and test with one tokenizer).
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        return None, "not a fast (Rust) tokenizer"
    key = (backend.to_str(), bool(getattr(tokenizer, "split_special_tokens", False)))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _build(*key)
    return _CACHE[key]


def _build(serialized: str, split_special_tokens: bool) -> tuple[FastEncoder | None, str]:
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    from tokenizers import Tokenizer

    spec = json.loads(serialized)
    why = _bpe_spec(spec)
    if why:
        return None, why
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    byte_chars = bytes_to_unicode()
    u2b = {c: b for b, c in byte_chars.items()}
    to_bytes = {tok: bytes(u2b[c] for c in tok) for tok in vocab if all(c in u2b for c in tok)}
    if any(byte_chars[b] not in vocab for b in range(256)):
        return None, "not every byte is in the vocabulary"

    # ranks: single bytes 0..255, then merged tokens in the order of the merges that make them
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    rank_to_id = [vocab[byte_chars[b]] for b in range(256)]
    made_by: dict[bytes, tuple[bytes, bytes]] = {}
    id_of: dict[bytes, int] = {}
    twice: set[bytes] = set()
    for k, (a, b) in enumerate(merges):
        if a + b not in vocab or a not in to_bytes or b not in to_bytes:
            return None, f"merge {k} ({a!r} {b!r}) makes no vocabulary token"
        x, y = to_bytes[a], to_bytes[b]
        t = x + y
        if t in made_by:  # made by two merges: Hugging Face ranks them apart, tiktoken cannot
            twice.add(t)
            continue
        made_by[t] = (x, y)
        ranks[t] = 256 + len(made_by) - 1
        id_of[t] = vocab[a + b]
        rank_to_id.append(id_of[t])
    # Hugging Face's merges (without the ignore_merges shortcut) on each token's own bytes
    bpe = Tokenizer.from_str(json.dumps({**spec, "model": {**model, "ignore_merges": False}})).model
    isolated_bad = {t for t in made_by
                    if [tok.id for tok in bpe.tokenize("".join(byte_chars[b] for b in t))] != [id_of[t]]}
    ambiguous = {t for t, pair in made_by.items()
                 if any(t[:i] in ranks and t[i:] in ranks and (t[:i], t[i:]) != pair for i in range(1, len(t)))}
    # An unlisted merge x+y=t needs adjacent symbols exactly x and y. Until something outside t's span
    # merges with its edge, Hugging Face merges inside the span exactly as on t alone; if that ends in
    # [t], it passes through no other two-part split, so the pair x, y never meets: t is harmless.
    dangerous = twice | (ambiguous & isolated_bad)
    shortcut_bad = set() if model.get("ignore_merges") else isolated_bad  # with it, HF shortcuts as tiktoken
    suspect = np.zeros(len(rank_to_id), dtype=bool)
    sizes = sorted({len(d) for d in dangerous})  # look up t's substrings (cheap for any number of them)
    for t, r in ranks.items():
        if t in shortcut_bad or any(t[i:i + n] in dangerous for n in sizes for i in range(len(t) - n + 1)):
            suspect[r] = True

    added_tokens = spec.get("added_tokens") or []
    if any(not a.get("special") or a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added_tokens):
        return None, "it has non-special added tokens or added tokens with lstrip/rstrip/single_word"
    if split_special_tokens:
        return None, "split_special_tokens is on"
    added = {a["content"]: a["id"] for a in added_tokens if a.get("content")}
    encoding = tiktoken.Encoding("mateconv_fast_encode", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})
    private = Tokenizer.from_str(serialized)
    private.no_truncation()
    private.no_padding()
    enc = FastEncoder(private, encoding, np.asarray(rank_to_id, dtype=np.int64), suspect, added)
    probe = [PROBE_TEXT, PROBE_TEXT[::-1]] + PROBE_TEXT.split()
    want = [private.encode(p, add_special_tokens=False).ids for p in probe]  # no thread pool before a fork
    if [list(map(int, x)) for x in enc.encode(probe)] != want:
        return None, "tiktoken disagrees with the Hugging Face tokenizer on the probe text"
    enc.fallback_docs = 0
    return enc, (f"tiktoken {tiktoken.__version__} (exact; {int(suspect.sum())} of {len(ranks)} tokens "
                 f"send a text back to Hugging Face)")
