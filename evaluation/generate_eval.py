"""Answers for held-out SFT prompts, per-example metrics, and paired comparisons between two arms.

* Data: a held-out SFT JSONL (``sft_validation.jsonl`` / ``sft_test.jsonl``); a ``train`` split or a
  file named as one is refused (:func:`evaluation.heldout.check_heldout_path`), and when the sibling
  ``*_train.jsonl`` exists, held-out records that also occur in it are left out.
* Prompt: the conversation without its last assistant message, encoded by ``tokenizer.chat`` (the one
  chat encoder, also used by ``SFTDataset``, the server and the preference generator) with the
  generation prompt (``<s>user\\n{q}</s>\\n<s>assistant\\n``); reference = the last assistant
  message; ``answer`` (exact tasks) when present.
* Decoding: greedy through ``model.generation.decode`` (the one decoding loop, also the server's),
  batched with left padding and a KV cache; a sequence stops at the tokenizer's
  end token (``</s>``, id 2 for our tokenizer; never id 0) or after ``max_new_tokens`` *new* tokens
  (the prompt does not count). The prediction is the decoded text before the end token.
* Output: one JSON line per example (``id``, ``task``, ``prompt``, ``reference``, ``answer``,
  ``prediction``, ``n_new_tokens``, ``stopped_on_eos`` and the metrics of
  :func:`evaluation.metrics.all_text_metrics`, plus ``exact_match`` / ``answer_in_prediction`` when the
  record has an exact ``answer``) so that two arms can be compared example by example.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .heldout import _heldout_records, _jsonl, _special_ids, check_heldout_path, train_overlap
from .metrics import (
    all_text_metrics,
    answer_in_prediction,
    bootstrap_mean_ci,
    exact_match,
    paired_bootstrap,
)

TEXT_METRICS = ("token_f1_word", "token_f1_char", "rouge_l_word", "rouge_l_char")


def load_heldout_examples(path, split: str | None = None, max_examples: int | None = None,
                          seed: int = 0) -> list[dict]:
    """Held-out SFT records -> examples with ``messages`` (prompt), ``reference`` and ``answer``.

    Records that also occur in the sibling train file (same id or identical conversation) are left out.
    ``max_examples`` keeps a seeded random subset in file order (the same subset for every arm)."""
    path = check_heldout_path(path, split)
    ov = train_overlap(path)  # records that also occur in the train file are left out
    recs = _heldout_records(path, ov["overlap_keys"])
    examples = []
    for i, rec in enumerate(recs):
        conv = rec.get("conversations") or []
        last = max((k for k, m in enumerate(conv) if m.get("role") == "assistant"), default=-1)
        if last < 1:
            continue
        examples.append({"id": rec.get("id", f"line{i + 1}"), "task": rec.get("task", "unknown"),
                         "messages": conv[:last], "reference": conv[last]["content"],
                         "answer": rec.get("answer")})
    if max_examples is not None and max_examples < len(examples):
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_examples, replace=False))
        examples = [examples[i] for i in keep]
    return examples


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text up to and including the assistant header (for the records; the ids come from
    ``tokenizer.chat.encode_chat``, the one chat encoder, which keeps message content plain text)."""
    from tokenizer.chat import encode_chat

    return tokenizer.decode(encode_chat(tokenizer, messages), skip_special_tokens=False)


def generate_ids(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int = 64,
                 batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """Decoding of token-id prompts -> ``[{"ids": new ids before eos, "stopped_on_eos": bool}]``.

    ``model.generation.decode`` (the one decoding loop: left padding, KV cache), ``batch_size`` prompts
    at a time; ``max_new_tokens`` counts generated tokens only; the end token is not part of ``ids``.
    Greedy by default; ``temperature > 0``: nucleus sampling (``top_p``) where prompt ``i`` draws from its own
    generator seeded ``seed * 1_000_003 + i``, so each answer is the same whatever the batch size."""
    from model.generation import Sampling, decode, make_generator

    results: list[dict] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        sampling = None
        if temperature > 0:
            sampling = [Sampling(temperature, top_p, make_generator(seed * 1_000_003 + start + k))
                        for k in range(len(chunk))]
        ids, reasons = decode(model, chunk, max_new_tokens, sampling, eos_token_ids=[eos_id], pad_token_id=pad_id)
        results.extend({"ids": g, "stopped_on_eos": r == "stop"} for g, r in zip(ids, reasons))
    return results


def generate_answers(model, tokenizer, examples: list[dict], max_new_tokens: int = 64,
                     batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """Generate, decode and score every example -> per-example records (see module doc; greedy unless
    ``temperature > 0``, see :func:`generate_ids`)."""
    _, eos, pad = _special_ids(tokenizer, model.config)
    from tokenizer.chat import chat_encoder

    prompts = chat_encoder(tokenizer).encode_prompts([ex["messages"] for ex in examples])
    prompts_text = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:  # keep the end of over-long prompts so prompt + answer fit the trained context
        prompts = [p[-max(1, max_pos - max_new_tokens):] for p in prompts]
    gens = generate_ids(model, prompts, eos, pad, max_new_tokens, batch_size, temperature, top_p, seed)
    out = []
    for ex, text, p, g in zip(examples, prompts_text, prompts, gens):
        pred = tokenizer.decode(g["ids"], skip_special_tokens=True).strip()
        rec = {"id": ex["id"], "task": ex["task"], "prompt": text, "reference": ex["reference"],
               "answer": ex.get("answer"), "prediction": pred, "n_prompt_tokens": len(p),
               "n_new_tokens": len(g["ids"]), "stopped_on_eos": g["stopped_on_eos"]}
        rec.update(all_text_metrics(pred, ex["reference"]))
        if ex.get("answer"):
            rec["exact_match"] = exact_match(pred, ex["answer"])
            rec["answer_in_prediction"] = answer_in_prediction(pred, ex["answer"])
        out.append(rec)
    return out


def write_jsonl(records: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def summarize(records: list[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """Means with bootstrap 95% CIs over examples; task accuracy per exact task; stopping statistics."""
    if not records:
        raise ValueError("no generation records to summarize")
    metrics = {m: bootstrap_mean_ci([r[m] for r in records], n_resamples, seed) for m in TEXT_METRICS}
    exact = [r for r in records if "exact_match" in r]
    tasks: dict[str, dict] = {}
    for task in sorted({r["task"] for r in exact}):
        rs = [r for r in exact if r["task"] == task]
        tasks[task] = {"exact_match": bootstrap_mean_ci([r["exact_match"] for r in rs], n_resamples, seed),
                       "answer_in_prediction": bootstrap_mean_ci([r["answer_in_prediction"] for r in rs],
                                                                 n_resamples, seed),
                       "n": len(rs)}
    if exact:
        tasks["all_exact_tasks"] = {
            "exact_match": bootstrap_mean_ci([r["exact_match"] for r in exact], n_resamples, seed),
            "answer_in_prediction": bootstrap_mean_ci([r["answer_in_prediction"] for r in exact], n_resamples, seed),
            "n": len(exact)}
    return {"n_examples": len(records), "metrics": metrics, "task_accuracy": tasks,
            "stop_rate": float(np.mean([r["stopped_on_eos"] for r in records])),
            "mean_new_tokens": float(np.mean([r["n_new_tokens"] for r in records]))}


def read_jsonl(path) -> list[dict]:
    return _jsonl(path)


def paired_compare(records_a: list[dict], records_b: list[dict], metric: str, n_resamples: int = 2000,
                   seed: int = 0) -> dict:
    """Paired bootstrap of mean(A - B) for ``metric`` over the examples both arms answered (by id);
    refuses two files that are not over the same examples."""
    a = {r["id"]: r for r in records_a if metric in r}
    b = {r["id"]: r for r in records_b if metric in r}
    if set(a) != set(b):
        raise ValueError(f"paired comparison needs the same examples: {len(set(a) ^ set(b))} ids differ")
    ids = sorted(a)
    res = paired_bootstrap([a[i][metric] for i in ids], [b[i][metric] for i in ids], n_resamples, seed)
    res["metric"] = metric
    return res
