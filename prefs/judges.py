"""Judges: rank K candidate answers of one prompt, best first.

- :class:`ReferenceJudge` (offline): similarity to the prompt's reference answer, character-level
  ROUGE-L F1 (the report's: :func:`evaluation.metrics.rouge_l`, ``level="char"``) or chrF (character
  n-grams 1..6, beta 2; whitespace ignored).
- :class:`OpenAIJudge`: an LLM behind an OpenAI-compatible endpoint ranks the candidates (shown in
  a seeded random order against position bias); the reply is parsed tolerantly (JSON
  ``{"ranking": [...]}``, ``2 > 1 > 4 > 3``, ``[2, 1, 4, 3]``); a malformed verdict is asked again,
  ``judge_tries`` times in all, then the prompt fails with reason ``judge_malformed``.

``rank(prompt, texts)`` returns a :class:`Verdict` (``ranking`` = candidate indices best -> worst,
``scores`` in [0, 1] per candidate; an LLM ranking gives evenly spaced scores) or raises PromptFailed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from evaluation.metrics import lcs_length, normalize_text, rouge_l  # noqa: F401  (lcs_length: re-exported)

from .client import ChatCaller, PromptFailed
from .generators import Prompt


@dataclass
class Verdict:
    ranking: list[int]
    scores: list[float]
    usage: dict = field(default_factory=dict)
    raw: str | None = None


# ----------------------------------------------------------------------------------------------
# reference metrics


def _chars(s: str) -> str:
    return "".join(s.split())


def rouge_l_f1(candidate: str, reference: str) -> float:
    """Character-level ROUGE-L F1: the report's metric (:func:`evaluation.metrics.rouge_l` with
    ``level="char"``: NFKC, lower-case, punctuation and whitespace dropped), so pairs are ranked by the
    metric the report shows. An empty candidate or reference scores 0."""
    if not normalize_text(candidate) or not normalize_text(reference):
        return 0.0
    return rouge_l(candidate, reference, "char")


def chrf(candidate: str, reference: str, max_n: int = 6, beta: float = 2.0) -> float:
    """chrF: character n-gram F-beta averaged over n = 1..max_n (whitespace ignored), in [0, 1]."""
    c, r = _chars(candidate), _chars(reference)
    if not c or not r:
        return 0.0
    precs, recs = [], []
    for n in range(1, max_n + 1):
        cg = Counter(c[i:i + n] for i in range(len(c) - n + 1))
        rg = Counter(r[i:i + n] for i in range(len(r) - n + 1))
        if not cg or not rg:
            continue
        match = sum((cg & rg).values())
        precs.append(match / sum(cg.values()))
        recs.append(match / sum(rg.values()))
    if not precs:
        return 0.0
    p, rec = sum(precs) / len(precs), sum(recs) / len(recs)
    if p + rec == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * p * rec / (b2 * p + rec)


METRICS = {"rougeL": rouge_l_f1, "chrf": chrf}


class ReferenceJudge:
    def __init__(self, metric: str = "rougeL"):
        self.metric = METRICS[metric]
        self.name = f"reference:{metric}"

    def rank(self, prompt: Prompt, texts: list[str]) -> Verdict:
        if not prompt.reference:
            raise PromptFailed("no_reference", "the reference judge needs a reference answer")
        scores = [round(self.metric(t, prompt.reference), 6) for t in texts]
        ranking = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
        return Verdict(ranking, scores)


# ----------------------------------------------------------------------------------------------
# LLM judge

JUDGE_SYSTEM = (
    "You are a strict, impartial judge of answers written by AI assistants to a user's request "
    "(often in Chinese). Judge helpfulness, correctness, relevance, fluency and following the request. "
    "Length is not a merit by itself."
)

JUDGE_TEMPLATE = """Conversation:
{conversation}

Candidate answers to the last user message:
{candidates}

Rank all {k} candidates from best to worst. Reply with JSON only, using the candidate numbers:
{{"ranking": [best, ..., worst]}}"""


def format_judge_messages(prompt: Prompt, shown: list[str]) -> list[dict]:
    conv = "\n".join(f"[{m['role']}] {m['content']}" for m in prompt.messages)
    cands = "\n\n".join(f"### Candidate {i + 1}\n{t}" for i, t in enumerate(shown))
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(conversation=conv, candidates=cands, k=len(shown))}]


def _as_index(x, k: int) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x if 1 <= x <= k else None
    if isinstance(x, str):
        m = re.fullmatch(r"\s*(?:candidate|answer|候选|回答)?\s*#?\[?\s*(\d+)\s*\]?\s*", x, re.I)
        if m:
            return _as_index(int(m.group(1)), k)
    return None


def _complete(order: list[int], k: int) -> list[int] | None:
    if len(set(order)) != len(order):
        return None
    if len(order) == k:
        return order
    if len(order) == k - 1:  # one left out: it is the worst
        return order + [next(i for i in range(1, k + 1) if i not in order)]
    return None


def parse_ranking(text: str, k: int) -> list[int] | None:
    """1-based ranking of k candidates from a judge reply, or None when it cannot be read."""
    if not isinstance(text, str) or not text.strip():
        return None
    t = text.replace("，", ",").replace("＞", ">").replace("【", "[").replace("】", "]")
    # 1. a JSON object (possibly inside a code fence or prose)
    for m in re.finditer(r"\{[^{}]*\}", t, re.S):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        for key in ("ranking", "rank", "order", "ranks", "排名"):
            if isinstance(obj, dict) and isinstance(obj.get(key), list):
                idx = [_as_index(x, k) for x in obj[key]]
                if None not in idx and (r := _complete(idx, k)):
                    return r
    # 2. a bare list or chain: [2, 1, 4, 3] / 2 > 1 > 4 > 3 / 2,1,4,3 (the last one that fits wins)
    found = None
    for m in re.finditer(r"\d+(?:[\s'\"]*(?:>|->|→|,|;|、|\s)[\s'\"]*\d+)+", t):
        idx = [_as_index(int(x), k) for x in re.findall(r"\d+", m.group(0))]
        if None not in idx and (r := _complete(idx, k)):
            found = r
    return found


class OpenAIJudge:
    def __init__(self, caller: ChatCaller, model: str, temperature: float = 0.0, tries: int = 3,
                 max_tokens: int = 256, seed: int = 42):
        self.caller, self.model, self.temperature, self.tries = caller, model, temperature, tries
        self.max_tokens = max_tokens
        self.seed = seed
        self.name = model

    def rank(self, prompt: Prompt, texts: list[str]) -> Verdict:
        k = len(texts)
        h = hashlib.sha256(f"{self.seed}:{prompt.id}".encode()).digest()
        order = list(range(k))
        random.Random(int.from_bytes(h[:8], "little")).shuffle(order)  # shown[j] = texts[order[j]]
        messages = format_judge_messages(prompt, [texts[i] for i in order])
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        last = ""
        for _ in range(self.tries):
            resp = self.caller.create(model=self.model, messages=messages, temperature=self.temperature,
                                      max_tokens=self.max_tokens)
            if resp.usage is not None:
                usage["prompt_tokens"] += resp.usage.prompt_tokens or 0
                usage["completion_tokens"] += resp.usage.completion_tokens or 0
            last = resp.choices[0].message.content or ""
            shown_rank = parse_ranking(last, k)
            if shown_rank is not None:
                ranking = [order[j - 1] for j in shown_rank]
                scores = [0.0] * k
                for pos, i in enumerate(ranking):
                    scores[i] = round((k - 1 - pos) / (k - 1), 6) if k > 1 else 1.0
                return Verdict(ranking, scores, usage, last)
            self.caller.stats.retry("judge_malformed")
        raise PromptFailed("judge_malformed", repr(last[:120]))
