"""The report's figures (matplotlib, Agg): loss by step and by FLOPs, expert load, DPO curves, arm differences."""

from __future__ import annotations

import re

import numpy as np

from .report_tables import GEN_METRICS, _tokens_axis


def _log_axis(ax) -> None:
    """Log x axis with at most ~6 labelled ticks (1, 2, 5 x 10^k), no minor labels, slanted: no overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=7))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0e}".replace("e+", "e")))
    ax.xaxis.set_minor_formatter(NullFormatter())
    for lab in ax.get_xticklabels():
        lab.set_rotation(30)
        lab.set_ha("right")


class ReportFigures:
    """Figure methods of :class:`evaluation.report.Report` (they read its logs, arms and notes)."""

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
                    _log_axis(ax)
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
        logged = [(float(r["step"]), float(r["flops"])) for r in rows if r.get("flops") is not None and "step" in r]
        if logged:  # the trainer's cumulative FLOPs (tokens x FLOPs/token), interpolated by step
            xs, ys = zip(*sorted(logged))
            self.token_sources[f"{arm}/{stage}"] = "logged 'flops'"
            return [max(float(np.interp(float(r.get("step", xs[-1])), xs, ys)), 1.0) for r in rows]
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

    def fig_headline(self, headline: dict):
        """One panel per headline measure: value and 95% CI per arm and stage."""
        import matplotlib.pyplot as plt

        cols, rows = headline["columns"], headline["rows"]
        if not cols or not rows:
            return
        n = len(cols)
        ncol = min(5, n)
        nrow = (n + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.9 * nrow + 0.6), squeeze=False,
                                 layout="constrained")
        colors = {a: f"C{i}" for i, a in enumerate(self.found["arms"])}
        labels = [f"{r['arm']}\n{r['stage']}" for r in rows]
        for k, metric in enumerate(cols):
            ax = axes[k // ncol][k % ncol]
            for i, r in enumerate(rows):
                v = r["values"].get(metric)
                if not v or v["mean"] is None:
                    continue
                lo, hi = v.get("ci_low"), v.get("ci_high")
                err = [[v["mean"] - lo], [hi - v["mean"]]] if lo is not None and hi is not None else None
                ax.errorbar(i, v["mean"], yerr=err, fmt="o", color=colors.get(r["arm"], "k"), capsize=3)
            if metric == "repetition_rate" and headline.get("reference_repetition_rate"):
                ax.axhline(headline["reference_repetition_rate"]["mean"], color="k", ls=":", lw=1,
                           label="reference answers")
                ax.legend(fontsize=6)
            if metric.startswith("mc_centred/"):
                ax.axhline(0, color="k", lw=0.8)  # chance
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_title(metric, fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        for k in range(n, nrow * ncol):
            axes[k // ncol][k % ncol].axis("off")
        fig.suptitle("Headline measures per arm and stage (95% CI; multiple choice centred: 0 = chance)")
        self._save(fig, "headline.png", "Headline measures (bits per character, centred multiple-choice accuracy, "
                                        "form rate, repetition rate) per arm and stage with 95% CIs.")

    def fig_bpc_curves(self):
        """Validation bits per character logged by the trainer (``<name>/bpc``), by step and by FLOPs."""
        import matplotlib.pyplot as plt

        keyed = [(k, rows) for k, rows in sorted(self.logs.items())
                 if any(key.endswith("/bpc") for r in rows for key in r)]
        if not keyed:
            return
        colors = {a: f"C{i}" for i, a in enumerate(self.found["arms"])}
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
        for ax, axis in zip(axes, ("step", "flops")):
            for (arm, seed, stage), rows in keyed:
                x_all = self._x(rows, arm, stage, axis)
                if x_all is None:
                    continue
                for j, key in enumerate(sorted({k for r in rows for k in r if k.endswith("/bpc")})):
                    pts = [(x, r[key]) for r, x in zip(rows, x_all) if r.get(key) is not None]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[arm], marker="os^"[j % 3], ms=3,
                            ls="-" if stage == "pretrain" else "--", label=f"{arm} seed{seed} {stage} {key}")
            ax.set_xlabel("optimizer step (per stage)" if axis == "step" else "training FLOPs (per stage)")
            if axis == "flops":
                _log_axis(ax)
            ax.set_ylabel("bits per character")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        fig.suptitle("Held-out bits per character during training (the trainer's fixed validation sample)")
        self._save(fig, "bpc_curves.png", "Validation bits per character logged by the trainer, by step and by FLOPs.")
