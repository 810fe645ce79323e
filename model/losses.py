"""The one token negative log-likelihood of the project.

Every loss and every log-probability (pretraining and SFT cross-entropy, DPO's sequence log-probabilities,
held-out loss and bits per character) is computed here, in fp32, over *pre-shifted* targets:
``targets[b, t]`` is the token to predict at position ``t``; ``IGNORE_INDEX`` marks positions without loss.
Training (pretraining and SFT) uses :func:`linear_nll_sum`, the same NLL with the LM head fused in and chunked
over rows, so that no [B, T, V] logits (nor their gradient) are ever materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in nats, ``[B, T]`` (fp32), 0 where ``targets == IGNORE_INDEX``. ``logits``: ``[B, T, V]``."""
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets[b, t] | prefix)`` per position, 0 where ignored (``-token_nll``)."""
    return -token_nll(logits, targets)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL summed over all target tokens (fp32 scalar) and their number (the trainer's loss numerator)."""
    return token_nll(logits, targets).sum(), (targets != IGNORE_INDEX).sum()


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: NLL summed over its target tokens ``[B]`` and their number ``[B]``."""
    return token_nll(logits, targets).sum(-1), (targets != IGNORE_INDEX).sum(-1)


def sequence_nll_of(model, input_ids: torch.Tensor, attention_mask, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_nll` of ``model`` on a batch. A MateConv model computes logits only where a target is
    (``MateConvForCausalLM.sequence_nll``: the same NLL); any other causal LM (an exported transformers model)
    through its full logits."""
    if hasattr(model, "sequence_nll"):
        return model.sequence_nll(input_ids, attention_mask, targets)
    return sequence_nll(model(input_ids=input_ids, attention_mask=attention_mask).logits, targets)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face ``labels`` (aligned with the inputs) -> pre-shifted targets (no copy of the logits)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------
# fused LM head + cross-entropy (training only)
# ----------------------------------------------------------------------------------------------------------

def fused_chunk_rows(hidden_size: int) -> int:
    """Rows of the LM head processed at once by :func:`linear_nll_sum`. Measured on one core of an AMX Xeon,
    vocab 6400, fused head forward + backward over 2048 rows (bf16 autocast / fp32): at hidden 192, 256 rows
    were fastest (512: +1% / +14%, 1024: +29% / +13%, 128: +20% / +3%); at hidden 512, 512 rows (256: +25% /
    +3%, 1024: same). Smaller chunks make the matmuls slow, larger ones leave the cache."""
    return 256 if hidden_size < 384 else 512


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in here: the autocast dtype when autocast is on for its device."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _LinearNLLSum(torch.autograd.Function):
    """``sum_i -log softmax(hidden_i @ weight^T)[targets_i]`` without a [N, V] tensor; see :func:`linear_nll_sum`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, dtype: torch.dtype):
        dev = hidden.device.type
        low = dtype in (torch.float16, torch.bfloat16)  # low-precision matmuls, fp32 softmax and accumulation
        acc_dtype = torch.float32 if low else dtype
        valid = targets != IGNORE_INDEX
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # skip rows without loss (SFT prompts)
        grad_h = hidden.new_empty(hidden.shape) if rows is None else hidden.new_zeros(hidden.shape)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            h = hidden.to(dtype) if rows is None else hidden[rows].to(dtype)
            tgt = targets if rows is None else targets[rows]
            direct = rows is None and hidden.dtype == dtype
            gh = grad_h if direct else torch.empty_like(h)  # grad w.r.t. the (kept) rows, compute dtype
            m, v = h.shape[0], w.shape[0]
            c = max(1, min(chunk_rows, m))
            # per-chunk buffers, allocated once (fresh [C, V] allocations per chunk cost page faults on CPU)
            logits_buf = h.new_empty(c, v)
            lsm_buf = torch.empty(c, v, dtype=acc_dtype, device=h.device)
            if low:
                l32_buf, g_buf = torch.empty_like(lsm_buf), torch.empty_like(logits_buf)
                part, buf = torch.empty_like(w), torch.empty_like(grad_w)
            for s in range(0, m, c):
                h_c, t_c = h[s:s + c], tgt[s:s + c]
                n_c = h_c.shape[0]
                logits = torch.mm(h_c, w.t(), out=logits_buf[:n_c])            # [C, V] in the compute dtype
                lsm = torch._log_softmax(l32_buf[:n_c].copy_(logits) if low else logits, -1, False,
                                         out=lsm_buf[:n_c])                    # fp32
                lt = lsm.gather(1, t_c[:, None])[:, 0]                         # log p(target)
                total -= lt.sum().float()
                # d nll / d logits = softmax - onehot, in the compute dtype (low precision: the softmax kernel
                # works in fp32 and rounds once; the target entries p - 1 are computed in fp32)
                g = torch._softmax(logits, -1, False, out=g_buf[:n_c]) if low else lsm.exp_()
                at = torch.arange(n_c, device=g.device) * v + t_c
                g.view(-1)[at] = (lt.exp() - 1).to(g.dtype)
                torch.mm(g, w, out=gh[s:s + n_c])
                if not low:
                    grad_w.addmm_(g.t(), h_c)
                elif s == 0:
                    torch.mm(g.t(), h_c, out=part)                     # low-precision matmul ...
                    grad_w.copy_(part)
                else:
                    torch.mm(g.t(), h_c, out=part)
                    grad_w.add_(buf.copy_(part))                       # ... fp32 accumulation
            if rows is None:
                if not direct:
                    grad_h.copy_(gh)
            else:
                grad_h[rows] = gh.to(grad_h.dtype)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total, valid.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_count):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), grad_w * grad_total.to(grad_w.dtype), None, None, None


def linear_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nll_sum` of ``logits = hidden @ weight^T``, fused and chunked over rows (for training).

    ``hidden`` [N, H] (or [B, T, H]), ``weight`` [V, H] (the LM head), ``targets`` [N] (or [B, T]) pre-shifted
    with ``IGNORE_INDEX``. Returns (NLL sum, fp32 scalar; number of target tokens). Same math as
    ``nll_sum(F.linear(hidden, weight), targets)``: the logits of each chunk of ``chunk_rows`` rows (default
    :func:`fused_chunk_rows`) are one
    matmul in the compute dtype (the autocast dtype when autocast is on for the device, else the input dtype),
    the log-softmax, the target log-probability and the gradient ``softmax - onehot`` are fp32, the gradient
    matmuls run in the compute dtype and the weight gradient accumulates in fp32. The gradients are computed
    in the forward already (no [N, V] tensor is kept; rows without a target are skipped); the backward only
    scales them by the incoming gradient, so it cannot be differentiated twice. Gradients come back in the
    dtypes of ``hidden`` and ``weight``.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"{t.shape[0]} targets for {h.shape[0]} hidden rows")
    rows = fused_chunk_rows(h.shape[-1]) if chunk_rows is None else int(chunk_rows)
    return _LinearNLLSum.apply(h, weight, t, rows, compute_dtype(h))
