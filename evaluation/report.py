"""The run report: ``python -m evaluation.report --run_dir DIR`` -> report.md, report.json, figures/*.png.

Expected layout of a run directory (what ``pipeline.py`` writes; anything missing is reported as
missing in the report's "Notes", never invented)::

    <run_dir>/
      run.json                                   optional: {"baseline_arm": "dense", "max_seq_len": 256,
                                                 #  "tokens_per_step": {"pretrain": N, "sft": N, "dpo": N},
                                                 #  "stage_seconds": {"<arm>_seed<k>_<stage>": wall seconds}}
      arms/<arm>/seed<k>/<stage>/metrics.jsonl   trainer logs (trainer: --out_dir arms/<arm>/seed<k> --run_name <stage>;
                                                 #  a run name like sft_<tag> is read as stage "sft"), stage in pretrain|sft|dpo
      arms/<arm>/seed<k>/<stage>/**/config.json  optional (checkpoint config; FLOPs per token when no eval JSON)
      eval/<arm>_seed<k>_<stage>.json            python -m evaluation.evaluate output, stage in sft | dpo (| pretrain)
      eval/<arm>_seed<k>_<stage>_generations.jsonl   its per-example generations
      eval/<arm>_seed<k>_<stage>_mc.jsonl        its multiple-choice records (per item)
      eval/<arm>_seed<k>_<stage>_verse.jsonl     its verse-form answers (per example)
      eval/<arm>_seed<k>_<stage>_pairs.jsonl     its log-probs of the shared held-out preference pairs

``metrics.jsonl`` fields read (any may be missing; a missing field drops that curve with a note):
``step``; training ``loss``; validation ``<name>/loss`` and ``<name>/bpc`` for any eval set name
(``val/loss``, ``val/bpc`` ...); ``elapsed_s`` (training-loop time); cumulative ``flops`` (the FLOPs
axis when logged) and tokens (``tokens``, ``tokens_seen``, ``train/tokens`` or ``num_tokens``; else
estimated from ``tokens_per_s`` x time, else ``step x run.json tokens_per_step[stage]``, each named in
``flops_token_sources``); MoE ``moe/layer{l}/expert{e}_load``; DPO ``rewards/margins``,
``rewards/accuracies``, ``kl`` and held-out versions ``<name>/rewards/margins`` ...; forgetting probe
``probe/pretrain_loss``, ``probe/sft_loss``.

Numbers (every one is computed here from the files above; ``report.json`` holds each number the
Markdown shows, under the same names):
    * metric table: per arm x stage x metric; one seed -> value [bootstrap 95% CI over examples / items];
      several seeds -> mean ± std across seeds (sample std) with a t 95% CI of the mean;
    * comparisons: every arm minus the baseline arm (the first dense arm unless ``run.json`` names one)
      on the same held-out examples: paired bootstrap of the mean difference per seed (generation
      metrics per example; losses token-weighted per item), then mean ± std of the per-seed differences;
    * forgetting: held-out pretraining and SFT loss of the DPO checkpoint minus the SFT checkpoint, paired
      over the same items (positive = forgetting), per arm and seed, and across seeds;
    * routing (MoE): per-layer load fractions, max-violation (max load / mean load - 1), mean per-token
      router entropy, near-dead experts (below 10% of the uniform load) on held-out pretraining text,
      averaged over seeds; ``routing_training``: near-dead experts of the last logged training window;
    * ``headline``: bpc (pretraining text, SFT answers), centred multiple-choice accuracy per task, form
      rate, line rate, repetition rate (and the reference answers' rate) per arm and stage, the metric
      table's values and CIs; paired differences between arms are in ``comparisons`` (``bpc_*``,
      ``mc_acc/<task>``, ``form_rate``, ``line_rate``, ``repetition_rate``);
    * ``floors``: the default job's floors on every arm's SFT checkpoint (value, CI, threshold, met);
    * ``compute``: per arm, seed and stage ``train_s``, ``wall_s``, ``tokens``, ``tokens_per_s``, ``flops``
      (with their sources), ``by_arm`` sums and the ratios to the baseline ("matched in FLOPs per token,
      X.Xx in measured time");
    * ``dpo_shared``: reward accuracy of each arm's DPO checkpoint against its SFT checkpoint on the one
      shared held-out pair set (:mod:`evaluation.pairs`), with CIs and paired differences between arms;
    * ``samples``: per evaluation one answer per task and two verse answers per task.
Training FLOPs = tokens seen x FLOPs per token (``model.parameter_report``: 6 x active matmul parameters
+ 6 x layers x seq_len x hidden), from the checkpoint config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .report_figures import ReportFigures
from .report_markdown import render_markdown, summary_lines  # noqa: F401  (public names)
from .report_tables import (  # noqa: F401  (public names of the report)
    EVAL_STAGES,
    GEN_METRICS,
    METRICS,
    STAGES,
    ReportTables,
    _get,
    discover,
    flops_per_token,
    fmt,
)


class Report(ReportTables, ReportFigures):
    """Numbers (:class:`ReportTables`) and figures (:class:`ReportFigures`) of one run directory."""

    def build(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        self._info = self.arm_info()
        baseline = self.baseline_arm(self._info)
        for i in self._info.values():
            b = self._info.get(baseline or "", {})
            i["flops_ratio_to_baseline"] = (i["flops_per_token"] / b["flops_per_token"]
                                            if i.get("flops_per_token") and b.get("flops_per_token") else None)
        table = self.metric_table()
        comps = self.comparisons(baseline)
        forg = self.forgetting()
        routing = self.routing()
        training = self.training_summary()
        dpo_heldout = self.dpo_heldout()
        if not self.evals:
            self.notes.append("no evaluation files in eval/: the metric table is empty.")
        self.fig_loss_curves()
        self.fig_bpc_curves()
        self.fig_expert_load(routing)
        self.fig_training_load()
        self.fig_dpo(forg)
        self.fig_comparisons(comps)
        eval_meta = {f"{a}_seed{s}_{st}": {
            "split": e.get("split"), "bootstrap_seed": e.get("seed"), "n_resamples": e.get("n_resamples"),
            "pretrain_file": _get(e, "pretrain", "data_file"), "pretrain_items": _get(e, "pretrain", "n_items"),
            "sft_file": _get(e, "sft", "data_file"), "sft_items": _get(e, "sft", "n_items"),
            "generation_file": _get(e, "generation", "data_file"), "n_examples": _get(e, "generation", "n_examples"),
            "checkpoint": e.get("checkpoint")} for (a, s, st), e in sorted(self.evals.items())}
        for (a, s, st), e in sorted(self.evals.items()):
            eval_meta[f"{a}_seed{s}_{st}"].update({
                "bpc_pretrain_file": _get(e, "bpc", "pretrain", "data_file"),
                "bpc_pretrain_texts": _get(e, "bpc", "pretrain", "n_texts"),
                "bpc_sft_file": _get(e, "bpc", "sft", "data_file"), "bpc_sft_texts": _get(e, "bpc", "sft", "n_texts"),
                "mc_items": _get(e, "mc", "n_items"), "verse_examples": _get(e, "verse", "n_examples"),
                "verse_decoding": _get(e, "verse", "decoding")})
        headline = self.headline(table)
        floors = self.floors(table)
        compute = self.compute(baseline)
        self.fig_headline(headline)
        return {"run_dir": str(self.run_dir), "arms": self._info, "baseline_arm": baseline,
                "samples": self.samples(), "training_seeds": self.found["seeds"], "evaluations": eval_meta,
                "report_bootstrap": {"n_resamples": self.n_resamples, "seed": self.seed},
                "headline": headline, "floors": floors, "compute": compute, "dpo_shared": self.dpo_shared(baseline),
                "table": table, "comparisons": comps, "forgetting": forg, "routing": routing,
                "routing_training": self.routing_training(), "training": training, "dpo_heldout": dpo_heldout,
                "flops_token_sources": self.token_sources, "figures": self.figures, "notes": sorted(set(self.notes))}


def write_report(run_dir, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Build the report of ``run_dir``: writes report.md, report.json and figures/*.png; returns report.json."""
    r = Report(run_dir, n_resamples=n_resamples, seed=seed)
    rep = r.build()
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(rep, ensure_ascii=False, indent=1), encoding="utf-8")
    (run_dir / "report.md").write_text(render_markdown(rep), encoding="utf-8")
    return rep


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Write <run_dir>/report.md, report.json and figures/*.png.")
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--n_resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed of the report's paired intervals")
    a = ap.parse_args(argv)
    rep = write_report(a.run_dir, a.n_resamples, a.seed)
    print(f"wrote {Path(a.run_dir) / 'report.md'} ({len(rep['table'])} metric rows, {len(rep['figures'])} figures)")
    return rep


if __name__ == "__main__":
    main()
