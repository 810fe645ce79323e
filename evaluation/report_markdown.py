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


SUMMARY_METRICS = ("sft_loss", "pretrain_loss", "rouge_l_char", "token_f1_word", "answer_in_prediction")


def summary_lines(rep: dict) -> list[str]:
    """The report's statements; every number in them is a report.json number."""
    out = []
    base = rep["baseline_arm"]
    for arm, i in rep["arms"].items():
        if arm != base and i.get("flops_ratio_to_baseline") is not None:
            out.append(f"- Compute: **{arm}** needs {fmt(i['flops_ratio_to_baseline'])} × the training FLOPs per token "
                       f"of **{base}** ({i['flops_per_token']:,} vs {rep['arms'][base]['flops_per_token']:,}; "
                       f"active parameters {i['active_params']:,} vs {rep['arms'][base]['active_params']:,}).")
    for c in rep["comparisons"]:
        if c["metric"] not in SUMMARY_METRICS:
            continue
        est, lo, hi, how = _interval(c["across_seeds"], c["per_seed"])
        lower = c["metric"].endswith("_loss")
        out.append(f"- Quality ({c['stage']} checkpoint), {c['arm']} − {c['baseline']} on held-out {c['metric']}: "
                   f"{fmt(est)} [{fmt(lo)}, {fmt(hi)}] ({how}{'; lower is better' if lower else ''}) → "
                   f"**{_verdict(lo, hi, lower)}**.")
    for r in rep["routing"]:
        mv = ", ".join(f"layer {lay['layer']} {fmt(lay['max_violation']['mean'])}" for lay in r["layers"])
        ent = ", ".join(f"{fmt(lay['router_entropy']['mean'])}" for lay in r["layers"])
        out.append(f"- Load balance of **{r['arm']}** ({r['stage']} checkpoint, held-out text): max-violation "
                   f"(0 = perfectly balanced) {mv}; router entropy per layer {ent} nats "
                   f"(uniform = {fmt(r['router_entropy_max'])}).")
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
    L += ["", "## Expert load balance per layer (held-out pretraining text)", ""]
    for r in rep["routing"]:
        E = r["n_routed_experts"]
        L += [f"**{r['arm']}, {r['stage']} checkpoint** (seeds {r['seeds']}; uniform load = {fmt(1.0 / E)}, "
              f"max router entropy = {fmt(r['router_entropy_max'])} nats)", "",
              "| layer | load fractions per expert | max-violation | router entropy |", "| --- | --- | --- | --- |"]
        for lay in r["layers"]:
            mv, ent = lay["max_violation"], lay["router_entropy"]
            mvs = fmt(mv["mean"]) if mv["n_seeds"] == 1 else f"{fmt(mv['mean'])} ± {fmt(mv['std'])}"
            ens = fmt(ent["mean"]) if ent["n_seeds"] == 1 else f"{fmt(ent['mean'])} ± {fmt(ent['std'])}"
            L.append(f"| {lay['layer']} | {' '.join(fmt(x) for x in lay['load_fraction'])} | {mvs} | {ens} |")
        L.append("")
    if not rep["routing"]:
        L += ["No MoE arm was evaluated.", ""]
    L += ["## All metrics", "",
          "One seed: value [bootstrap 95% CI over held-out examples/items]. Several seeds: mean ± std across seeds "
          "[t 95% CI of the mean].", "",
          "| arm | stage | metric | value | 95% CI | seeds |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rep["table"]:
        v, ci = _cell(row)
        L.append(f"| {row['arm']} | {row['stage']} | {row['metric']} | {v} | {ci} | "
                 f"{', '.join(sorted(row['per_seed'], key=int))} |")
    L += ["", "## Training", "", "| arm | seed | stage | last step | last training loss | last validation losses |",
          "| --- | --- | --- | --- | --- | --- |"]
    for t in rep["training"]:
        vals = ", ".join(f"{k[len('final_'):]} {fmt(v)}" for k, v in t.items() if k.startswith("final_") and "/" in k)
        L.append(f"| {t['arm']} | {t['seed']} | {t['stage']} | {t['final_step']} | {fmt(t['final_train_loss'])} | "
                 f"{vals or 'n/a'} |")
    L += ["", "## Generation samples (held-out prompts, greedy)", ""]
    for name, smp in rep.get("samples", {}).items():
        L.append(f"**{name}**")
        L.append("")
        for x in smp:
            q = x["prompt"].replace("\n", " ⏎ ")[:200]
            L += [f"- `{x['id']}` ({x['task']}), stopped on end token: {x['stopped_on_eos']}, new tokens: {x['n_new_tokens']}",
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


