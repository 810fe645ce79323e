"""Optimizers of the shared trainer: AdamW, or Muon for the hidden matrices + AdamW for the rest.

``--optimizer adamw``: one ``torch.optim.AdamW`` (betas 0.9/0.95, eps 1e-8), weight decay on matrices only,
peak rate ``--learning_rate``.

``--optimizer muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5 Newton-Schulz steps, its default
shape-dependent rate adjustment) on every *hidden* weight matrix — attention and FFN projections, and each
expert's matrices of the 3-D routed-expert tensors ``[E, out, in]`` (orthogonalised expert by expert, exactly
as E separate 2-D parameters would be; the Newton-Schulz iteration runs batched over same-shaped matrices, bit
for bit torch's result) — with peak rate ``--muon_lr`` and decoupled weight decay
``--weight_decay``; ``torch.optim.AdamW`` as above on the rest: token embeddings (= the tied LM head), an
untied LM head, norms and the MoE router, with peak rate ``--learning_rate``. :func:`param_groups` puts every
trainable parameter in exactly one group.

Each group carries its own peak rate (``peak_lr``); the trainer sets ``lr`` of every group before each step
from the one schedule shape (``trainer.schedule.lr_at``) and that group's peak, so the two optimizers have
their own rates and schedules, and everything (momenta, peaks) is in ``state_dict`` for an exact resume.
"""

from __future__ import annotations

import torch

from .schedule import lr_at

OPTIMIZERS = ("adamw", "muon")
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
MUON_MOMENTUM = 0.95


def is_muon_param(name: str, p: torch.nn.Parameter) -> bool:
    """A hidden weight matrix: ≥ 2-D and not the embedding, the LM head or the MoE router."""
    return p.ndim >= 2 and not is_embedding_param(name) and "router" not in name.lower()


def is_embedding_param(name: str) -> bool:
    """The token embeddings (= the tied LM head) or an untied LM head."""
    n = name.lower()
    return any(k in n for k in ("embed", "lm_head", "wte", "wpe"))


def param_groups(model: torch.nn.Module, optimizer: str, *, lr: float, muon_lr: float, weight_decay: float,
                 embedding_lr: float | None = None) -> list[dict]:
    """Parameter groups (each trainable parameter in exactly one): ``name``, ``kind`` (``adamw`` | ``muon``),
    ``peak_lr``, ``weight_decay``, ``params``; empty groups are left out.

    ``adamw``: ``adamw_decay`` (matrices) and ``adamw_no_decay`` (norms), both at ``lr``. ``muon``: ``muon`` (hidden
    matrices, ``muon_lr``), ``embeddings`` (token embeddings / LM head, AdamW at ``embedding_lr``, default ``lr``),
    ``adamw_decay`` (other matrices: the MoE router) and ``adamw_no_decay`` (norms), both at ``lr``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if embedding_lr is not None and optimizer != "muon" and embedding_lr != lr:
        raise ValueError("--embedding_lr applies to --optimizer muon (with adamw every matrix has --learning_rate)")
    muon, emb, decay, no_decay = [], [], [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        if optimizer == "muon" and is_muon_param(name, p):
            muon.append(p)
        elif optimizer == "muon" and p.ndim >= 2 and is_embedding_param(name):
            emb.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "muon", "kind": "muon", "params": muon, "peak_lr": muon_lr, "weight_decay": weight_decay},
        {"name": "embeddings", "kind": "adamw", "params": emb,
         "peak_lr": lr if embedding_lr is None else embedding_lr, "weight_decay": weight_decay},
        {"name": "adamw_decay", "kind": "adamw", "params": decay, "peak_lr": lr, "weight_decay": weight_decay},
        {"name": "adamw_no_decay", "kind": "adamw", "params": no_decay, "peak_lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` that also accepts 3-D stacked expert weights ``[E, out, in]``: each expert's
    matrix gets its own momentum slice, Newton-Schulz orthogonalisation and rate adjustment (the update of
    E separate 2-D parameters). 2-D parameters are handled by torch unchanged."""

    def __init__(self, params, **kwargs):
        flat, stacked = [], []
        for g in (dict(g) for g in params):
            if all(p.ndim == 2 for p in g["params"]):
                flat.append(g)
                continue
            two = [p for p in g["params"] if p.ndim == 2]
            three = [p for p in g["params"] if p.ndim == 3]
            if len(two) + len(three) != len(g["params"]):
                raise ValueError("Muon takes 2-D matrices and 3-D stacks of matrices only")
            if two:
                flat.append(dict(g, params=two))
            stacked.append(dict(g, params=three))
        if not flat:
            raise ValueError("Muon needs at least one 2-D matrix")
        super().__init__(flat, **kwargs)  # torch checks that these are 2-D
        for g in stacked:
            self.add_param_group(g)

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs) -> bool:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or torch.is_complex(p):
                raise RuntimeError("Muon supports dense real parameters only")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            if p.ndim == 3:  # views: the in-place updates land in the stacked tensors
                params_with_grad.extend(p.unbind(0))
                grads.extend(p.grad.unbind(0))
                muon_momentum_bufs.extend(buf.unbind(0))
            else:
                params_with_grad.append(p)
                grads.append(p.grad)
                muon_momentum_bufs.append(buf)
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """torch's Muon update, batched: the momenta with ``torch._foreach`` ops and the Newton-Schulz iteration
        once per distinct matrix shape on the stacked updates (``baddbmm``) instead of once per matrix. A small
        model has dozens of small matrices, whose per-matrix iterations cost more in call overhead than in
        arithmetic (28 matrices x 5 steps x 3 products per optimizer step for mateconv-tiny)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"adjust_lr_fn {group['adjust_lr_fn']!r}: this Muon implements torch's 'original'")
            lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            for shape, idx in by_shape.items():
                ortho = newton_schulz_batched(torch.stack([updates[i] for i in idx]), group["ns_coefficients"],
                                              group["ns_steps"], group["eps"])
                ps = [params[i] for i in idx]
                torch._foreach_mul_(ps, 1 - lr * wd)
                adjusted = lr * max(1.0, shape[0] / shape[1]) ** 0.5  # torch's "original" rate adjustment
                torch._foreach_add_(ps, [o.to(p.dtype) for o, p in zip(ortho.unbind(0), ps)], alpha=-adjusted)
        return loss


def newton_schulz_batched(g: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` (bf16, quintic, ``steps`` iterations) for a stack ``[n, A, B]``
    of same-shaped matrices, each normalised by its own Frobenius norm."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(1) > g.size(2)
    if tall:
        x = x.transpose(1, 2)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.transpose(1, 2))
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.transpose(1, 2) if tall else x


class CombinedOptimizer:
    """Muon + AdamW stepped as one optimizer (``param_groups``, ``step``, ``zero_grad``, ``state_dict``)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers.values() for p, s in o.state.items()}

    def step(self, closure=None):
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run uses {sorted(self.optimizers)} "
                             "(resume with the same --optimizer)")
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


def build_optimizer(groups: list[dict], device: torch.device):
    """``torch.optim.AdamW`` for the ``adamw`` groups (+ :class:`Muon` for the ``muon`` groups, combined)."""
    adam = [g for g in groups if g["kind"] == "adamw"]
    muon = [g for g in groups if g["kind"] == "muon"]
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    opts = {}
    if adam:
        opts["adamw"] = torch.optim.AdamW([dict(g, lr=g["peak_lr"]) for g in adam], lr=adam[0]["peak_lr"],
                                          betas=ADAM_BETAS, eps=ADAM_EPS, **fused)
    if muon:
        opts["muon"] = Muon([dict(g, lr=g["peak_lr"]) for g in muon], lr=muon[0]["peak_lr"],
                            momentum=MUON_MOMENTUM, nesterov=True)
    if list(opts) == ["adamw"]:
        return opts["adamw"]
    return CombinedOptimizer(opts)


def group_peak(group: dict, lr: float, muon_lr: float) -> float:
    """Peak rate of a group (ours carry ``peak_lr``; DeepSpeed's Muon groups carry ``use_muon``)."""
    if "peak_lr" in group:
        return group["peak_lr"]
    return muon_lr if group.get("use_muon") else lr


def set_lrs(optimizer, step: int, total: int, warmup: int, min_ratio: float, lr: float, muon_lr: float,
            schedule: str = "cosine", decay_ratio: float = 0.3) -> dict[str, float]:
    """Set every group's rate for optimizer step ``step``; -> ``{"lr": AdamW rate[, "lr_muon": Muon rate]
    [, "lr_embeddings": the embeddings' AdamW rate (Muon runs)]}``."""
    out = {}
    for g in optimizer.param_groups:
        peak = group_peak(g, lr, muon_lr)
        g["lr"] = lr_at(step, total, peak, warmup, min_ratio, schedule, decay_ratio)
        key = "lr_muon" if (g.get("kind") == "muon" or g.get("use_muon")) else \
            "lr_embeddings" if g.get("name") == "embeddings" else "lr"
        out.setdefault(key, g["lr"])
    return out
