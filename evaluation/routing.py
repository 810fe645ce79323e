"""The one routing-statistics module of MoE models (used by the trainer's log lines and by evaluation).

Usage::

    from evaluation.routing import routing_stats, flat_routing_metrics, near_dead_line
    counts = model.expert_load()            # [n_moe_layers, n_experts] tokens (x top-k slots) per expert
    stats = routing_stats(counts)           # structured dict (see below)
    rec.update(flat_routing_metrics(stats)) # moe/... keys for metrics.jsonl
    line += near_dead_line(stats)           # " near_dead L2E5(1.3%)" or ""

Definitions, per MoE layer ``l`` (layers are numbered among the MoE layers, in model order):

* ``load_fraction[l][e]`` = share of the routed (token, top-k slot) assignments that went to expert ``e``
  (sums to 1; uniform = ``1/E``);
* ``max_violation[l]`` = ``max_e load / mean_e load - 1`` (0 = perfectly balanced);
* ``near_dead[l]`` = the experts whose load fraction is below ``NEAR_DEAD_FRACTION`` (10%) of the uniform
  load ``1/E``;
* ``expert_load_entropy[l]`` = entropy (nats) of the load distribution ``load_fraction[l]``;
  ``expert_load_entropy_norm[l]`` = the same / ``ln E`` (1 = uniform loads). This is what the trainer
  used to log as ``moe/routing_entropy``: it says whether experts are used evenly **over the batch**;
* ``router_entropy[l]`` = mean over (non-padding) tokens of the entropy (nats) of that token's router
  distribution over the routed experts (sigmoid scores are normalised to sum to 1 first);
  ``router_entropy_norm[l]`` = the same / ``ln E``. It says how **decided each token's** routing is
  (low = confident). It needs the router probabilities (:class:`RoutingCollector`); from expert counts
  alone it is absent (``None``).

The two entropies differ: a router that sends every token confidently to a different expert has a high
load entropy and a low router entropy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NEAR_DEAD_FRACTION = 0.1  # an expert below 10% of the uniform load 1/E is "near-dead"


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def routing_stats(counts, router_entropy_sum=None, n_tokens=None, top_k: int | None = None) -> dict | None:
    """Routing statistics from per-layer expert counts ``[L, E]`` (tensor or array).

    ``router_entropy_sum[l]`` / ``n_tokens[l]`` (optional): summed per-token router entropies (nats) and the
    number of tokens they cover (from :class:`RoutingCollector`). Returns ``None`` for an empty
    ``counts`` (dense model). Keys: ``n_moe_layers``, ``n_routed_experts``, ``top_k``, ``uniform_fraction``,
    ``near_dead_threshold`` (fraction), ``layers`` (per layer: ``layer``, ``tokens``, ``expert_counts``,
    ``load_fraction``, ``max_violation``, ``near_dead`` (expert indices), ``expert_load_entropy``,
    ``expert_load_entropy_norm``, ``router_entropy``, ``router_entropy_norm``), ``near_dead`` (list of
    ``{"layer", "expert", "load_fraction"}``), ``n_near_dead``, ``max_violation_max``,
    ``max_violation_mean``, ``expert_load_entropy_norm_mean``, ``router_entropy_mean`` (nats or None),
    ``router_entropy_norm_mean``, ``entropy_max`` (= ln E).
    """
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().double().cpu().numpy()
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0:
        return None
    if counts.ndim != 2:
        raise ValueError(f"expert counts must be [n_moe_layers, n_experts], got shape {counts.shape}")
    n_layers, n_exp = counts.shape
    log_e = math.log(n_exp) if n_exp > 1 else 1.0
    uniform = 1.0 / n_exp
    threshold = NEAR_DEAD_FRACTION * uniform
    ent_sum = None if router_entropy_sum is None else np.asarray(router_entropy_sum, dtype=np.float64)
    ntok = None if n_tokens is None else np.asarray(n_tokens, dtype=np.float64)
    layers, dead = [], []
    for i in range(n_layers):
        c = counts[i]
        total = c.sum()
        frac = c / total if total > 0 else np.zeros_like(c)
        mean = frac.mean()
        r_ent = float(ent_sum[i] / ntok[i]) if ent_sum is not None and ntok is not None and ntok[i] > 0 else None
        nd = [int(e) for e in np.flatnonzero(frac < threshold)] if total > 0 else []
        dead += [{"layer": i, "expert": e, "load_fraction": float(frac[e])} for e in nd]
        load_ent = _entropy(frac)
        layers.append({
            "layer": i,
            "tokens": int(ntok[i]) if ntok is not None else None,
            "expert_counts": [float(v) for v in c],
            "load_fraction": [float(v) for v in frac],
            "max_violation": float(frac.max() / mean - 1.0) if mean > 0 else None,
            "near_dead": nd,
            "expert_load_entropy": load_ent,
            "expert_load_entropy_norm": load_ent / log_e,
            "router_entropy": r_ent,
            "router_entropy_norm": None if r_ent is None else r_ent / log_e,
        })
    viol = [lay["max_violation"] for lay in layers if lay["max_violation"] is not None]
    r_ents = [lay["router_entropy"] for lay in layers if lay["router_entropy"] is not None]
    return {
        "n_moe_layers": n_layers, "n_routed_experts": n_exp, "top_k": top_k,
        "uniform_fraction": uniform, "near_dead_threshold": threshold, "entropy_max": math.log(n_exp),
        "router_entropy_max": math.log(n_exp),  # the same ln E (older reports read this name)
        "layers": layers, "near_dead": dead, "n_near_dead": len(dead),
        "max_violation_max": float(max(viol)) if viol else None,
        "max_violation_mean": float(np.mean(viol)) if viol else None,
        "expert_load_entropy_norm_mean": float(np.mean([lay["expert_load_entropy_norm"] for lay in layers])),
        "router_entropy_mean": float(np.mean(r_ents)) if r_ents else None,
        "router_entropy_norm_mean": float(np.mean(r_ents)) / log_e if r_ents else None,
    }


def flat_routing_metrics(stats: dict | None, prefix: str = "moe/") -> dict[str, float]:
    """Scalar log keys: ``moe/layer{l}/expert{e}_load``, ``moe/layer{l}/max_violation``,
    ``moe/layer{l}/expert_load_entropy_norm``, ``moe/layer{l}/near_dead`` (count), ``[moe/layer{l}/router_entropy]``,
    and over layers ``moe/max_violation`` (max), ``moe/expert_load_entropy_norm`` (mean), ``moe/near_dead``
    (total count), ``[moe/router_entropy]`` (mean, nats). Empty for ``None``."""
    out: dict[str, float] = {}
    if not stats:
        return out
    for lay in stats["layers"]:
        p = f"{prefix}layer{lay['layer']}/"
        if lay["max_violation"] is not None:
            out[p + "max_violation"] = lay["max_violation"]
        out[p + "expert_load_entropy_norm"] = lay["expert_load_entropy_norm"]
        out[p + "near_dead"] = float(len(lay["near_dead"]))
        if lay["router_entropy"] is not None:
            out[p + "router_entropy"] = lay["router_entropy"]
        for e, f in enumerate(lay["load_fraction"]):
            out[p + f"expert{e}_load"] = f
    if stats["max_violation_max"] is not None:
        out[prefix + "max_violation"] = stats["max_violation_max"]
    out[prefix + "expert_load_entropy_norm"] = stats["expert_load_entropy_norm_mean"]
    out[prefix + "near_dead"] = float(stats["n_near_dead"])
    if stats["router_entropy_mean"] is not None:
        out[prefix + "router_entropy"] = stats["router_entropy_mean"]
    return out


def near_dead_line(stats: dict | None) -> str:
    """Log-line fragment naming the near-dead experts, e.g. ``" near_dead L2E5(1.3%<1.2%)"``; "" when none."""
    if not stats or not stats["near_dead"]:
        return ""
    thr = 100 * stats["near_dead_threshold"]
    items = " ".join(f"L{d['layer']}E{d['expert']}({100 * d['load_fraction']:.1f}%)" for d in stats["near_dead"])
    return f" near_dead(<{thr:.1f}% load) {items}"


def _moe_modules(model) -> list[torch.nn.Module]:
    """The MoE blocks of the model in layer order (``model.moe_layers()``; empty for a dense model)."""
    fn = getattr(model, "moe_layers", None)
    return list(fn()) if callable(fn) else []


class RoutingCollector:
    """Accumulates per-layer expert loads and router entropies of the MoE layers through forward hooks.

    A forward hook on every MoE block reads the block's input and token mask, asks the block's own
    ``route()`` for the router scores (the exact code path of training and inference), and adds:
    the block's ``last_counts`` (tokens per expert of that forward, padding excluded by the model) and
    the entropy of the per-token router distribution over the non-padding tokens (sigmoid scores are
    normalised to sum to 1 first). :meth:`stats` gives :func:`routing_stats`.
    """

    def __init__(self, model):
        self.modules = _moe_modules(model)
        self.enabled = bool(self.modules)
        cfg = model.config
        self.n_experts = int(getattr(cfg, "n_routed_experts", 0) or 0) if self.enabled else 0
        self.top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0) if self.enabled else 0
        n = len(self.modules)
        self.counts = np.zeros((n, self.n_experts), dtype=np.float64)
        self.entropy_sum = np.zeros(n, dtype=np.float64)
        self.n_tokens = np.zeros(n, dtype=np.float64)
        self._handles = [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self.modules)]

    def _hook(self, layer: int):
        @torch.no_grad()
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            mask = args[1] if len(args) > 1 else kwargs.get("token_mask")
            flat = x.reshape(-1, x.shape[-1])
            scores = module.route(flat)[0].float()
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
            if mask is not None:
                probs = probs[mask.reshape(-1).bool()]
            ent = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
            self.entropy_sum[layer] += float(ent.sum())
            self.n_tokens[layer] += probs.shape[0]
            self.counts[layer] += module.last_counts.double().cpu().numpy()

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def stats(self) -> dict | None:
        if not self.enabled:
            return None
        return routing_stats(self.counts, self.entropy_sum, self.n_tokens, top_k=self.top_k)
