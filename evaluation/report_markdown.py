"""The report's Markdown: every number printed is a ``report.json`` number, formatted by :func:`fmt`."""

from __future__ import annotations

from .report_tables import fmt


def _cell(row: dict) -> tuple[str, str]:
    if row["n_seeds"] == 1:
        v = fmt(row["mean"])
        ci = f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]" if row.get("ci_low") is not None else "n/a"
        return v, ci
    return f"{fmt(row['mean'])} ± {fmt(row['std'])}", f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"


def _diff_text(row: dict) -> tuple[str, str, str]:
    s = row["across_seeds"]
    per = "; ".join(f"seed {k}: {fmt(d['diff'])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"
                    for k, d in sorted(row["per_seed"].items(), key=lambda kv: int(kv[0])))
    if s["n_seeds"] == 1:
        return fmt(s["mean"]), per, "1"
    return f"{fmt(s['mean'])} ± {fmt(s['std'])} (t CI [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}])", per, str(s["n_seeds"])


def _interval(summary: dict, per_seed: dict) -> tuple[float, float | None, float | None, str]:
    """(estimate, low, high, how) of a difference: the bootstrap CI with one seed, the t CI across seeds."""
    if summary["n_seeds"] == 1:
        d = next(iter(per_seed.values()))
        return d["diff"], d["ci_low"], d["ci_high"], "paired bootstrap 95% CI, 1 seed"
    return summary["mean"], summary["ci_low"], summary["ci_high"], \
        f"mean ± std {fmt(summary['std'])} over {summary['n_seeds']} seeds, t 95% CI"


def _verdict(lo, hi, lower_better: bool) -> str:
    if lo is None or hi is None:
        return "no interval"
    if lo > 0:
        return "worse" if lower_better else "better"
    if hi < 0:
        return "better" if lower_better else "worse"
    return "no clear difference (the interval contains 0)"


# the statements of the summary: the headline measures and the held-out losses (the text-overlap metrics are
# dominated by answer templates: they are in "All metrics" beside the template-alone score)
SUMMARY_METRICS = ("bpc_pretrain", "bpc_sft", "mc_acc/next_line", "form_rate", "repetition_rate", "sft_loss",
                   "pretrain_loss")
LOWER_IS_BETTER = ("pretrain_loss", "sft_loss", "bpc_pretrain", "bpc_sft", "repetition_rate")


def summary_lines(rep: dict) -> list[str]:
    """The report's statements; every number in them is a report.json number."""
    out = []
    base = rep["baseline_arm"]
    for arm, i in rep["arms"].items():
        if arm != base and i.get("flops_ratio_to_baseline") is not None:
            out.append(f"- Compute: **{arm}** needs {fmt(i['flops_ratio_to_baseline'])} × the training FLOPs per token "
                       f"of **{base}** ({i['flops_per_token']:,} vs {rep['arms'][base]['flops_per_token']:,}; "
                       f"active parameters {i['active_params']:,} vs {rep['arms'][base]['active_params']:,}).")
    comp = rep.get("compute") or {}
    for arm, d in (comp.get("by_arm") or {}).items():
        tot = (d.get("ratio_to_baseline") or {}).get("total") or {}
        t = tot.get("wall_s") or tot.get("train_s")
        if arm != base and t is not None and d.get("flops_per_token_ratio") is not None:
            how = "stage wall time" if tot.get("wall_s") else "training-loop time"
            out.append(f"- Measured compute: **{arm}** is matched to **{base}** in FLOPs per token "
                       f"({fmt(d['flops_per_token_ratio'])}×), {fmt(t)}× in measured time ({how}, all stages).")
    for c in rep["comparisons"]:
        if c["metric"] not in SUMMARY_METRICS:
            continue
        est, lo, hi, how = _interval(c["across_seeds"], c["per_seed"])
        lower = c["metric"] in LOWER_IS_BETTER
        out.append(f"- Quality ({c['stage']} checkpoint), {c['arm']} − {c['baseline']} on held-out {c['metric']}: "
                   f"{fmt(est)} [{fmt(lo)}, {fmt(hi)}] ({how}{'; lower is better' if lower else ''}) → "
                   f"**{_verdict(lo, hi, lower)}**.")
    for r in rep["routing"]:
        mv = ", ".join(f"layer {lay['layer']} {fmt(lay['max_violation']['mean'])}" for lay in r["layers"])
        ent = ", ".join(f"{fmt(lay['router_entropy']['mean'])}" for lay in r["layers"])
        dead = [f"layer {lay['layer']} expert {d['expert']} ({fmt(d['load_fraction'])})"
                for lay in r["layers"] for d in lay.get("near_dead", [])]
        out.append(f"- Load balance of **{r['arm']}** ({r['stage']} checkpoint, held-out text): max-violation "
                   f"(0 = perfectly balanced) {mv}; mean per-token router entropy per layer {ent} nats "
                   f"(uniform = {fmt(r['router_entropy_max'])}); near-dead experts (load below "
                   f"{fmt(r.get('near_dead_threshold'))}): " + (", ".join(dead) if dead else "none") + ".")
    for d in rep.get("dpo_heldout", []):
        acc, mar = d.get("reward_accuracy"), d.get("rewards/margins")
        if acc:
            out.append(f"- DPO of **{d['arm']}** seed {d['seed']}: held-out preference accuracy ({acc['metric']}, "
                       f"0.5 = chance) {fmt(acc['first'])} at step {acc['first_step']} → {fmt(acc['last'])} at step "
                       f"{acc['last_step']}" + (f"; reward margin {fmt(mar['first'])} → {fmt(mar['last'])}" if mar else "")
                       + ".")
    for f in rep["forgetting"]:
        s = f["across_seeds"]
        est, lo, hi, how = _interval(s, f["per_seed"])
        word = ("forgetting (loss went up)" if lo is not None and lo > 0 else
                "improvement (loss went down)" if hi is not None and hi < 0 else "no clear change")
        out.append(f"- Forgetting of **{f['arm']}**: held-out {f['heldout']} loss, DPO − SFT checkpoint = {fmt(est)} "
                   f"[{fmt(lo)}, {fmt(hi)}] ({how}) → **{word}**.")
    return out or ["- Nothing to compare: see Notes."]


def render_markdown(rep: dict) -> str:
    L = ["# MateConv run report", "",
         f"Run directory: `{rep['run_dir']}`. Every number below is computed by `python -m evaluation.report` from "
         "this run's files (`arms/*/seed*/*/metrics.jsonl`, `eval/*.json`, `eval/*_generations.jsonl`); "
         "`report.json` holds the same numbers. All evaluation data are held-out splits (never training data).", ""]
    L += ["## Summary", "", *summary_lines(rep), ""]
    L += headline_section(rep)
    L += compute_section(rep)
    L += ["## Setup", "", "| arm | MoE | total params | active params/token | FLOPs/token (seq len) | training seeds |",
          "| --- | --- | --- | --- | --- | --- |"]
    for arm, i in rep["arms"].items():
        fl = f"{i['flops_per_token']:,} ({i['flops_seq_len']})" if i["flops_per_token"] else "n/a"
        tp = f"{i['total_params']:,}" if i["total_params"] else "n/a"
        ap = f"{i['active_params']:,}" if i["active_params"] else "n/a"
        L.append(f"| {arm} | {i['use_moe']} | {tp} | {ap} | {fl} | {', '.join(map(str, rep['training_seeds'].get(arm, [])))} |")
    L += ["", f"Baseline arm for comparisons: **{rep['baseline_arm']}**. Bootstrap: "
          f"{rep['report_bootstrap']['n_resamples']} resamples, seed {rep['report_bootstrap']['seed']} (percentile 95% CI).", ""]
    L += ["Evaluations (held-out files, split, sizes, evaluation seed):", "",
          "| evaluation | split | pretraining file (items) | SFT file (items) | generation examples | eval seed |",
          "| --- | --- | --- | --- | --- | --- |"]
    for name, e in rep["evaluations"].items():
        L.append(f"| {name} | {e['split']} | `{e['pretrain_file']}` ({e['pretrain_items']}) | `{e['sft_file']}` "
                 f"({e['sft_items']}) | {e['n_examples']} | {e['bootstrap_seed']} |")
    L += ["", "## Dense vs MoE (paired, same held-out examples)", "",
          "Difference = arm − baseline. Per seed: paired bootstrap 95% CI over examples (losses: token-weighted "
          "over items). With several seeds: mean ± std of the per-seed differences.", "",
          "| arm | baseline | stage | metric | difference | per-seed difference [95% CI] | seeds |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in rep["comparisons"]:
        d, per, n = _diff_text(c)
        L.append(f"| {c['arm']} | {c['baseline']} | {c['stage']} | {c['metric']} | {d} | {per} | {n} |")
    if not rep["comparisons"]:
        L.append("| n/a | | | | | | |")
    L += ["", "## Forgetting: held-out loss change from the SFT to the DPO checkpoint", "",
          "DPO loss − SFT loss on the same held-out items (positive = forgetting).", "",
          "| arm | held-out text | change | per-seed SFT → DPO [95% CI of change] | seeds |", "| --- | --- | --- | --- | --- |"]
    for f in rep["forgetting"]:
        s = f["across_seeds"]
        d = fmt(s["mean"]) if s["n_seeds"] == 1 else f"{fmt(s['mean'])} ± {fmt(s['std'])}"
        per = "; ".join(f"seed {k}: {fmt(v['sft_loss'])} → {fmt(v['dpo_loss'])}, change {fmt(v['diff'])} "
                        f"[{fmt(v['ci_low'])}, {fmt(v['ci_high'])}]" for k, v in sorted(f["per_seed"].items(),
                                                                                      key=lambda kv: int(kv[0])))
        L.append(f"| {f['arm']} | {f['heldout']} | {d} | {per} | {s['n_seeds']} |")
    if not rep["forgetting"]:
        L.append("| n/a | | | | |")
    L += dpo_shared_section(rep)
    L += ["", "## Expert load balance per layer (held-out pretraining text)", ""]
    for r in rep["routing"]:
        E = r["n_routed_experts"]
        L += [f"**{r['arm']}, {r['stage']} checkpoint** (seeds {r['seeds']}; uniform load = {fmt(1.0 / E)}, "
              f"max router entropy = {fmt(r['router_entropy_max'])} nats)", "",
              "| layer | load fractions per expert | max-violation | router entropy | near-dead experts |",
              "| --- | --- | --- | --- | --- |"]
        for lay in r["layers"]:
            mv, ent = lay["max_violation"], lay["router_entropy"]
            mvs = fmt(mv["mean"]) if mv["n_seeds"] == 1 else f"{fmt(mv['mean'])} ± {fmt(mv['std'])}"
            ens = fmt(ent["mean"]) if ent["n_seeds"] == 1 else f"{fmt(ent['mean'])} ± {fmt(ent['std'])}"
            dead = ", ".join(str(d["expert"]) for d in lay.get("near_dead", [])) or "none"
            L.append(f"| {lay['layer']} | {' '.join(fmt(x) for x in lay['load_fraction'])} | {mvs} | {ens} | {dead} |")
        L.append("")
    if not rep["routing"]:
        L += ["No MoE arm was evaluated.", ""]
    for t in rep.get("routing_training", []):
        dead = ", ".join(f"layer {d['layer']} expert {d['expert']} ({fmt(d['load_fraction'])})" for d in t["near_dead"])
        L += [f"Training, last logged window of {t['arm']} seed {t['seed']} {t['stage']} (step {t['step']}): "
              f"near-dead experts (below {fmt(t['near_dead_threshold'])}): {dead or 'none'}.", ""]
    L += metric_notes(rep)
    L += ["## All metrics", "",
          "One seed: value [bootstrap 95% CI over held-out examples/items]. Several seeds: mean ± std across seeds "
          "[t 95% CI of the mean].", "",
          "| arm | stage | metric | value | 95% CI | seeds |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rep["table"]:
        v, ci = _cell(row)
        L.append(f"| {row['arm']} | {row['stage']} | {row['metric']} | {v} | {ci} | "
                 f"{', '.join(sorted(row['per_seed'], key=int))} |")
    L += ["", "## Training", "", "| arm | seed | stage | last step | last training loss | last validation losses (and bits/char) |",
          "| --- | --- | --- | --- | --- | --- |"]
    for t in rep["training"]:
        vals = ", ".join(f"{k[len('final_'):]} {fmt(v)}" for k, v in t.items() if k.startswith("final_") and "/" in k)
        L.append(f"| {t['arm']} | {t['seed']} | {t['stage']} | {t['final_step']} | {fmt(t['final_train_loss'])} | "
                 f"{vals or 'n/a'} |")
    L += ["", "## Generation samples (held-out prompts, greedy; one per task, and verse-form answers)", ""]
    for name, smp in rep.get("samples", {}).items():
        L.append(f"**{name}**")
        L.append("")
        for x in smp:
            q = x["prompt"].replace("\n", " ⏎ ")[:200]
            extra = (f", in form: {x['form_ok']}, degenerate: {x['degenerate']}" if x.get("kind") == "verse"
                     and x.get("form_ok") is not None else "")
            L += [f"- `{x['id']}` ({x['task']}{', verse' if x.get('kind') == 'verse' else ''}), stopped on end token: "
                  f"{x['stopped_on_eos']}, new tokens: {x['n_new_tokens']}{extra}",
                  f"  - prompt: {q}", f"  - reference: {x['reference'][:200]}", f"  - output: {x['prediction'][:200]}"]
        L.append("")
    L += ["", "## Figures", ""]
    if rep.get("flops_token_sources"):
        L += ["Tokens for the FLOPs axis: " + "; ".join(f"{k}: {v}" for k, v in sorted(rep["flops_token_sources"].items()))
              + ".", ""]
    for f in rep["figures"]:
        L += [f"![{f['caption']}]({f['file']})", "", f"*{f['caption']}*", ""]
    L += ["## Notes", ""]
    L += [f"- {n}" for n in rep["notes"]] or ["- none"]
    L.append("")
    return "\n".join(L)




def _v(v: dict | None) -> str:
    if not v or v.get("mean") is None:
        return "n/a"
    if v.get("ci_low") is None:
        return fmt(v["mean"])
    return f"{fmt(v['mean'])} [{fmt(v['ci_low'])}, {fmt(v['ci_high'])}]"


HEADLINE_DOC = {
    "bpc_pretrain": "bits per character of held-out pretraining text (summed NLL / characters / ln 2; lower is better)",
    "bpc_sft": "bits per character of held-out SFT answers",
    "mc_centred/next_line": "next line among 4 (multiple choice, centred accuracy: 0 = chance, 1 = perfect)",
    "mc_centred/author": "author among 4", "mc_centred/title": "title among 4",
    "mc_centred/form": "form (五言/七言 绝句/律诗) or 词牌 among 4", "mc_centred/cloze": "a missing 2-character span among 4",
    "form_rate": "write_poem answers in the requested form (half-line length, punctuation, line count)",
    "line_rate": "continue_line answers of the given line's length",
    "repetition_rate": "repeated character bigrams in write_poem + continue_line answers (lower is better)",
}


def headline_section(rep: dict) -> list[str]:
    h = rep.get("headline") or {}
    cols = h.get("columns") or []
    if not cols:
        return []
    L = ["## Headline: measures that move when a small model learns", "",
         "Value [95% CI] (one seed: bootstrap over held-out items; several seeds: mean with a t CI over seeds). "
         "Multiple-choice tasks come from the test split only (`evaluation/mc.py`); verse measures are on answers "
         "to held-out write_poem / continue_line prompts sampled as the evaluation records them (temperature 0.7, "
         "top_p 0.9, seeded per prompt, unless `--verse_temperature` said otherwise; `evaluation/verse.py`).", "",
         "| arm | stage | " + " | ".join(cols) + " |", "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for r in h["rows"]:
        L.append(f"| {r['arm']} | {r['stage']} | " + " | ".join(_v(r["values"].get(c)) for c in cols) + " |")
    ref = h.get("reference_repetition_rate")
    if ref:
        L += ["", f"Repetition rate of the reference answers of the same prompts (the SFT data itself): {_v(ref)}."]
    L += ["", *[f"- `{c}`: {HEADLINE_DOC.get(c, c)}" for c in cols], ""]
    heads = [c for c in rep["comparisons"] if c["metric"] in cols or c["metric"].startswith("mc_acc/")
             or c["metric"] in ("bpc_pretrain", "bpc_sft")]
    if heads:
        L += ["Paired differences on the same held-out items (arm − baseline):", "",
              "| arm | baseline | stage | measure | difference | per-seed difference [95% CI] | seeds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in heads:
            d, per, n = _diff_text(c)
            L.append(f"| {c['arm']} | {c['baseline']} | {c['stage']} | {c['metric']} | {d} | {per} | {n} |")
        L.append("")
    floors = rep.get("floors") or []
    if floors:
        L += ["Floors of the default job (checked on every arm's SFT checkpoint):", "",
              "| arm | floor | value [95% CI] | threshold | met |", "| --- | --- | --- | --- | --- |"]
        for f in floors:
            val = _v({"mean": f["value"], "ci_low": f.get("ci_low"), "ci_high": f.get("ci_high")})
            met = "n/a" if f["met"] is None else ("yes" if f["met"] else "no")
            L.append(f"| {f['arm']} | {f['floor']} | {val} | {fmt(f['threshold'])} | {met} |")
        L.append("")
    return L


def compute_section(rep: dict) -> list[str]:
    comp = rep.get("compute") or {}
    if not comp.get("rows"):
        return []
    L = ["## Measured compute", "",
         "Per arm, seed and stage: the training loop's time (`elapsed_s` of metrics.jsonl), the stage's wall time "
         "(run.json `stage_seconds`, with loading and saving), tokens and FLOPs (cumulative `tokens` / `flops` of "
         "metrics.jsonl when logged) and tokens/s.", "",
         "| arm | seed | stage | training s | stage wall s | tokens | tokens/s | FLOPs | tokens from |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in comp["rows"]:
        L.append(f"| {r['arm']} | {r['seed']} | {r['stage']} | {fmt(r['train_s'])} | {fmt(r['wall_s'])} | "
                 f"{fmt(r['tokens'])} | {fmt(r['tokens_per_s'])} | {_sci(r['flops'])} | {r['tokens_source'] or 'n/a'} |")
    L.append("")
    for arm, d in comp.get("by_arm", {}).items():
        rat = d.get("ratio_to_baseline") or {}
        if not rat:
            continue
        parts = ", ".join(f"{st} {fmt(v.get('wall_s') or v.get('train_s'))}×" for st, v in rat.items()
                          if st != "total" and (v.get("wall_s") or v.get("train_s")))
        L.append(f"- **{arm}** vs **{comp['baseline']}**: FLOPs per token {fmt(d.get('flops_per_token_ratio'))}×; "
                 f"measured time {parts or 'n/a'}; FLOPs spent {fmt((rat.get('total') or {}).get('flops'))}×.")
    L.append("")
    return L


def _sci(x) -> str:
    return "n/a" if x is None else f"{float(x):.3e}"


def metric_notes(rep: dict) -> list[str]:
    """What the text-overlap metrics measure: the template-alone score beside the model's."""
    rows = {(r["arm"], r["stage"], r["metric"]): r for r in rep["table"]}
    lines = []
    for (arm, stage, metric), r in sorted(rows.items()):
        if not metric.startswith("template_only/"):
            continue
        m = metric.split("/", 1)[1]
        model = rows.get((arm, stage, m))
        if model is not None:
            lines.append(f"| {arm} | {stage} | {m} | {fmt(model['mean'])} | {fmt(r['mean'])} |")
    if not lines:
        return []
    return ["## What the text-overlap metrics measure", "",
            "The score of the answer *template alone* (the reference with its exact answer removed, e.g. "
            "`这首诗的作者是唐代的。`) against the reference, beside the model's: where the two are close, the metric "
            "measures the template, not the answer, so these metrics are not headlined. `token_f1_word` (bag of "
            "words, order ignored) and `rouge_l_word` (longest common subsequence, order kept) differ only when "
            "shared words come in another order, rare in short template answers; `task_accuracy` is the share of "
            "exact-answer examples whose answer occurs in the output (`answer_in_prediction` per example, the one "
            "rule; `exact_match` is the strict equality).", "",
            "| arm | stage | metric | model | template alone |", "| --- | --- | --- | --- | --- |", *lines, ""]


def dpo_shared_section(rep: dict) -> list[str]:
    d = rep.get("dpo_shared") or {}
    if not d.get("rows"):
        return []
    L = ["", "## DPO on one shared held-out pair set (comparable across arms)", "",
         "Pairs from held-out SFT prompts: chosen = the reference answer, rejected = the reference answer of another "
         "prompt of the same task (`evaluation/pairs.py`), the same pairs for every arm. Reward accuracy: the DPO "
         "checkpoint's implicit reward (log-prob minus the SFT checkpoint's) prefers the chosen answer (tie 0.5); "
         "preference accuracy: a checkpoint gives the chosen answer the higher log-probability.", "",
         "| arm | seed | pairs | reward accuracy [95% CI] | SFT preference accuracy | DPO preference accuracy |",
         "| --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        L.append(f"| {r['arm']} | {r['seed']} | {r['n_pairs']} | {_v(r['reward_accuracy'])} | "
                 f"{_v(r['sft_preference_accuracy'])} | {_v(r['dpo_preference_accuracy'])} |")
    for c in d.get("comparisons", []):
        dtext, per, n = _diff_text(c)
        L += ["", f"Reward accuracy, {c['arm']} − {c['baseline']} on the same pairs: {dtext} ({per}; {n} seed(s))."]
    return L
