"""MateConv: a small LLaMA-style decoder with optional DeepSeek-style MoE, as one readable file.

Top-down:
    MateConvForCausalLM            embeddings -> N x MateConvDecoderLayer -> RMSNorm -> tied LM head
      MateConvDecoderLayer         x + Attn(RMSNorm(x)); x + FFN(RMSNorm(x))     (pre-norm)
        MateConvAttention          fused QKV, RoPE (Llama's rotate-half convention), GQA via SDPA
        MateConvMLP | MateConvMoE  SwiGLU; MoE = shared experts + top-k routed fine-grained experts

Weight layout notes (so checkpoints map 1:1 onto transformers' Llama / GraniteMoeShared):
    * ``qkv_proj.weight`` is ``cat([q_proj, k_proj, v_proj])`` along the output dim.
    * ``gate_up_proj.weight`` is ``cat([gate_proj, up_proj])`` along the output dim.
    * routed experts are stored as 3-D tensors ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.
    * RoPE rotates the two halves of each head (``rotate_half``), exactly like ``LlamaForCausalLM``.

The KV cache is a transformers ``Cache`` (``DynamicCache`` from ``generate``) or our preallocated
``StaticKVCache`` (``model/generation.py``); both expose ``update(k, v, layer_idx)`` and ``get_seq_length()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

try:  # transformers >= 5: init helpers that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

from .configuration_mateconv import MateConvConfig
from .losses import IGNORE_INDEX, compute_dtype, linear_nll_sum, nll_sum, shift_labels, token_nll


@dataclass
class MateConvCausalLMOutput(ModelOutput):
    """``CausalLMOutputWithPast`` plus the MoE balance loss (already multiplied by ``aux_loss_alpha``) and, for a
    forward with ``targets=``, the summed NLL of the targets and their number (``nll_sum``, ``nll_count``)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    nll_sum: torch.Tensor | None = None
    nll_count: torch.Tensor | None = None

    @property
    def past_key_values(self):
        return self.cache


# ----------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------


class MateConvRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (same math as ``LlamaRMSNorm``), fused by ``F.rms_norm``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, T, head_dim/2] for integer positions (any length: no fixed table)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, H, D] with cos/sin [B, T, 1, D/2] (Llama's convention, half the FLOPs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


#: On CPU, SDPA's bfloat16 flash kernel is 2-4x slower (forward + backward) than its float32 kernel for
#: windows up to ~256 tokens at head dim 32 (and about as fast at 512): measured on a 2-core AMX Xeon, e.g.
#: [16, 6, 128, 32] 106 vs 42 ms, [8, 6, 256, 32] 103 vs 59 ms, [4, 16, 512, 32] 271 vs 302 ms. So there
#: attention runs in float32 (inputs upcast, output cast back; no change under float32 or on GPU).
CPU_FP32_ATTENTION_MAX_LEN = 256


def _attention(q, k, v, attn_mask, causal: bool):
    """SDPA over [B, H, T, D]: the causal fast path when there is no mask."""
    kw = {"is_causal": causal} if attn_mask is None else {"attn_mask": attn_mask}
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and 1 < q.shape[2] <= CPU_FP32_ATTENTION_MAX_LEN:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kw)


class MateConvAttention(nn.Module):
    """Grouped-query attention with a fused QKV projection and SDPA (flash kernels where available)."""

    def __init__(self, config: MateConvConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.n_heads
        self.qkv_proj = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.o_proj._residual_proj = True

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=2)  # split (not slicing): cheap backward
        q, k = apply_rope(qk, cos.to(qk.dtype), sin.to(qk.dtype)).transpose(1, 2).split([self.n_heads, self.n_kv], 1)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.n_heads // self.n_kv
        if T == 1 and rep > 1:
            # decoding one token: fold the query heads of a group into the "length" dim -> no KV copy
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, rep, self.head_dim), k, v, attn_mask=attn_mask)
            return self.o_proj(y.reshape(B, 1, -1))
        if rep > 1:  # GQA: expand KV heads (one copy; fast path for every SDPA backend, incl. backward)
            S = k.shape[2]
            k = k[:, :, None].expand(B, self.n_kv, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)
            v = v[:, :, None].expand(B, self.n_kv, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)
        y = _attention(q, k, v, attn_mask, causal=T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MateConvMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.down_proj._residual_proj = True

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class _RoutedExperts(torch.autograd.Function):
    """All routed experts in one autograd node: one gather, one matmul per expert and projection, a weighted
    scatter-add; hand-written backward.

    ``src[r]`` is the token of the expert-sorted row ``r`` (``counts[e]`` consecutive rows per expert) and
    ``w_rows[r]`` its routing weight (0 on padding rows); the output is ``y[src[r]] += w_rows[r] *
    expert_e(x[src[r]])``. The rows are gathered once, already in the matmul dtype. Gate and up run as one
    matmul per expert into one [S, 2I] buffer (and their gradients as one, back through it): small matmuls pay a
    fixed cost per call, and a bfloat16 CPU matmul of a few hundred rows x 352 columns even runs on one thread
    where one of 704 columns uses two; SiLU and the products then run once over all rows. The routing weight
    scales the [S, I] activations (narrower than the [S, H] outputs). The backward writes each expert's weight
    gradient straight into one [E, ...] buffer (autograd on per-expert weight views would allocate and
    stack/zero-fill full-size gradients for every expert) and reuses the saved activations. A padding row reads
    some token but has weight 0: its output, and every gradient through it, is zero.
    """

    @staticmethod
    def forward(ctx, x, w_rows, w_gate_up, w_down, src, counts, dtype):
        wg, wd = w_gate_up.to(dtype), w_down.to(dtype)
        xs = x.to(dtype).index_select(0, src)
        inter = w_down.shape[2]
        gu = xs.new_empty(xs.shape[0], 2 * inter)
        spans = _spans(counts)
        for e, rows in spans:
            torch.mm(xs[rows], wg[e].t(), out=gu[rows])
        silu = F.silu(gu[:, :inter])
        act = silu * gu[:, inter:]
        w = w_rows.to(dtype)[:, None]
        act_w = act * w
        out = xs.new_empty(xs.shape[0], w_down.shape[1])
        for e, rows in spans:
            torch.mm(act_w[rows], wd[e].t(), out=out[rows])
        y = xs.new_zeros(x.shape[0], w_down.shape[1]).index_add_(0, src, out)
        ctx.save_for_backward(xs, src, w, wg, wd, gu, silu, act, act_w)
        ctx.counts, ctx.weight_dtype, ctx.x_dtype, ctx.w_dtype = counts, w_gate_up.dtype, x.dtype, w_rows.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xs, src, w, wg, wd, gu, silu, act, act_w = ctx.saved_tensors
        inter = wd.shape[2]
        dout = dy.to(xs.dtype).index_select(0, src)
        spans = _spans(ctx.counts)
        d_act_w = torch.empty_like(act)
        for e, rows in spans:
            torch.mm(dout[rows], wd[e], out=d_act_w[rows])
        d_w_rows = (d_act_w * act).sum(-1)  # accumulated in fp32 by the reduction, rounded once
        d_act = d_act_w * w
        d_gu = torch.empty_like(gu)
        torch.ops.aten.silu_backward.grad_input(d_act * gu[:, inter:], gu[:, :inter], grad_input=d_gu[:, :inter])
        torch.mul(d_act, silu, out=d_gu[:, inter:])
        dxs = torch.empty_like(xs)
        dwg = torch.zeros(wg.shape, dtype=ctx.weight_dtype, device=xs.device)
        dwd = torch.zeros(wd.shape, dtype=ctx.weight_dtype, device=xs.device)
        same_dtype = xs.dtype == ctx.weight_dtype
        for e, rows in spans:
            if same_dtype:  # write the weight gradients in place
                torch.mm(dout[rows].t(), act_w[rows], out=dwd[e])
                torch.mm(d_gu[rows].t(), xs[rows], out=dwg[e])
            else:  # autocast: low-precision matmul, fp32 gradient
                dwd[e].copy_(dout[rows].t() @ act_w[rows])
                dwg[e].copy_(d_gu[rows].t() @ xs[rows])
            torch.mm(d_gu[rows], wg[e], out=dxs[rows])
        dx = torch.zeros(dy.shape, dtype=xs.dtype, device=xs.device).index_add_(0, src, dxs)
        return dx.to(ctx.x_dtype), d_w_rows.to(ctx.w_dtype), dwg, dwd, None, None, None


def _spans(counts) -> list[tuple[int, slice]]:
    """(expert, row slice) of every expert that has rows, for rows sorted by expert."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, slice(start, start + n)))
            start += n
    return out


#: rows per expert are padded to a multiple of this under CPU bf16/fp16 autocast (0: off); see MateConvExperts
CPU_EXPERT_ROW_BLOCK = 64


class MateConvExperts(nn.Module):
    """The routed experts as 3-D weights; tokens are grouped by expert with one sort (no loop over tokens)."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """x [N, H]; topk_idx/topk_w [N, k] -> sum_j w_j * expert_{idx_j}(x)  [N, H]."""
        k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        order = flat.argsort(stable=True)  # group the N*k (token, slot) pairs by expert
        token = order // k
        w_sorted = topk_w.reshape(-1)[order]
        counts_t = torch.bincount(flat, minlength=self.n_experts)
        dtype = compute_dtype(x)
        if x.device.type == "cpu" and dtype != self.gate_up_proj.dtype and CPU_EXPERT_ROW_BLOCK:
            # low-precision CPU matmuls build a kernel per shape: with row counts that change at every step the
            # shapes never repeat (measured 1.8x slower than a fixed routing). Pad each expert's rows to a multiple
            # of the block (padding rows have weight 0): few distinct shapes.
            b = CPU_EXPERT_ROW_BLOCK
            padded = (counts_t + b - 1) // b * b
            starts = torch.cumsum(padded, 0) - padded
            first = torch.cumsum(counts_t, 0) - counts_t
            sorted_e = flat[order]
            pos = starts[sorted_e] + torch.arange(flat.numel(), device=x.device) - first[sorted_e]
            n_rows = int(padded.sum())
            src = token.new_zeros(n_rows).index_copy_(0, pos, token)
            w_rows = w_sorted.new_zeros(n_rows).index_copy(0, pos, w_sorted)
            counts = padded.tolist()
        else:
            src, w_rows, counts = token, w_sorted, counts_t.tolist()
        return _RoutedExperts.apply(x, w_rows, self.gate_up_proj, self.down_proj, src, counts, dtype)


class MateConvMoE(nn.Module):
    """DeepSeek-style MoE: always-on shared experts + top-k of fine-grained routed experts.

    Scores are softmax or sigmoid of ``router(x)``. With auxiliary-loss-free balancing a per-expert bias
    (``e_score_correction_bias``) is added to the scores *for selection only*; the mixing weights are
    the unbiased scores (renormalised over the top-k when ``norm_topk_prob``). No token is dropped.
    """

    def __init__(self, config: MateConvConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.aux_free = config.aux_free_balancing
        self.bias_update_rate = config.bias_update_rate
        self.routed_scaling_factor = config.routed_scaling_factor
        H = config.hidden_size
        self.router = nn.Linear(H, self.n_experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts), persistent=True)
        self.experts = MateConvExperts(self.n_experts, H, config.moe_intermediate_size)
        self.shared_experts = (
            MateConvMLP(H, config.moe_intermediate_size * config.n_shared_experts) if config.n_shared_experts else None
        )
        self.last_counts = torch.zeros(self.n_experts)  # tokens per expert, last forward (for logging)
        self._pending_counts = torch.zeros(self.n_experts)  # accumulated since the last bias update

    def route(self, x: torch.Tensor):
        """x [N, H] -> (scores [N, E] fp32, topk_idx [N, k], topk_w [N, k] fp32)."""
        logits = F.linear(x, self.router.weight).float()
        scores = logits.softmax(-1) if self.scoring_func == "softmax" else logits.sigmoid()
        select = scores + self.e_score_correction_bias if self.aux_free else scores
        topk_idx = select.topk(self.top_k, dim=-1, sorted=False).indices
        topk_w = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_w = topk_w / (topk_w.sum(-1, keepdim=True) + 1e-20)
        return scores, topk_idx, topk_w * self.routed_scaling_factor

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, with_aux: bool = True):
        """x [B, T, H]; token_mask [B, T] (1 = real token) -> (y [B, T, H], aux_loss scalar or None)."""
        B, T, H = x.shape
        x = x.to(compute_dtype(x))  # cast once for the router, the routed and the shared experts (as nn.Linear does)
        flat = x.reshape(-1, H)
        scores, topk_idx, topk_w = self.route(flat)
        y = self.experts(flat, topk_idx, topk_w).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        with torch.no_grad():
            w = None if token_mask is None else token_mask.reshape(-1, 1).expand(-1, self.top_k).reshape(-1).float()
            counts = torch.bincount(topk_idx.reshape(-1), weights=w, minlength=self.n_experts).float().cpu()
            self.last_counts = counts
            if self.training:
                self._pending_counts = self._pending_counts + counts
        aux = self.balance_loss(scores.view(B, T, -1), topk_idx.view(B, T, -1), token_mask) if with_aux else None
        return y, aux

    def balance_loss(self, scores, topk_idx, token_mask=None) -> torch.Tensor:
        """alpha * sum_e f_e * P_e. Sequence-level (``seq_aux``): per sequence, then averaged over the batch.

        f_e = (tokens routed to e) / (L * k / E), P_e = mean over tokens of the (normalised) score of e.
        Uniform routing gives f_e = 1, P_e = 1/E and the minimum value ``alpha``.
        """
        if self.alpha == 0:
            return scores.new_zeros(())
        B, T, E = scores.shape
        if self.scoring_func == "sigmoid":
            scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        m = scores.new_ones(B, T) if token_mask is None else token_mask.to(scores.dtype)
        onehot = torch.zeros(B, T, E, device=scores.device, dtype=scores.dtype)
        onehot.scatter_add_(2, topk_idx, m[..., None].expand(-1, -1, self.top_k).contiguous())
        if self.seq_aux:
            n = m.sum(1).clamp_min(1)  # [B] real tokens per sequence
            f = onehot.sum(1) / (n[:, None] * self.top_k / E)
            p = (scores * m[..., None]).sum(1) / n[:, None]
            return self.alpha * (f * p).sum(-1).mean()
        n = m.sum().clamp_min(1)
        f = onehot.sum((0, 1)) / (n * self.top_k / E)
        p = (scores * m[..., None]).sum((0, 1)) / n
        return self.alpha * (f * p).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing: push the selection bias of overloaded experts down, underloaded up."""
        load = self._pending_counts.to(self.e_score_correction_bias.device)
        self._pending_counts = torch.zeros(self.n_experts)
        if not self.aux_free:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank applies the same update from the global load
        if load.sum() == 0:
            return
        err = load.mean() - load  # > 0: underloaded
        self.e_score_correction_bias.add_(self.bias_update_rate * err.sign().to(self.e_score_correction_bias))


class MateConvDecoderLayer(nn.Module):
    def __init__(self, config: MateConvConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MateConvRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MateConvAttention(config, layer_idx)
        self.post_attention_layernorm = MateConvRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MateConvMoE(config) if self.is_moe else MateConvMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, token_mask=None, with_aux=True):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, aux = self.mlp(h, token_mask, with_aux)
        else:
            h, aux = self.mlp(h), None
        return x + h, aux


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------


class MateConvPreTrainedModel(PreTrainedModel):
    config_class = MateConvConfig
    config: MateConvConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MateConvDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module):
        """Original init: N(0, 0.02); residual output projections N(0, 0.02 / sqrt(2 * layers))."""
        std = self.config.initializer_range
        res_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=res_std if getattr(module, "_residual_proj", False) else std)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MateConvRMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, MateConvExperts):
            _init.normal_(module.gate_up_proj, mean=0.0, std=std)
            _init.normal_(module.down_proj, mean=0.0, std=res_std)
        elif isinstance(module, MateConvMoE):
            _init.zeros_(module.e_score_correction_bias)


class MateConvModel(MateConvPreTrainedModel):
    def __init__(self, config: MateConvConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MateConvDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MateConvRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: take the causal fast path
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        attn_mask = None
        token_mask = None
        if attention_mask is not None:
            token_mask = attention_mask[:, -T:]
            right_padded = past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
            # right padding (training batches): real tokens never see the later pads under the causal mask,
            # so keep the fast causal kernel; pad positions only produce ignored (-100) outputs
            attn_mask = None if right_padded else build_attention_mask(attention_mask, T, past)
        elif past > 0 and T > 1:
            attn_mask = build_attention_mask(torch.ones(B, past + T, dtype=torch.bool, device=x.device), T, past)
        aux = []
        for layer in self.layers:
            x, a = layer(x, cos, sin, attn_mask, cache, token_mask, with_aux=cache is None)
            if a is not None:
                aux.append(a)
        aux_loss = torch.stack(aux).mean() if aux else x.new_zeros((), dtype=torch.float)
        return self.norm(x), aux_loss


def build_attention_mask(attention_mask: torch.Tensor, q_len: int, past: int) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, q_len, past + q_len]: causal AND key is a real token.

    A query always sees itself, so rows of padding queries are never empty (no NaN); their outputs
    are ignored by the loss (-100) and by generation.
    """
    kv_len = past + q_len
    key_ok = attention_mask[:, -kv_len:].bool() if attention_mask.shape[1] >= kv_len else torch.nn.functional.pad(
        attention_mask.bool(), (kv_len - attention_mask.shape[1], 0), value=True
    )
    qpos = torch.arange(past, kv_len, device=attention_mask.device)[:, None]
    kpos = torch.arange(kv_len, device=attention_mask.device)[None, :]
    mask = (kpos <= qpos)[None] & key_ok[:, None, :]
    mask |= (kpos == qpos)[None]
    return mask[:, None]


class MateConvForCausalLM(MateConvPreTrainedModel, GenerationMixin):
    """Causal LM head over ``MateConvModel``; see the module docstring for the layout."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MateConvConfig):
        super().__init__(config)
        self.model = MateConvModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache=None,
        return_dict: bool | None = None,
        targets: torch.LongTensor | None = None,
        **kwargs,
    ) -> MateConvCausalLMOutput:
        """HF semantics: ``labels`` are shifted inside (-100 = ignored); ``out.loss`` is the CE loss only,
        ``out.aux_loss`` the MoE balance loss (alpha applied; 0 for dense and when decoding with a cache).

        ``targets`` (the trainer's path): *pre-shifted* targets ``[B, T]`` (``IGNORE_INDEX`` = no loss) instead of
        ``labels``; then ``out.nll_sum`` is the NLL summed over the target tokens (fp32) and ``out.nll_count``
        their number (``model.losses.nll_sum``'s pair), and ``out.loss`` stays None. When gradients are being
        recorded, the LM head and the cross-entropy run fused and chunked over rows
        (``model.losses.linear_nll_sum``: same math, no [B, T, V] logits; ``out.logits`` is None). Otherwise
        the plain path runs (``logits -> nll_sum``, ``out.logits`` returned): under ``torch.no_grad`` (eval),
        when the head's weight is a DeepSpeed ZeRO-3 partitioned parameter (``ds_id``: only the module's own
        forward gathers it), while ``torch.compile`` traces the model (the compiler fuses the plain path
        itself), and with ``logits_to_keep``.
        """
        if targets is not None and labels is not None:
            raise ValueError("give labels (shifted inside) or targets (pre-shifted), not both")
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None and not self.training:
            from transformers import DynamicCache

            cache = DynamicCache()
        h, aux_loss = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if targets is not None:
            weight = self.lm_head.weight
            fused = (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad) and not logits_to_keep
                     and not hasattr(weight, "ds_id") and not torch.compiler.is_compiling())
            if fused:
                total, count = linear_nll_sum(h, weight, targets)
                return MateConvCausalLMOutput(aux_loss=aux_loss, cache=cache, nll_sum=total, nll_count=count)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        if targets is not None:
            total, count = nll_sum(logits, targets)
            return MateConvCausalLMOutput(logits=logits, aux_loss=aux_loss, cache=cache, nll_sum=total,
                                          nll_count=count)
        loss = None
        if labels is not None:
            # shift the labels, not the logits (no copy of the [B, T, V] tensor)
            total, count = nll_sum(logits, shift_labels(labels))
            loss = total / count
        return MateConvCausalLMOutput(loss=loss, logits=logits, aux_loss=aux_loss, cache=cache)

    def sequence_nll(self, input_ids, attention_mask, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.losses.sequence_nll`` of this batch (NLL summed per sequence ``[B]``, fp32, and the number of
        targets ``[B]``) with the LM head run only on the positions that have a target: in multiple-choice
        options and answers after a prompt most positions have none (evaluation; see
        ``model.losses.sequence_nll_of``)."""
        h, _ = self.model(input_ids, attention_mask)
        rows = targets != IGNORE_INDEX
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        nll[rows] = token_nll(self.lm_head(h[rows]), targets[rows])
        return nll.sum(-1), rows.sum(-1)

    # ---- MoE helpers used by the trainer / evaluation ----
    def moe_layers(self) -> list[MateConvMoE]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def expert_load(self) -> torch.Tensor:
        """Float tensor [n_moe_layers, n_routed_experts]: tokens per expert in the last forward (empty if dense)."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.last_counts.float() for m in layers])

    def reset_routing_counts(self) -> None:
        """Forget the expert loads gathered since the last bias update (e.g. after forwards that were not
        training steps)."""
        for m in self.moe_layers():
            m._pending_counts = torch.zeros(m.n_experts)

    def update_router_bias(self) -> None:
        """Call after each optimizer step: aux-loss-free bias update (no-op unless ``aux_free_balancing``)."""
        for m in self.moe_layers():
            m.update_bias()

    def num_parameters_report(self, seq_len: int | None = None) -> dict:
        from .presets import parameter_report

        return parameter_report(self.config, seq_len=seq_len)
