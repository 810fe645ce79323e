"""Evaluate one checkpoint on held-out data and write a metrics JSON with every number and its source.

    python -m evaluation.evaluate --checkpoint out/sft --split validation --out eval/dense_seed0_sft.json \\
        [--tokenizer DIR] [--data_dir data/embedded] [--max_examples 64] [--max_items 256] [--bpc_items 200] \\
        [--mc_dir DIR] [--mc_items 100] [--no_mc] [--verse_examples 32] [--pairs_items 100] [--quiet]

Computed (each with data file, split, number of items/examples and bootstrap seed):
    * ``pretrain``: loss / perplexity on held-out pretraining text (``pretrain_<split>.jsonl`` or a ``.bin``)
      with per-item NLL sums and token counts (for paired bootstraps in the report), and MoE routing
      statistics of that pass (``pretrain.routing``, :mod:`evaluation.routing`);
    * ``sft``: loss / perplexity on the answers of held-out SFT conversations (``sft_<split>.jsonl``);
    * ``bpc``: bits per character (:mod:`evaluation.bpc`) on a fixed spread sample of held-out pretraining
      texts (always the JSONL) and SFT answers, with per-text NLL and characters and a bootstrap CI;
    * ``mc``: multiple-choice log-likelihood tasks built from the **test** split (:mod:`evaluation.mc`):
      accuracy, chance, centred accuracy with CIs; per item in ``<out stem>_mc.jsonl``;
    * ``pairs``: log-probabilities of one shared held-out preference-pair set (:mod:`evaluation.pairs`),
      per pair in ``<out stem>_pairs.jsonl`` (the report turns an arm's SFT and DPO files into a reward accuracy);
    * ``generation``: greedy answers to the held-out SFT prompts -> Token-F1 / ROUGE-L (jieba words and
      characters) with bootstrap 95% CIs, exact-task accuracy, stop rate, the template-alone baseline and
      one sample per task; per-example JSONL beside the output (``<out stem>_generations.jsonl``);
    * ``verse``: verse form and degeneration (:mod:`evaluation.verse`) of sampled answers (seeded per prompt,
      temperature 0.7, top_p 0.9; ``--verse_temperature 0``: greedy) to held-out write_poem / continue_line prompts and of their references; per example in ``<out stem>_verse.jsonl``;
    * ``judge`` (optional, off by default): LLM-judge win rate against another arm's generations.

Progress: one plain line per part on stdout (``--quiet``: only the final JSON line).

A ``train`` split or a file named as one is refused; held-out records that also occur in the sibling
train file (same id or identical text / conversation) are left out of every metric and counted under
``train_overlap_check`` (``excluded``, ``overlap_ids``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .generate_eval import generate_answers, load_heldout_examples, read_jsonl, summarize, write_jsonl
from .heldout import check_heldout_path, heldout_loss, overlap_summary, train_overlap

SCHEMA_VERSION = 1
# Verse samples are drawn, not greedy: greedy decoding makes a small model repeat itself (a 3M-parameter model's
# greedy write_poem answers had a repetition rate of 0.44 where sampled ones had 0.00), and the verse measures are
# about what the model writes when used. Chosen on the validation split (benchmarks/README.md, "Verse decoding").
VERSE_TEMPERATURE = 0.7
VERSE_TOP_P = 0.9


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


def _say(progress: bool, msg: str) -> None:
    """A plain progress line (stdout, flushed): what the evaluation is doing now."""
    if progress:
        print(f"[evaluate] {msg}", flush=True)


def template_baseline(examples: list[dict]) -> dict:
    """The text-overlap score of the answer *template alone*: for each exact-answer example, the
    reference with its answer removed (``这首诗的作者是唐代的。``) scored against the reference; examples
    without an exact answer have no template (the whole reference is content) and score 0 (empty
    prediction). A model metric near this value measures the template, not the answer."""
    from .metrics import all_text_metrics

    rows, by_task = [], {}
    for ex in examples:
        ref, ans = ex["reference"], ex.get("answer")
        tmpl = ref.replace(ans, "") if ans and ans in ref else ""
        m = all_text_metrics(tmpl, ref) if tmpl else dict.fromkeys(("token_f1_word", "token_f1_char", "rouge_l_word",
                                                                      "rouge_l_char"), 0.0)
        rows.append(m)
        by_task.setdefault(ex["task"], []).append(m)
    mean = (lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else None)  # noqa: E731
    keys = ("token_f1_word", "token_f1_char", "rouge_l_word", "rouge_l_char")
    return {"all": {k: mean(rows, k) for k in keys},
            "tasks": {t: {k: mean(rs, k) for k in keys} | {"n": len(rs)} for t, rs in sorted(by_task.items())}}


def samples_by_task(records: list[dict], per_task: int = 1) -> list[dict]:
    """The first ``per_task`` records of every task (so the report shows every task kind)."""
    out, seen = [], {}
    for r in records:
        if seen.get(r["task"], 0) < per_task:
            seen[r["task"]] = seen.get(r["task"], 0) + 1
            out.append(r)
    return out


def verse_examples(sft_file, split: str, n_per_task: int, seed: int) -> list[dict]:
    """Held-out ``write_poem`` prompts that name a regulated form and ``continue_line`` prompts that give
    a 5- or 7-character line: ``n_per_task`` of each, a fixed seeded sample spread over collections."""
    from .bpc import spread_sample
    from .verse import given_line, han, requested_form

    exs = load_heldout_examples(sft_file, split)
    out = []
    for task in ("write_poem", "continue_line"):
        pool = []
        for ex in exs:
            if ex["task"] != task:
                continue
            q = ex["messages"][-1]["content"]
            if task == "write_poem" and requested_form(q) is None:
                continue
            g = given_line(q) if task == "continue_line" else None
            if task == "continue_line" and not (g and len(g) in (5, 7) and han(g) == g):
                continue
            pool.append(ex)
        recs = [{"id": ex["id"], "task": ex["task"]} for ex in pool]
        out += [pool[i] for i in spread_sample(recs, n_per_task, seed)]
    return out


def _bpc_part(tokenizer, model, path, n: int, seed: int, max_seq_len: int, batch_size: int,
              n_resamples: int) -> dict:
    from .bpc import LN2, HeldoutBPC
    from .metrics import ratio_bootstrap

    ev = HeldoutBPC(tokenizer, path, n=n, seed=seed, max_seq_len=max_seq_len, batch_size=batch_size)
    out = ev.evaluate(model, per_text=True)
    ci = ratio_bootstrap(out["text_nll"], out["text_chars"], n_resamples=n_resamples, seed=seed)
    out.update({"bpc_ci_low": ci["ci_low"] / LN2, "bpc_ci_high": ci["ci_high"] / LN2,
                "data_file": str(path), "sample": ev.sample_info, "definition": "evaluation/bpc.py"})
    return out


def evaluate_model(model, tokenizer, split: str = "validation", data_dir="data/embedded",
                   pretrain_file=None, sft_file=None, max_items: int | None = None,
                   max_examples: int | None = None, max_seq_len: int | None = None, max_new_tokens: int = 64,
                   batch_size: int = 8, seed: int = 0, n_resamples: int = 2000, generations_out=None,
                   do_generation: bool = True, judge: dict | None = None, bpc_items: int | None = 200,
                   mc_dir=None, mc_items: int | None = 100, do_mc: bool = True, mc_out=None,
                   verse_examples_per_task: int = 32, verse_new_tokens: int = 96, verse_out=None,
                   verse_temperature: float = VERSE_TEMPERATURE, verse_top_p: float = VERSE_TOP_P,
                   pairs_items: int = 100, pairs_out=None, progress: bool = False) -> dict:
    """Every held-out metric of ``model`` as one dict (what the CLI writes). ``progress``: print a plain
    line as each part starts and ends."""
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
    _say(progress, f"held-out loss on pretraining text {pretrain_file} ...")
    res["pretrain"] = heldout_loss(model, tokenizer, pretrain_file, "pretrain", **common)
    timing["pretrain_loss_s"], t = round(time.time() - t, 2), time.time()
    _say(progress, f"  loss {res['pretrain']['loss']:.4f} nats/token on {res['pretrain']['n_items']} items "
                   f"({timing['pretrain_loss_s']}s); held-out loss on SFT answers {sft_file} ...")
    res["sft"] = heldout_loss(model, tokenizer, sft_file, "sft", **common)
    timing["sft_loss_s"], t = round(time.time() - t, 2), time.time()
    _say(progress, f"  loss {res['sft']['loss']:.4f} on {res['sft']['n_items']} items ({timing['sft_loss_s']}s)")
    res["routing"] = res["pretrain"].get("routing")  # routing statistics on held-out pretraining text
    # bits per character: pretraining text (always the JSONL: characters need the text) and SFT answers
    text_file = files["pretrain"] if pretrain_file.suffix == ".bin" else pretrain_file
    res["bpc"] = {}
    for part, path in (("pretrain", text_file), ("sft", sft_file)):
        if not Path(path).is_file():
            continue
        _say(progress, f"bits per character on {path} ({bpc_items or 'all'} texts) ...")
        res["bpc"][part] = _bpc_part(tokenizer, model, path, bpc_items, seed, max_seq_len, batch_size * 2, n_resamples)
        _say(progress, f"  {res['bpc'][part]['bpc']:.4f} bits/char on {res['bpc'][part]['n_texts']} texts")
    timing["bpc_s"], t = round(time.time() - t, 2), time.time()
    if do_mc:
        from .mc import ensure_mc_items, load_mc_items, score_mc, summarize_mc

        if mc_dir:  # given task files, used as they are
            mc_files = {p.stem[len("mc_"):-len("_test")]: p for p in sorted(Path(mc_dir).glob("mc_*_test.jsonl"))}
            if not mc_files:
                raise FileNotFoundError(f"no multiple-choice task files (mc_<task>_test.jsonl) in {mc_dir}")
        else:  # built once from the corpus's test split (evaluation.mc)
            mc_dir = Path(data_dir) / "mc"
            mc_files = ensure_mc_items(mc_dir)
        if split != "test":
            _say(progress, f"multiple-choice tasks come from the test split ({mc_dir}); this evaluation's "
                           f"split is {split}")
        items = load_mc_items(mc_files)
        if mc_items is not None:
            by_task: dict[str, list] = {}
            for it in items:
                by_task.setdefault(it["task"], []).append(it)
            items = [it for rs in by_task.values() for it in rs[:mc_items]]
        _say(progress, f"multiple choice: {len(items)} items from {mc_dir} ...")
        last = [time.time()]

        def tick(done, total):
            if progress and time.time() - last[0] > 10:
                last[0] = time.time()
                _say(True, f"  multiple choice: {done}/{total} option rows")

        recs = score_mc(model, tokenizer, items, batch_size=batch_size * 4, max_len=max_seq_len, progress=tick)
        res["mc"] = {"files": {k: str(v) for k, v in mc_files.items()}, "split": "test", "n_items": len(recs),
                     "scoring": "sum of option token log-probs (acc); per-character normalised (acc_norm)",
                     "summary": summarize_mc(recs, n_resamples, seed)}
        if mc_out:
            res["mc"]["per_item_file"] = str(write_jsonl(recs, mc_out))
        timing["mc_s"], t = round(time.time() - t, 2), time.time()
        _say(progress, "  " + ", ".join(f"{k} {v['acc']['mean']:.3f} (chance {v['chance']:.2f})"
                                        for k, v in res["mc"]["summary"].items()) + f" ({timing['mc_s']}s)")
    if pairs_items:
        from .pairs import pair_logps, preference_accuracy, shared_pairs

        pairs = shared_pairs(sft_file, pairs_items, seed)
        _say(progress, f"shared held-out preference pairs: {len(pairs)} from {sft_file} ...")
    if pairs_items and not pairs:
        _say(progress, "  no pairs (no two different reference answers of one task): no shared-pair evaluation")
    elif pairs_items:
        precs = pair_logps(model, tokenizer, pairs, max_seq_len, batch_size=batch_size * 2)
        res["pairs"] = {"data_file": str(sft_file), "split": split, "n_pairs": len(precs), "seed": seed,
                        "construction": "evaluation/pairs.py: chosen = reference answer, rejected = the reference "
                                        "answer of another held-out prompt of the same task",
                        "preference_accuracy": preference_accuracy(precs, n_resamples, seed)}
        if pairs_out:
            res["pairs"]["per_pair_file"] = str(write_jsonl(precs, pairs_out))
        timing["pairs_s"], t = round(time.time() - t, 2), time.time()
        _say(progress, f"  preference accuracy {res['pairs']['preference_accuracy']['mean']} ({timing['pairs_s']}s)")
    if do_generation:
        from .verse import verse_summary

        examples = load_heldout_examples(sft_file, split, max_examples=max_examples, seed=seed)
        _say(progress, f"greedy answers to {len(examples)} held-out prompts (max {max_new_tokens} new tokens) ...")
        records = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
        gen = {"data_file": str(sft_file), "split": split, "max_new_tokens": max_new_tokens,
               "decoding": "greedy", "subset_seed": seed, "summary": summarize(records, n_resamples, seed),
               "samples": records[:5], "samples_by_task": samples_by_task(records),
               "template_baseline": template_baseline(examples)}
        gen["n_examples"] = gen["summary"]["n_examples"]
        gen["train_overlap_check"] = overlap_summary(train_overlap(sft_file))
        if generations_out:
            gen["per_example_file"] = str(write_jsonl(records, generations_out))
        res["generation"] = gen
        timing["generation_s"], t = round(time.time() - t, 2), time.time()
        _say(progress, f"  done ({timing['generation_s']}s)")
        if verse_examples_per_task:
            vex = verse_examples(sft_file, split, verse_examples_per_task, seed)
            decoding = (f"sampled (temperature {verse_temperature:g}, top_p {verse_top_p:g}, seeded per prompt)"
                        if verse_temperature > 0 else "greedy")
            _say(progress, f"verse form: {decoding} answers to {len(vex)} write_poem / continue_line prompts "
                           f"(max {verse_new_tokens} new tokens) ...")
            vrec = generate_answers(model, tokenizer, vex, max_new_tokens=verse_new_tokens, batch_size=batch_size,
                                    temperature=verse_temperature, top_p=verse_top_p, seed=seed)
            vs = verse_summary(vrec, n_resamples, seed)
            per = {p["id"]: p for p in vs.pop("per_example")}
            for r in vrec:
                if r["id"] in per:
                    r["verse"], r["verse_reference"] = per[r["id"]]["model"], per[r["id"]]["reference"]
            res["verse"] = {"data_file": str(sft_file), "split": split, "decoding": decoding,
                            "temperature": verse_temperature, "top_p": verse_top_p,
                            "max_new_tokens": verse_new_tokens, "n_examples": len(vrec), "subset_seed": seed,
                            **vs, "samples_by_task": samples_by_task(vrec, 2)}
            if verse_out:
                res["verse"]["per_example_file"] = str(write_jsonl(vrec, verse_out))
            timing["verse_s"], t = round(time.time() - t, 2), time.time()
            allv = vs["tasks"].get("all", {}).get("model", {})
            _say(progress, f"  form rate {(allv.get('form_ok') or {}).get('mean', float('nan')):.3f}, repetition rate "
                           f"{(allv.get('repetition_rate') or {}).get('mean', float('nan')):.3f} ({timing['verse_s']}s)")
        if judge and judge.get("base_url") and judge.get("against"):
            from .judge import judge_win_rate

            _say(progress, "LLM judge ...")
            res["judge"] = judge_win_rate(records, read_jsonl(judge["against"]), judge["base_url"],
                                          judge.get("model", "gpt-4o-mini"), max_examples=judge.get("max_examples"),
                                          seed=seed)
            res["judge"]["against"] = str(judge["against"])
    res["timing"] = timing
    res["seconds"] = round(time.time() - t0, 2)
    _say(progress, f"done in {res['seconds']}s")
    return res


def evaluate_checkpoint(checkpoint, out=None, tokenizer=None, device: str = "cpu", **kwargs) -> dict:
    """Load ``checkpoint`` (and its tokenizer), evaluate, and write ``out`` (JSON) when given."""
    checkpoint = resolve(checkpoint)
    model = load_checkpoint(checkpoint, device)
    tok = load_eval_tokenizer(tokenizer, checkpoint)
    if out is not None and kwargs.get("generations_out") is None and kwargs.get("do_generation", True):
        kwargs["generations_out"] = Path(out).with_name(Path(out).stem + "_generations.jsonl")
    if out is not None and kwargs.get("verse_out") is None and kwargs.get("do_generation", True):
        kwargs["verse_out"] = Path(out).with_name(Path(out).stem + "_verse.jsonl")
    if out is not None and kwargs.get("pairs_out") is None and kwargs.get("pairs_items", 100):
        kwargs["pairs_out"] = Path(out).with_name(Path(out).stem + "_pairs.jsonl")
    if out is not None and kwargs.get("mc_out") is None and kwargs.get("do_mc", True):
        kwargs["mc_out"] = Path(out).with_name(Path(out).stem + "_mc.jsonl")
    res = evaluate_model(model, tok, **kwargs)
    res["checkpoint"] = str(checkpoint)
    res["tokenizer"] = str(tokenizer or checkpoint)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
    return res


def _no_bars_off_tty() -> None:
    """Progress bars only on a terminal: a log file (``nohup``, a pipeline log) gets plain lines only."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict:
    _no_bars_off_tty()
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
    ap.add_argument("--bpc_items", type=int, default=200, help="texts per held-out file for bits per character")
    ap.add_argument("--mc_dir", default=None, help="a directory of multiple-choice task files mc_<task>_test.jsonl, "
                    "used as they are (default: <data_dir>/mc, built from the corpus's test split when missing)")
    ap.add_argument("--mc_items", type=int, default=100, help="multiple-choice items per task (at most 200)")
    ap.add_argument("--no_mc", action="store_true", help="skip the multiple-choice tasks")
    ap.add_argument("--verse_examples", type=int, default=32,
                    help="write_poem and continue_line prompts (each) for the verse-form measures; 0 = none")
    ap.add_argument("--verse_new_tokens", type=int, default=96)
    ap.add_argument("--verse_temperature", type=float, default=VERSE_TEMPERATURE,
                    help="sampling temperature of the verse samples (0: greedy, which makes small models loop) "
                         f"[{VERSE_TEMPERATURE}]")
    ap.add_argument("--verse_top_p", type=float, default=VERSE_TOP_P, help=f"nucleus of the verse samples [{VERSE_TOP_P}]")
    ap.add_argument("--pairs_items", type=int, default=100,
                    help="shared held-out preference pairs (evaluation/pairs.py) scored for the DPO comparison; 0 = none")
    ap.add_argument("--quiet", action="store_true", help="no progress lines (only the final JSON line)")
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
                              n_resamples=a.n_resamples, do_generation=not a.no_generation, judge=judge,
                              bpc_items=a.bpc_items, mc_dir=a.mc_dir, mc_items=a.mc_items, do_mc=not a.no_mc,
                              verse_examples_per_task=a.verse_examples, verse_new_tokens=a.verse_new_tokens,
                              verse_temperature=a.verse_temperature, verse_top_p=a.verse_top_p,
                              pairs_items=a.pairs_items, progress=not a.quiet)
    line = {"out": a.out, "pretrain_loss": round(res["pretrain"]["loss"], 4), "sft_loss": round(res["sft"]["loss"], 4)}
    for part, b in res.get("bpc", {}).items():
        line[f"{part}_bpc"] = round(b["bpc"], 4)
    if "generation" in res:
        line["token_f1_word"] = round(res["generation"]["summary"]["metrics"]["token_f1_word"]["mean"], 4)
    print(json.dumps(line, ensure_ascii=False))
    return res


if __name__ == "__main__":
    main()
