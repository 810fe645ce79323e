"""Optional LLM-judge win rate of arm A over arm B through an OpenAI-compatible endpoint (off by default).

Nothing here runs unless a ``base_url`` is given (``python -m evaluation.evaluate ... --judge_base_url``
or :func:`judge_win_rate`). For every example both arms answered (matched by ``id``), the judge sees
the question, the reference answer and the two answers in a seeded random order (position bias
cancels on average) and replies ``1``, ``2`` or ``tie``. Win = 1, tie = 0.5, loss = 0 for A;
the win rate has a bootstrap 95% CI over examples. Failed or unparsable calls are counted and left out.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .metrics import bootstrap_mean_ci

JUDGE_PROMPT = (
    "你是严格公正的评审。请比较两个助手对同一问题的回答，参考答案仅供参考。\n"
    "问题：\n{question}\n\n参考答案：\n{reference}\n\n回答1：\n{first}\n\n回答2：\n{second}\n\n"
    "哪个回答更正确、更切题、更通顺？只输出一个词：1、2 或 tie。"
)


def parse_verdict(text: str) -> str | None:
    """``"1"`` / ``"2"`` / ``"tie"`` from the judge's reply, or None when it cannot be read."""
    t = (text or "").strip().lower()
    if re.search(r"\btie\b|平局|相当|一样", t):
        return "tie"
    m = re.search(r"[12]", t)
    return m.group(0) if m else None


def _question(prompt_messages_or_text) -> str:
    if isinstance(prompt_messages_or_text, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages_or_text)
    return str(prompt_messages_or_text)


def judge_win_rate(records_a: list[dict], records_b: list[dict], base_url: str, model: str,
                   api_key: str | None = None, max_examples: int | None = None, seed: int = 0,
                   temperature: float = 0.0, timeout: float = 60.0, n_resamples: int = 2000,
                   max_retries: int = 2) -> dict:
    """Win rate of A over B judged by ``model`` at ``base_url`` (see module doc)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"),
                    timeout=timeout, max_retries=max_retries)
    b = {r["id"]: r for r in records_b}
    common = [r for r in records_a if r["id"] in b]
    rng = np.random.default_rng(seed)
    if max_examples is not None and max_examples < len(common):
        common = [common[i] for i in np.sort(rng.choice(len(common), size=max_examples, replace=False))]
    scores, failed, verdicts = [], 0, []
    for ra in common:
        rb = b[ra["id"]]
        a_first = bool(rng.integers(0, 2))
        first, second = (ra["prediction"], rb["prediction"]) if a_first else (rb["prediction"], ra["prediction"])
        msg = JUDGE_PROMPT.format(question=_question(ra.get("prompt", "")), reference=ra.get("reference", ""),
                                  first=first, second=second)
        try:
            resp = client.chat.completions.create(model=model, temperature=temperature,
                                                  messages=[{"role": "user", "content": msg}])
            verdict = parse_verdict(resp.choices[0].message.content)
        except Exception:  # network / server errors: counted, not scored
            verdict = None
        if verdict is None:
            failed += 1
            continue
        score = 0.5 if verdict == "tie" else float((verdict == "1") == a_first)
        scores.append(score)
        verdicts.append({"id": ra["id"], "a_first": a_first, "verdict": verdict, "score_a": score})
    out = {"base_url": base_url, "judge_model": model, "n_requested": len(common), "n_judged": len(scores),
           "n_failed": failed, "seed": seed, "verdicts": verdicts}
    if scores:
        ci = bootstrap_mean_ci(scores, n_resamples, seed)
        out.update({"win_rate": ci["mean"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"]})
    return out
