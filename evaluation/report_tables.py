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

from .metrics import bootstrap_mean_ci, paired_bootstrap, paired_ratio_bootstrap, seed_summary

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


def _bpc(e, part):
    d = _get(e, "bpc", part)
    return (d["bpc"], d.get("bpc_ci_low"), d.get("bpc_ci_high")) if d else None


def _verse(e, task, key, who="model"):
    return _ci(_get(e, "verse", "tasks", task, who, key))


def _template_metric(e, name):
    v = _get(e, "generation", "template_baseline", "all", name)
    return (v, None, None) if v is not None else None


def _mc_metric(e, task, key):
    s = _get(e, "mc", "summary", task)
    if not s:
        return None
    field = {"mc_acc": "acc", "mc_acc_norm": "acc_norm", "mc_centred": "centred"}[key]
    return _ci(s[field])


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
    ("router_entropy", "MoE mean per-token router entropy (nats), mean over layers (evaluation/routing.py)",
     lambda e: (_get(e, "routing", "router_entropy_mean"), None, None)),
    ("router_near_dead", "MoE experts below 10% of the uniform load (count over layers)",
     lambda e: (_get(e, "routing", "n_near_dead"), None, None)),
    ("bpc_pretrain", "held-out pretraining text, bits per character (lower is better; evaluation/bpc.py)",
     lambda e: _bpc(e, "pretrain")),
    ("bpc_sft", "held-out SFT answers, bits per character (lower is better)", lambda e: _bpc(e, "sft")),
    ("form_rate", "write_poem answers in the requested form (half-line length, punctuation, line count)",
     lambda e: _verse(e, "write_poem", "form_ok")),
    ("line_rate", "continue_line answers of the requested line length (5 or 7 characters)",
     lambda e: _verse(e, "continue_line", "form_ok")),
    ("repetition_rate", "write_poem + continue_line answers: repeated character bigrams (lower is better)",
     lambda e: _verse(e, "all", "repetition_rate")),
    ("reference_repetition_rate", "the same prompts' reference answers: repeated character bigrams (the floor)",
     lambda e: _verse(e, "all", "repetition_rate", "reference")),
    ("degenerate_rate", "write_poem + continue_line answers flagged degenerate (loops, repetition)",
     lambda e: _verse(e, "all", "degenerate")),
    ("distinct_2", "write_poem + continue_line answers: distinct character bigrams / bigrams",
     lambda e: _verse(e, "all", "distinct_2")),
    *[(f"template_only/{m}", f"{m} of the answer template alone (reference minus its exact answer): what a "
       "template-only answer scores", functools.partial(_template_metric, name=m)) for m in GEN_METRICS],
]

# The headline: the measures that move when a small model learns (issue: evaluation that sees it).
HEADLINE_METRICS = ("bpc_pretrain", "bpc_sft", "mc_centred/next_line", "mc_centred/author", "mc_centred/title",
                    "mc_centred/form", "mc_centred/cloze", "form_rate", "line_rate", "repetition_rate")
# Floors of the default job (issue 13), checked on every arm's SFT checkpoint.
REPETITION_MARGIN = 0.02
FLOORS = (("bpc_pretrain", "<=", 6.6, "pretraining text at most 6.6 bits/char"),
          ("form_rate", ">=", 0.5, "at least half of the write_poem answers in the requested form"),
          ("mc_acc/next_line", "ci_above_chance", None, "next-line multiple choice above chance (CI excludes it)"),
          ("repetition_rate", "<=reference+", REPETITION_MARGIN,
           f"repetition rate at most the reference answers' + {REPETITION_MARGIN}"))
MC_PREFIXES = ("mc_acc", "mc_acc_norm", "mc_centred")


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
    found = {"logs": {}, "evals": {}, "generations": {}, "verse": {}, "mc": {}, "pairs": {}, "configs": {}}
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
            for kind, suffix in (("generations", "_generations.jsonl"), ("verse", "_verse.jsonl"), ("mc", "_mc.jsonl"),
                                 ("pairs", "_pairs.jsonl")):
                g = p.with_name(p.stem + suffix)
                if g.is_file():
                    found[kind][key] = g
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
                mc_tasks = [t for t in ("next_line", "author", "title", "form", "cloze")
                            if any(_get(self.evals[(arm, s, stage)], "mc", "summary", t) for s in seeds)]
                metrics = list(METRICS) + [
                    (f"task_accuracy/{t}", f"task {t}: answer occurs in the output",
                     functools.partial(_task_metric, task=t)) for t in tasks] + [
                    (f"{k}/{t}", {"mc_acc": f"multiple choice {t}: accuracy (sum of option log-probs; chance 0.25)",
                                  "mc_acc_norm": f"multiple choice {t}: accuracy, per-character normalised scores",
                                  "mc_centred": f"multiple choice {t}: centred accuracy (acc - chance) / (1 - chance)"}[k],
                     functools.partial(_mc_metric, task=t, key=k)) for t in mc_tasks for k in MC_PREFIXES]
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

    def _paired_bpc(self, ea: dict, eb: dict, part: str) -> dict | None:
        """Paired bootstrap over the same held-out texts of the difference in bits per character."""
        a, b = _get(ea, "bpc", part), _get(eb, "bpc", part)
        if not a or not b or "text_nll" not in a or "text_nll" not in b:
            return None
        if a["text_chars"] != b["text_chars"]:
            self.notes.append(f"bpc {part}: the two evaluations are not over the same texts; no paired interval.")
            return None
        r = paired_ratio_bootstrap(a["text_nll"], b["text_nll"], a["text_chars"], self.n_resamples, self.seed)
        ln2 = math.log(2.0)
        return {**r, **{k: r[k] / ln2 for k in ("diff", "ci_low", "ci_high", "mean_a", "mean_b")}}

    def _paired_items(self, ka, kb, metric: str) -> dict | None:
        """Paired bootstrap over the items both evaluations scored: multiple choice (``mc_acc/<task>``, from
        ``*_mc.jsonl``) or verse measures (``form_rate`` / ``line_rate`` / ``repetition_rate``, ``*_verse.jsonl``)."""
        kind = "mc" if metric.startswith("mc_acc/") else "verse"
        pa, pb = self.found[kind].get(ka), self.found[kind].get(kb)
        if pa is None or pb is None:
            return None
        ra, rb = _read_jsonl(pa), _read_jsonl(pb)
        if kind == "mc":
            task = metric.split("/", 1)[1]
            va = {x["id"]: x["correct"] for x in ra if x["task"] == task}
            vb = {x["id"]: x["correct"] for x in rb if x["task"] == task}
        else:
            task, field = {"form_rate": ("write_poem", "form_ok"), "line_rate": ("continue_line", "form_ok"),
                           "repetition_rate": (None, "repetition_rate")}[metric]
            va, vb = ({x["id"]: float(x["verse"][field]) for x in rs if x.get("verse") and field in x["verse"]
                       and (task is None or x["task"] == task)} for rs in (ra, rb))
        ids = sorted(set(va) & set(vb))
        if not ids:
            return None
        return paired_bootstrap([va[i] for i in ids], [vb[i] for i in ids], self.n_resamples, self.seed)

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
                mc_tasks = sorted({t for s in seeds for t in (_get(self.evals[(arm, s, stage)], "mc", "summary") or {})})
                for metric in ("pretrain_loss", "sft_loss", "bpc_pretrain", "bpc_sft",
                               *[f"mc_acc/{t}" for t in mc_tasks], "form_rate", "line_rate", "repetition_rate",
                               *GEN_METRICS, "task_accuracy", "exact_match"):
                    per_seed = {}
                    for s in seeds:
                        ka, kb = (arm, s, stage), (baseline, s, stage)
                        if metric.endswith("_loss"):
                            r = self._paired_loss(self.evals[ka], self.evals[kb], metric[: -len("_loss")])
                        elif metric.startswith("bpc_"):
                            r = self._paired_bpc(self.evals[ka], self.evals[kb], metric[len("bpc_"):])
                        elif metric.startswith("mc_acc/") or metric in ("form_rate", "line_rate", "repetition_rate"):
                            r = self._paired_items(ka, kb, metric)
                        else:
                            ra, rb = self._gen_records(ka), self._gen_records(kb)
                            if ra is None or rb is None:
                                continue
                            field = "answer_in_prediction" if metric == "task_accuracy" else metric
                            da = {x["id"]: x for x in ra if field in x}
                            db = {x["id"]: x for x in rb if field in x}
                            ids = sorted(set(da) & set(db))
                            if not ids:
                                continue
                            if set(da) != set(db):
                                self.notes.append(f"{arm} vs {baseline} {stage} seed {s}: generation files differ in "
                                                  f"examples; compared on the {len(ids)} common ones.")
                            r = paired_bootstrap([da[i][field] for i in ids], [db[i][field] for i in ids],
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
                    thr = 0.1 / len(lf)  # evaluation.routing.NEAR_DEAD_FRACTION of the uniform load
                    layers.append({
                        "layer": i, "load_fraction": [float(x) for x in lf],
                        "near_dead": [{"expert": int(e), "load_fraction": float(lf[e])} for e in np.flatnonzero(lf < thr)],
                        "max_violation": seed_summary([r["layers"][i]["max_violation"] for _, r in stats]),
                        "router_entropy": seed_summary([r["layers"][i]["router_entropy"] for _, r in stats]),
                    })
                    if r_load := [r["layers"][i].get("expert_load_entropy") for _, r in stats]:
                        if all(v is not None for v in r_load):
                            layers[-1]["expert_load_entropy"] = seed_summary(r_load)
                out.append({"arm": arm, "stage": stage, "seeds": [s for s, _ in stats], "n_moe_layers": n_layers,
                            "n_routed_experts": stats[0][1]["n_routed_experts"],
                            "router_entropy_max": stats[0][1].get("router_entropy_max"),
                            "near_dead_threshold": 0.1 / stats[0][1]["n_routed_experts"],
                            "n_near_dead": sum(len(lay["near_dead"]) for lay in layers),
                            "data_file": _get(self.evals[(arm, stats[0][0], stage)], "pretrain", "data_file"),
                            "layers": layers})
        return out

    def training_summary(self) -> list[dict]:
        out = []
        for (arm, seed, stage), rows in sorted(self.logs.items()):
            train = [r for r in rows if r.get("loss") is not None and "step" in r]
            vals = {k for r in rows for k in r if k.endswith(("/loss", "/bpc")) and not k.startswith(("probe/", "loss/"))}
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
    # ---- new measures: headline, floors, measured compute, samples
    def headline(self, table: list[dict]) -> dict:
        """The headline table: HEADLINE_METRICS per arm and stage (values and CIs are the metric table's)."""
        rows = {}
        for r in table:
            if r["metric"] in HEADLINE_METRICS or r["metric"] == "reference_repetition_rate":
                rows.setdefault((r["arm"], r["stage"]), {})[r["metric"]] = {
                    k: r.get(k) for k in ("mean", "ci_low", "ci_high", "n_seeds", "ci_kind")}
        cols = [m for m in HEADLINE_METRICS if any(m in v for v in rows.values())]
        return {"columns": cols,
                "rows": [{"arm": a, "stage": st, "values": {m: v[m] for m in cols if m in v}}
                         for (a, st), v in sorted(rows.items(), key=lambda kv: (kv[0][0], STAGES.index(kv[0][1])))],
                "reference_repetition_rate": next((v["reference_repetition_rate"] for v in rows.values()
                                                   if "reference_repetition_rate" in v), None)}

    def floors(self, table: list[dict], stage: str = "sft") -> list[dict]:
        """The default job's floors (FLOORS) on every arm's ``stage`` checkpoint, met or not."""
        rows = {(r["arm"], r["stage"], r["metric"]): r for r in table}
        out = []
        for arm in self.found["arms"]:
            for metric, op, thr, text in FLOORS:
                r = rows.get((arm, stage, metric))
                rec = {"arm": arm, "stage": stage, "metric": metric, "floor": text, "op": op, "threshold": thr,
                       "value": r and r["mean"], "ci_low": r and r.get("ci_low"), "ci_high": r and r.get("ci_high"),
                       "met": None}
                if r is None:
                    out.append(rec)
                    continue
                if op == "<=":
                    rec["met"] = r["mean"] <= thr
                elif op == ">=":
                    rec["met"] = r["mean"] >= thr
                elif op == "ci_above_chance":
                    task = metric.split("/", 1)[1]
                    seeds = [s for s in self.found["seeds"][arm] if (arm, s, stage) in self.evals]
                    chance = _get(self.evals[(arm, seeds[0], stage)], "mc", "summary", task, "chance")
                    rec["threshold"] = chance
                    rec["met"] = r.get("ci_low") is not None and chance is not None and r["ci_low"] > chance
                else:  # "<=reference+": below the reference answers' rate + margin
                    ref = rows.get((arm, stage, "reference_repetition_rate"))
                    if ref is not None:
                        rec["threshold"] = ref["mean"] + thr
                        rec["reference"] = ref["mean"]
                        rec["met"] = r["mean"] <= ref["mean"] + thr
                out.append(rec)
        return out

    def compute(self, baseline: str | None) -> dict:
        """Measured compute per arm, seed and stage beside the FLOPs estimate.

        ``train_s``: the trainer's last ``elapsed_s`` (the training loop); ``wall_s``: the stage's wall time
        measured by the pipeline (``run.json`` ``stage_seconds``: process start to end, with loading and
        saving); ``tokens`` / ``flops``: the last cumulative ``tokens`` / ``flops`` of ``metrics.jsonl`` when
        logged (else tokens from the FLOPs axis' source and tokens x FLOPs/token); ``tokens_per_s`` =
        tokens / train_s. ``by_arm``: sums over stages (mean over seeds) and the ratios to the baseline."""
        stage_secs = self.meta.get("stage_seconds") or {}
        rows = []
        for (arm, seed, stage), log in sorted(self.logs.items()):
            stepped = [r for r in log if "step" in r]
            if not stepped:
                continue
            el = [r["elapsed_s"] for r in stepped if r.get("elapsed_s") is not None]
            tok = [r["tokens"] for r in stepped if r.get("tokens") is not None]
            fl = [r["flops"] for r in stepped if r.get("flops") is not None]
            fpt = _get(self._info, arm, "flops_per_token")
            rec = {"arm": arm, "seed": seed, "stage": stage, "train_s": float(el[-1]) if el else None,
                   "wall_s": stage_secs.get(f"{arm}_seed{seed}_{stage}"),
                   "tokens": float(tok[-1]) if tok else None, "tokens_source": "logged 'tokens'" if tok else None,
                   "flops": float(fl[-1]) if fl else None, "flops_source": "logged 'flops'" if fl else None}
            if rec["tokens"] is None:
                axis, how = _tokens_axis(log, stage, self.meta)
                if axis:
                    rec["tokens"], rec["tokens_source"] = float(axis[-1]), how
            if rec["flops"] is None and rec["tokens"] is not None and fpt:
                rec["flops"], rec["flops_source"] = rec["tokens"] * fpt, "tokens x FLOPs/token"
            rec["tokens_per_s"] = rec["tokens"] / rec["train_s"] if rec["tokens"] and rec["train_s"] else None
            if any(rec[k] is not None for k in ("train_s", "wall_s", "tokens")):
                rows.append(rec)
        by_arm = {}
        for arm in self.found["arms"]:
            seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
            if not seeds:
                continue
            per_stage = {}
            for stage in STAGES:
                rs = [r for r in rows if r["arm"] == arm and r["stage"] == stage]
                if rs:
                    per_stage[stage] = {k: (float(np.mean([r[k] for r in rs])) if all(r[k] is not None for r in rs)
                                            else None) for k in ("train_s", "wall_s", "tokens", "flops", "tokens_per_s")}
            by_arm[arm] = {"seeds": seeds, "stages": per_stage}
        base = by_arm.get(baseline or "")
        keys = ("train_s", "wall_s", "tokens", "flops")
        for d in by_arm.values():  # totals over the stages both this arm and the baseline measured
            common = {k: [st for st in d["stages"] if base and st in base["stages"] and d["stages"][st][k] is not None
                          and base["stages"][st][k] is not None] for k in keys}
            d["total"] = {k: sum(d["stages"][st][k] for st in common[k]) if common[k] else None for k in keys}
            d["total_stages"] = common
        for arm, d in by_arm.items():
            ratio = {}
            if base and arm != baseline:
                for stage, v in d["stages"].items():
                    b = base["stages"].get(stage)
                    if b:
                        ratio[stage] = {k: v[k] / b[k] if v[k] and b[k] else None for k in ("train_s", "wall_s", "flops")}
                btot = {k: sum(base["stages"][st][k] for st in d["total_stages"][k]) if d["total_stages"][k] else None
                        for k in keys}
                ratio["total"] = {k: d["total"][k] / btot[k] if d["total"][k] and btot[k] else None
                                  for k in ("train_s", "wall_s", "flops")}
            d["ratio_to_baseline"] = ratio
            d["flops_per_token_ratio"] = _get(self._info, arm, "flops_ratio_to_baseline")
        return {"rows": rows, "by_arm": by_arm, "baseline": baseline}

    def routing_training(self) -> list[dict]:
        """Near-dead experts in the last logged training window (``moe/layer{l}/expert{e}_load``)."""
        pat = re.compile(r"moe/layer(\d+)/expert(\d+)_load$")
        out = []
        for (arm, seed, stage), rows in sorted(self.logs.items()):
            last = next((r for r in reversed(rows) if any(pat.match(k) for k in r)), None)
            if last is None:
                continue
            loads: dict[int, dict[int, float]] = {}
            for k, v in last.items():
                m = pat.match(k)
                if m:
                    loads.setdefault(int(m.group(1)), {})[int(m.group(2))] = float(v)
            n_exp = 1 + max(e for d in loads.values() for e in d)
            dead = [{"layer": la, "expert": e, "load_fraction": f} for la, d in sorted(loads.items())
                    for e, f in sorted(d.items()) if f < 0.1 / n_exp]
            out.append({"arm": arm, "seed": seed, "stage": stage, "step": last.get("step"), "n_routed_experts": n_exp,
                        "near_dead_threshold": 0.1 / n_exp, "near_dead": dead})
        return out

    def samples(self) -> dict:
        """Per evaluation (first seed of each arm): one generation per task and two verse answers per task."""
        keep = ("id", "task", "prompt", "reference", "prediction", "stopped_on_eos", "n_new_tokens")
        out = {}
        for (a, s, st), e in sorted(self.evals.items()):
            if s != min(self.found["seeds"][a]):
                continue
            smp = _get(e, "generation", "samples_by_task") or _get(e, "generation", "samples") or []
            verse = _get(e, "verse", "samples_by_task") or []
            rows = [{k: x.get(k) for k in keep} for x in smp]
            for x in verse:
                rows.append({**{k: x.get(k) for k in keep}, "kind": "verse",
                             "form_ok": _get(x, "verse", "form_ok"), "degenerate": _get(x, "verse", "degenerate")})
            if rows:
                out[f"{a}_seed{s}_{st}"] = rows
        return out

    def dpo_shared(self, baseline: str | None) -> dict:
        """DPO on the one shared held-out pair set (:mod:`evaluation.pairs`): per arm and seed, the implicit
        reward accuracy (DPO vs SFT checkpoint of that arm and seed, tie 0.5) with a bootstrap CI over pairs,
        each checkpoint's preference accuracy, and the paired difference in reward accuracy to the baseline."""
        from .pairs import preference_accuracy, reward_wins

        rows, wins = [], {}
        for arm in self.found["arms"]:
            for s in self.found["seeds"][arm]:
                pd, ps = self.found["pairs"].get((arm, s, "dpo")), self.found["pairs"].get((arm, s, "sft"))
                if pd is None or ps is None:
                    continue
                rd, rs = _read_jsonl(pd), _read_jsonl(ps)
                w = reward_wins(rd, rs)
                if not w:
                    continue
                wins[(arm, s)] = w
                ci = bootstrap_mean_ci(list(w.values()), self.n_resamples, self.seed)
                rows.append({"arm": arm, "seed": s, "n_pairs": len(w), "pairs_file": str(pd),
                             "reward_accuracy": {k: ci[k] for k in ("mean", "ci_low", "ci_high")},
                             "sft_preference_accuracy": preference_accuracy(rs, self.n_resamples, self.seed),
                             "dpo_preference_accuracy": preference_accuracy(rd, self.n_resamples, self.seed)})
        comps = []
        for arm in self.found["arms"]:
            if arm == baseline:
                continue
            per_seed = {}
            for s in self.found["seeds"][arm]:
                a, b = wins.get((arm, s)), wins.get((baseline, s))
                if a and b:
                    ids = sorted(set(a) & set(b))
                    r = paired_bootstrap([a[i] for i in ids], [b[i] for i in ids], self.n_resamples, self.seed)
                    per_seed[str(s)] = {k: r[k] for k in ("diff", "ci_low", "ci_high", "mean_a", "mean_b", "n")}
            if per_seed:
                comps.append({"arm": arm, "baseline": baseline, "metric": "shared_pairs_reward_accuracy",
                              "per_seed": per_seed,
                              "across_seeds": seed_summary([d["diff"] for d in per_seed.values()])})
        if not rows:
            self.notes.append("no arm has shared held-out pair files (eval/*_sft_pairs.jsonl and *_dpo_pairs.jsonl): "
                              "no comparable DPO evaluation.")
        return {"construction": "evaluation/pairs.py", "rows": rows, "comparisons": comps}
