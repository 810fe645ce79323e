"""The run report: ``python -m evaluation.report --run_dir DIR`` -> report.md, report.json, figures/*.png.

Expected layout of a run directory (what ``pipeline.py`` writes; anything missing is reported as
missing in the report's "Notes", never invented)::

    <run_dir>/
      run.json                                   optional: {"baseline_arm": "dense", "max_seq_len": 256,
                                                 #  "tokens_per_step": {"pretrain": N, "sft": N, "dpo": N}}
      arms/<arm>/seed<k>/<stage>/metrics.jsonl   trainer logs (trainer: --out_dir arms/<arm>/seed<k> --run_name <stage>;
                                                 #  a run name like sft_<tag> is read as stage "sft"), stage in pretrain|sft|dpo
      arms/<arm>/seed<k>/<stage>/**/config.json  optional (checkpoint config; FLOPs per token when no eval JSON)
      eval/<arm>_seed<k>_<stage>.json            python -m evaluation.evaluate output, stage in sft | dpo (| pretrain)
      eval/<arm>_seed<k>_<stage>_generations.jsonl   its per-example generations

``metrics.jsonl`` fields read (any may be missing; a missing field drops that curve with a note):
``step``; training ``loss``; validation ``<name>/loss`` for any eval set name (``val/loss`` ...);
cumulative tokens (``tokens``, ``tokens_seen``, ``train/tokens`` or ``num_tokens``; else
``step x run.json tokens_per_step[stage]``) for the FLOPs axis; DPO ``rewards/margins``,
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
    * routing (MoE): per-layer load fractions, max-violation (max load / mean load - 1), router entropy
      on held-out pretraining text, averaged over seeds.
Training FLOPs = tokens seen x FLOPs per token (``model.parameter_report``: 6 x active matmul parameters
+ 6 x layers x seq_len x hidden), from the checkpoint config.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from pathlib import Path

import numpy as np

from .metrics import paired_bootstrap, paired_ratio_bootstrap, seed_summary

STAGES = ("pretrain", "sft", "dpo")
EVAL_STAGES = ("pretrain", "sft", "dpo")
TOKEN_KEYS = ("tokens", "tokens_seen", "train/tokens", "num_tokens", "total_tokens")

# (key, label, getter(eval) -> (value, ci_low, ci_high) or None, higher_is_better)
GEN_METRICS = ("token_f1_word", "token_f1_char", "rouge_l_word", "rouge_l_char")


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d or d[p] is None:
            return None
        d = d[p]
    return d


def _ci(d, value_key="mean", lo="ci_low", hi="ci_high"):
    if not isinstance(d, dict) or d.get(value_key) is None:
        return None
    return (float(d[value_key]), d.get(lo), d.get(hi))


def _task_metric(e, task):
    return _ci(_get(e, "generation", "summary", "task_accuracy", task, "answer_in_prediction"))


def _gen_metric(e, name):
    return _ci(_get(e, "generation", "summary", "metrics", name))


METRICS = [
    ("pretrain_loss", "held-out pretraining loss (nats/token, lower is better)",
     lambda e: (_get(e, "pretrain", "loss"), _get(e, "pretrain", "loss_ci_low"), _get(e, "pretrain", "loss_ci_high"))),
    ("pretrain_ppl", "held-out pretraining perplexity",
     lambda e: (_get(e, "pretrain", "perplexity"), _get(e, "pretrain", "perplexity_ci_low"),
                _get(e, "pretrain", "perplexity_ci_high"))),
    ("sft_loss", "held-out SFT answer loss (nats/token, lower is better)",
     lambda e: (_get(e, "sft", "loss"), _get(e, "sft", "loss_ci_low"), _get(e, "sft", "loss_ci_high"))),
    ("sft_ppl", "held-out SFT answer perplexity",
     lambda e: (_get(e, "sft", "perplexity"), _get(e, "sft", "perplexity_ci_low"), _get(e, "sft", "perplexity_ci_high"))),
    *[(m, f"{m} on held-out SFT prompts (higher is better)",
       functools.partial(_gen_metric, name=m)) for m in GEN_METRICS],
    ("task_accuracy", "exact-answer tasks: the answer occurs in the output (normalised; the dataset's rule)",
     lambda e: _ci(_get(e, "generation", "summary", "task_accuracy", "all_exact_tasks", "answer_in_prediction"))),
    ("exact_match", "exact-answer tasks: output equals the answer (normalised; strict)",
     lambda e: _ci(_get(e, "generation", "summary", "task_accuracy", "all_exact_tasks", "exact_match"))),
    ("judge_win_rate", "LLM-judge win rate against the arm named in the eval file (optional)",
     lambda e: (_get(e, "judge", "win_rate"), _get(e, "judge", "ci_low"), _get(e, "judge", "ci_high"))),
    ("stop_rate", "share of generations that ended with the end token",
     lambda e: (_get(e, "generation", "summary", "stop_rate"), None, None)),
    ("router_max_violation", "MoE max-violation (max/mean load - 1), mean over layers",
     lambda e: (_get(e, "routing", "max_violation_mean"), None, None)),
    ("router_entropy", "MoE router entropy (nats), mean over layers",
     lambda e: (_get(e, "routing", "router_entropy_mean"), None, None)),
]


def fmt(x) -> str:
    """How every number is printed (the tests parse it back)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = float(x)
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a half-written last line of a running job
    return rows


# ------------------------------------------------------------------------------------------- discover


def _stage_name(dirname: str) -> str | None:
    """``pretrain`` / ``sft_mateconv-tiny`` ... -> the stage (a trainer run name may carry a model tag)."""
    head = re.split(r"[_\-.]", dirname, maxsplit=1)[0]
    return head if head in STAGES else None


def discover(run_dir: Path) -> dict:
    """Find arms, seeds, training logs and evaluation files in ``run_dir`` (see module doc)."""
    run_dir = Path(run_dir)
    found = {"logs": {}, "evals": {}, "generations": {}, "configs": {}}
    for p in sorted((run_dir / "arms").glob("*/seed*/*/metrics.jsonl")):
        stage, seed_dir, arm = _stage_name(p.parent.name), p.parent.parent.name, p.parent.parent.parent.name
        m = re.fullmatch(r"seed(\d+)", seed_dir)
        if m and stage:
            found["logs"][(arm, int(m.group(1)), stage)] = p
    for p in sorted((run_dir / "arms").glob("*/seed*/*/**/config.json")):
        rel = p.relative_to(run_dir / "arms").parts
        m = re.fullmatch(r"seed(\d+)", rel[1])
        if m and _stage_name(rel[2]):
            found["configs"].setdefault((rel[0], int(m.group(1)), _stage_name(rel[2])), p)
    for p in sorted((run_dir / "eval").glob("*_seed*_*.json")):
        m = re.fullmatch(r"(.+)_seed(\d+)_([a-z]+)", p.stem)
        if m:
            key = (m.group(1), int(m.group(2)), m.group(3))
            found["evals"][key] = p
            g = p.with_name(p.stem + "_generations.jsonl")
            if g.is_file():
                found["generations"][key] = g
    keys = list(found["logs"]) + list(found["evals"])
    found["arms"] = sorted({k[0] for k in keys})
    found["seeds"] = {a: sorted({k[1] for k in keys if k[0] == a}) for a in found["arms"]}
    return found


# ----------------------------------------------------------------------------------------------- FLOPs


def flops_per_token(config: dict, seq_len: int | None) -> dict | None:
    """Parameter report of a config dict (``model.parameter_report``), or None when unavailable."""
    try:
        from model import MateConvConfig, parameter_report

        cfg = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map",
                                                             "transformers_version")}
        return parameter_report(MateConvConfig(**cfg), seq_len=seq_len)
    except Exception:
        return None


def _tokens_axis(rows: list[dict], stage: str, run_meta: dict) -> tuple[list[float] | None, str | None]:
    """Cumulative training tokens at every logged row (interpolated by step for rows without a count).

    Sources, in order: a cumulative token field; ``tokens_per_s x`` the time between log rows
    (an estimate); ``step x run.json tokens_per_step[stage]``."""
    stepped = [r for r in rows if "step" in r]
    if not stepped:
        return None, None
    pts, how = [], None
    for k in TOKEN_KEYS:
        pts = [(float(r["step"]), float(r[k])) for r in stepped if r.get(k) is not None]
        if pts:
            how = f"logged '{k}'"
            break
    if not pts:
        timed = [r for r in stepped if r.get("tokens_per_s") is not None and r.get("elapsed_s") is not None]
        if timed:
            cum, prev = 0.0, 0.0
            for r in timed:
                cum += float(r["tokens_per_s"]) * max(float(r["elapsed_s"]) - prev, 0.0)
                prev = float(r["elapsed_s"])
                pts.append((float(r["step"]), cum))
            how = "estimated as tokens_per_s x time between log rows"
    if not pts:
        per_step = _get(run_meta, "tokens_per_step", stage)
        if per_step:
            pts = [(0.0, 0.0), (1.0, float(per_step))]
            how = "step x run.json tokens_per_step"
            return [float(r.get("step", 0)) * float(per_step) for r in rows], how
        return None, None
    xs, ys = zip(*sorted(pts))
    if len(xs) == 1:
        xs, ys = (0.0, xs[0]), (0.0, ys[0])
    steps = [float(r.get("step", xs[-1])) for r in rows]
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0]) if xs[-1] != xs[0] else 0.0
    out = [float(np.interp(x, xs, ys)) if x <= xs[-1] else ys[-1] + slope * (x - xs[-1]) for x in steps]
    return out, how


# ---------------------------------------------------------------------------------------------- report


class Report:
    def __init__(self, run_dir, n_resamples: int = 2000, seed: int = 0):
        self.run_dir = Path(run_dir)
        self.n_resamples, self.seed = n_resamples, seed
        meta_path = self.run_dir / "run.json"
        self.meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        self.found = discover(self.run_dir)
        self.evals = {k: json.loads(p.read_text(encoding="utf-8")) for k, p in self.found["evals"].items()}
        self.logs = {k: _read_jsonl(p) for k, p in self.found["logs"].items()}
        self.notes: list[str] = []
        self.figures: list[dict] = []
        self.token_sources: dict[str, str] = {}
        self.fig_dir = self.run_dir / "figures"

    # ---- arms
    def arm_info(self) -> dict:
        info = {}
        for arm in self.found["arms"]:
            ev = next((e for (a, _, _), e in sorted(self.evals.items()) if a == arm), None)
            cfg = _get(ev, "model", "config")
            if cfg is None:
                cpath = next((p for (a, _, _), p in sorted(self.found["configs"].items()) if a == arm), None)
                if cpath is not None:
                    cfg = json.loads(cpath.read_text(encoding="utf-8"))
            seq_len = self.meta.get("max_seq_len") or _get(ev, "max_seq_len")
            rep = flops_per_token(cfg, seq_len) if cfg else None
            info[arm] = {"use_moe": bool(cfg.get("use_moe")) if cfg else None,
                         "total_params": rep and rep["total_params"], "active_params": rep and rep["active_params"],
                         "flops_per_token": rep and rep["flops_per_token"], "flops_seq_len": rep and rep["seq_len"]}
            if rep is None:
                self.notes.append(f"arm {arm}: no model config found, so no parameter counts or FLOPs axis.")
        return info

    def baseline_arm(self, info: dict) -> str | None:
        if self.meta.get("baseline_arm") in info:
            return self.meta["baseline_arm"]
        dense = [a for a, i in info.items() if i["use_moe"] is False]
        return dense[0] if dense else (sorted(info)[0] if info else None)

    # ---- table
    def metric_table(self) -> list[dict]:
        rows = []
        for arm in self.found["arms"]:
            for stage in EVAL_STAGES:
                seeds = [s for s in self.found["seeds"][arm] if (arm, s, stage) in self.evals]
                if not seeds:
                    continue
                tasks = sorted({t for s in seeds for t in (_get(self.evals[(arm, s, stage)], "generation", "summary",
                                                                          "task_accuracy") or {}) if t != "all_exact_tasks"})
                metrics = list(METRICS) + [
                    (f"task_accuracy/{t}", f"task {t}: answer occurs in the output",
                     functools.partial(_task_metric, task=t)) for t in tasks]
                for key, label, getter in metrics:
                    per_seed = {}
                    for s in seeds:
                        v = getter(self.evals[(arm, s, stage)])
                        if v is not None and v[0] is not None:
                            per_seed[str(s)] = {"value": float(v[0]), "ci_low": v[1], "ci_high": v[2]}
                    if not per_seed:
                        continue
                    row = {"arm": arm, "stage": stage, "metric": key, "label": label, "per_seed": per_seed}
                    row.update(seed_summary([d["value"] for d in per_seed.values()]))
                    if len(per_seed) == 1:  # one seed: the bootstrap CI over examples / items
                        only = next(iter(per_seed.values()))
                        row["ci_low"], row["ci_high"] = only["ci_low"], only["ci_high"]
                        row["ci_kind"] = "bootstrap over examples" if only["ci_low"] is not None else None
                    else:
                        row["ci_kind"] = "t over seeds"
                    rows.append(row)
        return rows

    # ---- paired comparisons and forgetting
    def _gen_records(self, key) -> list[dict] | None:
        p = self.found["generations"].get(key)
        if p is None:
            pe = _get(self.evals.get(key), "generation", "per_example_file")
            p = Path(pe) if pe and Path(pe).is_file() else None
        return _read_jsonl(p) if p else None

    def _paired_loss(self, ea: dict, eb: dict, part: str) -> dict | None:
        a, b = ea.get(part), eb.get(part)
        if not a or not b or "item_nll_sum" not in a or "item_nll_sum" not in b:
            return None
        if a.get("items_fingerprint") != b.get("items_fingerprint") or a["item_tokens"] != b["item_tokens"]:
            self.notes.append(f"{part} loss: the two evaluations are not over the same items; no paired interval.")
            return None
        return paired_ratio_bootstrap(a["item_nll_sum"], b["item_nll_sum"], a["item_tokens"], self.n_resamples, self.seed)

    def comparisons(self, baseline: str | None) -> list[dict]:
        out = []
        if baseline is None:
            return out
        for arm in self.found["arms"]:
            if arm == baseline:
                continue
            for stage in EVAL_STAGES:
                seeds = [s for s in self.found["seeds"][arm]
                         if (arm, s, stage) in self.evals and (baseline, s, stage) in self.evals]
                if not seeds:
                    continue
                for metric in ("pretrain_loss", "sft_loss", *GEN_METRICS, "answer_in_prediction", "exact_match"):
                    per_seed = {}
                    for s in seeds:
                        ka, kb = (arm, s, stage), (baseline, s, stage)
                        if metric.endswith("_loss"):
                            r = self._paired_loss(self.evals[ka], self.evals[kb], metric[: -len("_loss")])
                        else:
                            ra, rb = self._gen_records(ka), self._gen_records(kb)
                            if ra is None or rb is None:
                                continue
                            da = {x["id"]: x for x in ra if metric in x}
                            db = {x["id"]: x for x in rb if metric in x}
                            ids = sorted(set(da) & set(db))
                            if not ids:
                                continue
                            if set(da) != set(db):
                                self.notes.append(f"{arm} vs {baseline} {stage} seed {s}: generation files differ in "
                                                  f"examples; compared on the {len(ids)} common ones.")
                            r = paired_bootstrap([da[i][metric] for i in ids], [db[i][metric] for i in ids],
                                                 self.n_resamples, self.seed)
                        if r is not None:
                            per_seed[str(s)] = {k: r[k] for k in ("diff", "ci_low", "ci_high", "mean_a", "mean_b", "n")}
                    if not per_seed:
                        continue
                    row = {"arm": arm, "baseline": baseline, "stage": stage, "metric": metric, "per_seed": per_seed}
                    row.update({"across_seeds": seed_summary([d["diff"] for d in per_seed.values()])})
                    out.append(row)
        return out

    def forgetting(self) -> list[dict]:
        out = []
        for arm in self.found["arms"]:
            for part in ("pretrain", "sft"):
                per_seed = {}
                for s in self.found["seeds"][arm]:
                    ka, kb = (arm, s, "dpo"), (arm, s, "sft")
                    if ka in self.evals and kb in self.evals:
                        r = self._paired_loss(self.evals[ka], self.evals[kb], part)
                        if r is not None:
                            per_seed[str(s)] = {"sft_loss": r["mean_b"], "dpo_loss": r["mean_a"], "diff": r["diff"],
                                                "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n_items": r["n"]}
                if per_seed:
                    out.append({"arm": arm, "heldout": part, "per_seed": per_seed,
                                "across_seeds": seed_summary([d["diff"] for d in per_seed.values()])})
        if not out:
            self.notes.append("forgetting: no arm has both an SFT and a DPO evaluation; no SFT -> DPO change reported.")
        return out

    def routing(self) -> list[dict]:
        out = []
        for arm in self.found["arms"]:
            for stage in EVAL_STAGES:
                stats = [(s, self.evals[(arm, s, stage)].get("routing")) for s in self.found["seeds"][arm]
                         if (arm, s, stage) in self.evals]
                stats = [(s, r) for s, r in stats if r]
                if not stats:
                    continue
                n_layers = stats[0][1]["n_moe_layers"]
                layers = []
                for i in range(n_layers):
                    lf = np.mean([r["layers"][i]["load_fraction"] for _, r in stats], axis=0)
                    layers.append({
                        "layer": i, "load_fraction": [float(x) for x in lf],
                        "max_violation": seed_summary([r["layers"][i]["max_violation"] for _, r in stats]),
                        "router_entropy": seed_summary([r["layers"][i]["router_entropy"] for _, r in stats]),
                    })
                out.append({"arm": arm, "stage": stage, "seeds": [s for s, _ in stats], "n_moe_layers": n_layers,
                            "n_routed_experts": stats[0][1]["n_routed_experts"],
                            "router_entropy_max": stats[0][1].get("router_entropy_max"),
                            "data_file": _get(self.evals[(arm, stats[0][0], stage)], "pretrain", "data_file"),
                            "layers": layers})
        return out

    def training_summary(self) -> list[dict]:
        out = []
        for (arm, seed, stage), rows in sorted(self.logs.items()):
            train = [r for r in rows if r.get("loss") is not None and "step" in r]
            vals = {k for r in rows for k in r if k.endswith("/loss") and not k.startswith(("probe/", "loss/"))}
            rec = {"arm": arm, "seed": seed, "stage": stage, "n_logged": len(rows),
                   "final_step": train[-1]["step"] if train else None,
                   "final_train_loss": float(train[-1]["loss"]) if train else None}
            for k in sorted(vals):
                vr = [r for r in rows if r.get(k) is not None]
                rec[f"final_{k}"] = float(vr[-1][k]) if vr else None
            out.append(rec)
        return out

    def dpo_heldout(self) -> list[dict]:
        """Held-out preference (reward) accuracy and margin before DPO (step 0) and at its last evaluation."""
        out = []
        for (arm, seed, stage), rows in sorted(self.logs.items()):
            if stage != "dpo":
                continue
            rec = {"arm": arm, "seed": seed}
            for key in ("reward_accuracy", "rewards/margins"):
                name = next((k for r in rows for k in r if k.endswith("/" + key) and k != key), None)
                vr = [r for r in rows if name and r.get(name) is not None and "step" in r]
                if vr:
                    rec[key] = {"metric": name, "first_step": vr[0]["step"], "first": float(vr[0][name]),
                                "last_step": vr[-1]["step"], "last": float(vr[-1][name])}
            if len(rec) > 2:
                out.append(rec)
        return out

    # ---- figures
    def _save(self, fig, name: str, caption: str):
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        path = self.fig_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.figures.append({"file": f"figures/{name}", "caption": caption})

    def fig_loss_curves(self):
        import matplotlib.pyplot as plt

        stages = [st for st in ("pretrain", "sft") if any(k[2] == st for k in self.logs)]
        if not stages:
            self.notes.append("no pretrain/sft metrics.jsonl found: no loss curves.")
            return
        colors = {a: f"C{i}" for i, a in enumerate(self.found["arms"])}
        for axis in ("step", "flops"):
            fig, axes = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.5), squeeze=False)
            plotted = False
            for ax, st in zip(axes[0], stages):
                for (arm, seed, stage), rows in sorted(self.logs.items()):
                    if stage != st:
                        continue
                    train = [r for r in rows if r.get("loss") is not None and "step" in r]
                    x_all = self._x(rows, arm, stage, axis)
                    if x_all is None:
                        continue
                    xmap = {id(r): x for r, x in zip(rows, x_all)}
                    if train:
                        ax.plot([xmap[id(r)] for r in train], [r["loss"] for r in train], color=colors[arm],
                                alpha=0.8, lw=1.2, label=f"{arm} seed{seed} train")
                        plotted = True
                    for j, k in enumerate(sorted({k for r in rows for k in r if k.endswith("/loss")
                                                  and not k.startswith(("probe/", "loss/"))})):
                        vr = [r for r in rows if r.get(k) is not None]
                        ax.plot([xmap[id(r)] for r in vr], [r[k] for r in vr], color=colors[arm], ls="--",
                                marker="os^"[j % 3], ms=4, label=f"{arm} seed{seed} {k}")
                        plotted = True
                ax.set_title(f"{st}: training (solid) and validation (dashed) loss")
                ax.set_xlabel("optimizer step" if axis == "step" else "estimated training FLOPs")
                if axis == "flops":
                    ax.set_xscale("log")
                ax.set_ylabel("cross-entropy (nats/token)")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
            if not plotted:
                plt.close(fig)
                if axis == "flops":
                    self.notes.append("no token counts in the logs (tokens / tokens_seen) and no tokens_per_step in "
                                      "run.json, or no model config: no loss-by-FLOPs figure.")
                continue
            self._save(fig, f"loss_by_{axis}.png",
                       f"Training and validation loss of every arm and seed, by {'step' if axis == 'step' else 'estimated FLOPs (tokens x FLOPs/token)'}.")

    def _x(self, rows, arm, stage, axis):
        if axis == "step":
            return [r.get("step", i) for i, r in enumerate(rows)]
        tokens, how = _tokens_axis(rows, stage, self.meta)
        fpt = self._info.get(arm, {}).get("flops_per_token")
        if tokens is None or not fpt:
            return None
        self.token_sources[f"{arm}/{stage}"] = how
        return [max(t * fpt, 1.0) for t in tokens]

    def fig_expert_load(self, routing: list[dict]):
        import matplotlib.pyplot as plt

        for r in routing:
            lf = np.array([lay["load_fraction"] for lay in r["layers"]])
            L, E = lf.shape
            fig, ax = plt.subplots(figsize=(max(5, 0.7 * E + 2), max(3, 0.5 * L + 1.5)))
            im = ax.imshow(lf, cmap="viridis", aspect="auto", vmin=0, vmax=max(lf.max(), 2.0 / E))
            for i in range(L):
                for e in range(E):
                    ax.text(e, i, f"{lf[i, e]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if lf[i, e] < lf.max() * 0.6 else "black")
            ax.set_xticks(range(E))
            ax.set_yticks(range(L))
            ax.set_xlabel("routed expert")
            ax.set_ylabel("MoE layer")
            ax.set_title(f"{r['arm']} ({r['stage']} checkpoint): share of routed tokens per expert\n"
                         f"held-out text, uniform = {1.0 / E:.3f}, seeds {r['seeds']}")
            fig.colorbar(im, ax=ax, label="load fraction")
            self._save(fig, f"expert_load_{r['arm']}_{r['stage']}.png",
                       f"Per-layer expert load of {r['arm']} ({r['stage']}) on held-out pretraining text.")

    def fig_training_load(self):
        """Training-time expert load from the trainer's ``moe/layer{i}/expert{e}_load`` fields (per logged window)."""
        import matplotlib.pyplot as plt

        pat = re.compile(r"moe/layer(\d+)/expert(\d+)_load$")
        for (arm, seed, stage), rows in sorted(self.logs.items()):
            keyed = [(r["step"], {tuple(map(int, pat.match(k).groups())): v for k, v in r.items() if pat.match(k)})
                     for r in rows if "step" in r]
            keyed = [(st, d) for st, d in keyed if d]
            if not keyed:
                continue
            L = 1 + max(layer for _, d in keyed for layer, _ in d)
            E = 1 + max(e for _, d in keyed for _, e in d)
            fig, axes = plt.subplots(L, 1, figsize=(max(6, 0.25 * len(keyed) + 3), 1.8 * L + 1), squeeze=False)
            for layer in range(L):
                ax = axes[layer][0]
                grid = np.array([[d.get((layer, e), np.nan) for _, d in keyed] for e in range(E)])
                im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(np.nanmax(grid), 2.0 / E),
                               extent=(keyed[0][0], keyed[-1][0], E - 0.5, -0.5) if len(keyed) > 1 else None)
                ax.set_ylabel(f"layer {layer}\nexpert")
                fig.colorbar(im, ax=ax, label="load fraction")
            axes[-1][0].set_xlabel("optimizer step" if len(keyed) > 1 else "log window")
            axes[0][0].set_title(f"{arm} seed{seed} {stage}: training-time expert load per layer (uniform = {1.0 / E:.3f})")
            self._save(fig, f"expert_load_training_{arm}_seed{seed}_{stage}.png",
                       f"Expert load of {arm} seed {seed} during {stage} training, per layer and logged window.")

    def fig_dpo(self, forgetting: list[dict]):
        import matplotlib.pyplot as plt

        logs = {k: v for k, v in self.logs.items() if k[2] == "dpo"}
        if not logs:
            self.notes.append("no dpo/metrics.jsonl found: no DPO curves.")
            return
        colors = {a: f"C{i}" for i, a in enumerate(self.found["arms"])}
        panels = [("rewards/margins", "reward margin (chosen - rejected)"),
                  ("reward_accuracy", "reward accuracy (chosen > rejected; tie = 0.5)"),
                  ("kl", "KL(policy || reference) on chosen answers"),
                  ("probe", "forgetting probe: held-out loss")]
        fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
        for ax, (key, title) in zip(axes, panels):
            for (arm, seed, _), rows in sorted(logs.items()):
                if key == "probe":
                    for k, ls in (("probe/pretrain_loss", "-"), ("probe/sft_loss", "--")):
                        vr = [r for r in rows if r.get(k) is not None and "step" in r]
                        if vr:
                            ax.plot([r["step"] for r in vr], [r[k] for r in vr], color=colors[arm], ls=ls, marker="o",
                                    ms=3, label=f"{arm} seed{seed} {k.split('/')[1].replace('_loss', '')} text")
                    continue
                vr = [r for r in rows if r.get(key) is not None and "step" in r]
                if vr:
                    ax.plot([r["step"] for r in vr], [r[key] for r in vr], color=colors[arm], lw=1.2,
                            label=f"{arm} seed{seed} train")
                held = sorted({k for r in rows for k in r if k.endswith("/" + key) and k != key})
                for k in held:
                    hr = [r for r in rows if r.get(k) is not None and "step" in r]
                    ax.plot([r["step"] for r in hr], [r[k] for r in hr], color=colors[arm], ls="--", marker="s", ms=3,
                            label=f"{arm} seed{seed} {k.split('/')[0]} (held-out)")
            ax.set_title(title)
            ax.set_xlabel("DPO step")
            ax.set_ylabel({"probe": "cross-entropy (nats/token)"}.get(key, key))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, f"'{key}' not logged", ha="center", va="center", transform=ax.transAxes)
                self.notes.append(f"DPO logs have no '{key}' field: that panel is empty.")
        fig.suptitle("DPO training curves (left) beside the forgetting probe (right)")
        self._save(fig, "dpo_curves.png", "DPO reward margin, reward accuracy and KL beside the forgetting probe "
                                          "(held-out pretraining and SFT loss during DPO).")

    def fig_comparisons(self, comps: list[dict]):
        import matplotlib.pyplot as plt

        groups = [("held-out loss (nats/token): lower is better", [c for c in comps if c["metric"].endswith("_loss")], "C3"),
                  ("generation metrics: higher is better", [c for c in comps if c["metric"] in GEN_METRICS
                                                            or c["metric"] == "answer_in_prediction"], "C0")]
        groups = [g for g in groups if g[1]]
        if not groups:
            return
        heights = [len(g[1]) + 2 for g in groups]
        fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.35 * sum(heights) + 1.5), squeeze=False, layout="constrained",
                                 gridspec_kw={"height_ratios": heights})
        for ax, (title, rows, color) in zip(axes[:, 0], groups):
            labels = []
            for i, c in enumerate(rows):
                s = c["across_seeds"]
                if s["n_seeds"] == 1:
                    d = next(iter(c["per_seed"].values()))
                    mean, lo, hi = d["diff"], d["ci_low"], d["ci_high"]
                else:
                    mean, lo, hi = s["mean"], s["ci_low"], s["ci_high"]
                ax.errorbar(mean, i, xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=3)
                labels.append(f"{c['arm']} - {c['baseline']} | {c['stage']} | {c['metric']}")
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xlabel("difference (arm - baseline) with 95% CI")
            ax.set_title(title)
            ax.grid(alpha=0.3, axis="x")
        fig.suptitle("Held-out differences between arms on the same examples "
                     "(1 seed: paired bootstrap; several seeds: t CI over seeds)")
        self._save(fig, "arm_differences.png", "Differences between arms on the same held-out examples with 95% CIs.")

    # ---- build
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
        samples = {}
        for (a, s, st), e in sorted(self.evals.items()):
            if s == min(self.found["seeds"][a]) and _get(e, "generation", "samples"):
                samples[f"{a}_seed{s}_{st}"] = [{k: x.get(k) for k in ("id", "task", "prompt", "reference", "prediction",
                                                                       "stopped_on_eos", "n_new_tokens")}
                                                for x in e["generation"]["samples"][:3]]
        return {"run_dir": str(self.run_dir), "arms": self._info, "baseline_arm": baseline, "samples": samples,
                "training_seeds": self.found["seeds"], "evaluations": eval_meta,
                "report_bootstrap": {"n_resamples": self.n_resamples, "seed": self.seed},
                "table": table, "comparisons": comps, "forgetting": forg, "routing": routing,
                "training": training, "dpo_heldout": dpo_heldout, "flops_token_sources": self.token_sources, "figures": self.figures, "notes": sorted(set(self.notes))}


# -------------------------------------------------------------------------------------------- markdown


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
