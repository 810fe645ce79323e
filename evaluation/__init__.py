"""Held-out evaluation of MateConv checkpoints and the run report.

Modules:
    metrics        Token-F1 / ROUGE-L (jieba words and characters; the one LCS), exact match, bootstrap CIs
    bpc            bits per character (HeldoutBPC) and the fixed, seeded, spread validation sample (spread_sample)
    routing        the one MoE routing-statistics module: load fractions, max-violation, near-dead experts,
                   expert_load_entropy vs router_entropy (RoutingCollector for held-out passes)
    heldout        loss / perplexity on held-out pretraining text and SFT answers + routing in the same pass
    mc             multiple-choice log-likelihood tasks built from the test split (next line, author, title,
                   form/词牌, cloze): accuracy, chance, centred accuracy, paired CIs
    verse          verse form (half-line length, punctuation, line count) and degeneration (distinct-n, repetition)
    pairs          one shared held-out preference-pair set for a comparable DPO evaluation
    generate_eval  answers for held-out SFT prompts (never the train split), per-example metrics JSONL
    judge          optional LLM-judge win rate through an OpenAI-compatible endpoint (off by default)
    evaluate       CLI: ``python -m evaluation.evaluate --checkpoint DIR --split validation --out FILE.json``
    report         CLI: ``python -m evaluation.report --run_dir DIR`` -> report.md, report.json, figures/*.png
                   (numbers: report_tables; figures: report_figures; Markdown: report_markdown)
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
