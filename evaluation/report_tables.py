"""The report's numbers: discovery of a run directory's files and every table of ``report.json``.

Layout and definitions: :mod:`evaluation.report`. Figures: :mod:`evaluation.report_figures`;
Markdown: :mod:`evaluation.report_markdown`.
"""

from __future__ import annotations

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


class ReportTables:
    """The report's numbers, read from a run directory (figures: :class:`ReportFigures`)."""

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
