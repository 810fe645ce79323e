"""Evaluate one checkpoint on held-out data and write a metrics JSON with every number and its source.

    python -m evaluation.evaluate --checkpoint out/sft --split validation --out eval/dense_seed0_sft.json \\
        [--tokenizer DIR] [--data_dir data/embedded] [--max_examples 64] [--max_items 256]

Computed (each with data file, split, number of items/examples and bootstrap seed):
    * ``pretrain``: loss / perplexity on held-out pretraining text (``pretrain_<split>.jsonl`` or a ``.bin``)
      with per-item NLL sums and token counts (for paired bootstraps in the report), and MoE routing
      statistics of that pass (``pretrain.routing``);
    * ``sft``: loss / perplexity on the answers of held-out SFT conversations (``sft_<split>.jsonl``);
    * ``generation``: greedy answers to the held-out SFT prompts -> Token-F1 / ROUGE-L (jieba words and
      characters) with bootstrap 95% CIs, exact-task accuracy, stop rate; per-example JSONL beside the
      output (``<out stem>_generations.jsonl``) for paired bootstraps between arms;
    * ``judge`` (optional, off by default): LLM-judge win rate against another arm's generations.

A ``train`` split or a file named as one is refused; held-out records that also occur in the sibling
train file (same id or identical text / conversation) are left out of every metric and counted under
``train_overlap_check`` (``excluded``, ``overlap_ids``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .generate_eval import generate_answers, load_heldout_examples, read_jsonl, summarize, write_jsonl
from .heldout import check_heldout_path, heldout_loss, overlap_summary, train_overlap

SCHEMA_VERSION = 1


def resolve(path) -> Path:
    """A checkpoint dir, or a trainer run dir / its ``checkpoints/`` (-> the latest complete checkpoint)."""
    from model.loading import resolve_model_dir

    try:
        return resolve_model_dir(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: refusing to evaluate a random model") from None


def load_checkpoint(path, device: str = "cpu"):
    """A checkpoint directory (``save_pretrained`` layout; a trainer run directory resolves to its latest
    complete checkpoint) -> model in eval mode. A missing checkpoint is an error, never a random model."""
    from model.loading import load_model_dir

    return load_model_dir(resolve(path), device=device, dtype=torch.float32)


def load_eval_tokenizer(tokenizer_path, checkpoint=None):
    """``--tokenizer`` if given, else the checkpoint's own tokenizer files, else the default tokenizer."""
    from tokenizer import load_tokenizer

    if tokenizer_path is None and checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        tokenizer_path = checkpoint
    return load_tokenizer(tokenizer_path)


def default_files(data_dir, split: str) -> dict[str, Path]:
    data_dir = Path(data_dir)
    return {"pretrain": data_dir / f"pretrain_{split}.jsonl", "sft": data_dir / f"sft_{split}.jsonl"}


def model_info(model, seq_len: int) -> dict:
    cfg = model.config
    info = {"use_moe": bool(getattr(cfg, "use_moe", False)), "config": cfg.to_dict()}
    try:
        from model import parameter_report

        info.update(parameter_report(cfg, seq_len=seq_len))
    except ImportError:
        info["total_params"] = int(sum(p.numel() for p in model.parameters()))
    for k in ("auto_map", "architectures", "transformers_version"):
        info["config"].pop(k, None)
    return info


def evaluate_model(model, tokenizer, split: str = "validation", data_dir="data/embedded",
                   pretrain_file=None, sft_file=None, max_items: int | None = None,
                   max_examples: int | None = None, max_seq_len: int | None = None, max_new_tokens: int = 64,
                   batch_size: int = 8, seed: int = 0, n_resamples: int = 2000, generations_out=None,
                   do_generation: bool = True, judge: dict | None = None) -> dict:
    """Every held-out metric of ``model`` as one dict (what the CLI writes)."""
    if split.lower() == "train":
        check_heldout_path("train", split)  # raises TrainingDataError
    files = default_files(data_dir, split)
    pretrain_file = Path(pretrain_file) if pretrain_file else files["pretrain"]
    sft_file = Path(sft_file) if sft_file else files["sft"]
    for f in (pretrain_file, sft_file):
        check_heldout_path(f, split)
    max_seq_len = int(max_seq_len or min(getattr(model.config, "max_position_embeddings", 512), 512))
    t0 = time.time()
    from tokenizer import tokenizer_fingerprint

    res: dict = {"schema_version": SCHEMA_VERSION, "split": split, "seed": seed, "n_resamples": n_resamples,
                 "max_seq_len": max_seq_len, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                 "model": model_info(model, max_seq_len)}
    common = dict(max_seq_len=max_seq_len, split=split, max_items=max_items, batch_size=batch_size,
                  n_resamples=n_resamples, seed=seed)
    timing = {}
    t = time.time()
    res["pretrain"] = heldout_loss(model, tokenizer, pretrain_file, "pretrain", **common)
    timing["pretrain_loss_s"], t = round(time.time() - t, 2), time.time()
    res["sft"] = heldout_loss(model, tokenizer, sft_file, "sft", **common)
    timing["sft_loss_s"], t = round(time.time() - t, 2), time.time()
    res["routing"] = res["pretrain"].get("routing")  # routing statistics on held-out pretraining text
    if do_generation:
        examples = load_heldout_examples(sft_file, split, max_examples=max_examples, seed=seed)
        records = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
        gen = {"data_file": str(sft_file), "split": split, "max_new_tokens": max_new_tokens,
               "decoding": "greedy", "subset_seed": seed, "summary": summarize(records, n_resamples, seed),
               "samples": records[:5]}
        gen["n_examples"] = gen["summary"]["n_examples"]
        gen["train_overlap_check"] = overlap_summary(train_overlap(sft_file))
        if generations_out:
            gen["per_example_file"] = str(write_jsonl(records, generations_out))
        res["generation"] = gen
        timing["generation_s"] = round(time.time() - t, 2)
        if judge and judge.get("base_url") and judge.get("against"):
            from .judge import judge_win_rate

            res["judge"] = judge_win_rate(records, read_jsonl(judge["against"]), judge["base_url"],
                                          judge.get("model", "gpt-4o-mini"), max_examples=judge.get("max_examples"),
                                          seed=seed)
            res["judge"]["against"] = str(judge["against"])
    res["timing"] = timing
    res["seconds"] = round(time.time() - t0, 2)
    return res


def evaluate_checkpoint(checkpoint, out=None, tokenizer=None, device: str = "cpu", **kwargs) -> dict:
    """Load ``checkpoint`` (and its tokenizer), evaluate, and write ``out`` (JSON) when given."""
    checkpoint = resolve(checkpoint)
    model = load_checkpoint(checkpoint, device)
    tok = load_eval_tokenizer(tokenizer, checkpoint)
    if out is not None and kwargs.get("generations_out") is None and kwargs.get("do_generation", True):
        kwargs["generations_out"] = Path(out).with_name(Path(out).stem + "_generations.jsonl")
    res = evaluate_model(model, tok, **kwargs)
    res["checkpoint"] = str(checkpoint)
    res["tokenizer"] = str(tokenizer or checkpoint)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + weights)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint's, else ours)")
    ap.add_argument("--split", default="validation", choices=["validation", "test", "train"],
                    help="held-out split ('train' is refused with an error)")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    ap.add_argument("--data_dir", default="data/embedded", help="dir with pretrain_<split>.jsonl and sft_<split>.jsonl")
    ap.add_argument("--pretrain_file", default=None, help="held-out pretraining .jsonl or .bin (overrides data_dir)")
    ap.add_argument("--sft_file", default=None, help="held-out SFT .jsonl (overrides data_dir)")
    ap.add_argument("--max_examples", type=int, default=None, help="generation examples (seeded subset)")
    ap.add_argument("--max_items", type=int, default=None, help="loss items per file (documents / conversations)")
    ap.add_argument("--max_seq_len", type=int, default=None)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="subset and bootstrap seed")
    ap.add_argument("--n_resamples", type=int, default=2000)
    ap.add_argument("--no_generation", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--judge_base_url", default=None, help="OpenAI-compatible endpoint (judge is off without it)")
    ap.add_argument("--judge_model", default="gpt-4o-mini")
    ap.add_argument("--judge_against", default=None, help="other arm's *_generations.jsonl")
    ap.add_argument("--judge_max_examples", type=int, default=None)
    a = ap.parse_args(argv)
    judge = None
    if a.judge_base_url:
        judge = {"base_url": a.judge_base_url, "model": a.judge_model, "against": a.judge_against,
                 "max_examples": a.judge_max_examples}
    res = evaluate_checkpoint(a.checkpoint, out=a.out, tokenizer=a.tokenizer, device=a.device, split=a.split,
                              data_dir=a.data_dir, pretrain_file=a.pretrain_file, sft_file=a.sft_file,
                              max_items=a.max_items, max_examples=a.max_examples, max_seq_len=a.max_seq_len,
                              max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, seed=a.seed,
                              n_resamples=a.n_resamples, do_generation=not a.no_generation, judge=judge)
    line = {"out": a.out, "pretrain_loss": round(res["pretrain"]["loss"], 4), "sft_loss": round(res["sft"]["loss"], 4)}
    if "generation" in res:
        line["token_f1_word"] = round(res["generation"]["summary"]["metrics"]["token_f1_word"]["mean"], 4)
    print(json.dumps(line, ensure_ascii=False))
    return res


if __name__ == "__main__":
    main()
