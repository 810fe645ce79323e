"""Held-out evaluation of MateConv checkpoints and the run report.

Modules:
    metrics        Token-F1 / ROUGE-L (jieba words and characters), exact match, bootstrap CIs, seed summaries
    heldout        loss / perplexity on held-out pretraining text and SFT answers + MoE routing statistics
    generate_eval  answers for held-out SFT prompts (never the train split), per-example metrics JSONL
    judge          optional LLM-judge win rate through an OpenAI-compatible endpoint (off by default)
    evaluate       CLI: ``python -m evaluation.evaluate --checkpoint DIR --split validation --out FILE.json``
    report         CLI: ``python -m evaluation.report --run_dir DIR`` -> report.md, report.json, figures/*.png
"""

from __future__ import annotations

from .metrics import (
    bootstrap_mean_ci,
    exact_match,
    normalize_text,
    paired_bootstrap,
    rouge_l,
    seed_summary,
    token_f1,
)

__all__ = [
    "bootstrap_mean_ci",
    "exact_match",
    "normalize_text",
    "paired_bootstrap",
    "rouge_l",
    "seed_summary",
    "token_f1",
]
