"""Named configurations and the parameter / FLOPs report.

``python -m model.presets`` prints total and active (per token) parameters of every preset.
"""

from __future__ import annotations

import json
import os

from .configuration_mateconv import MateConvConfig

_BASE = dict(vocab_size=6400, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True)

PRESETS: dict[str, dict] = {
    # the original MateConv-0.02B: 26,878,464 parameters
    "mateconv-0.02b": dict(_BASE, hidden_size=512, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=8, intermediate_size=1408),
    # the original MoE: 4 routed experts (top-2) + 1 shared, each as wide as the dense FFN
    "mateconv-moe-0.1b": dict(_BASE, hidden_size=512, num_hidden_layers=8, num_attention_heads=16,
                              num_key_value_heads=8, intermediate_size=1408, use_moe=True,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                              moe_intermediate_size=1408),
    # compute-matched to mateconv-0.02b: fine-grained experts, 1 shared + top-3 of 16, width 1408/4
    "mateconv-moe-0.02b-matched": dict(_BASE, hidden_size=512, num_hidden_layers=8, num_attention_heads=16,
                                       num_key_value_heads=8, intermediate_size=1408, use_moe=True,
                                       n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1,
                                       moe_intermediate_size=352),
    # CPU demo pair (embedded poetry corpus, 2 cores, minutes), compute-matched to each other
    "mateconv-tiny": dict(_BASE, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                          num_key_value_heads=2, intermediate_size=512),
    "mateconv-moe-tiny": dict(_BASE, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                              num_key_value_heads=2, intermediate_size=512, use_moe=True,
                              n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                              moe_intermediate_size=128),
}


def get_config(name_or_path, **overrides) -> MateConvConfig:
    """A preset name, a config JSON file, or a checkpoint directory (with ``config.json``) -> config."""
    if isinstance(name_or_path, MateConvConfig):
        cfg = MateConvConfig(**{**name_or_path.to_dict(), **overrides})
        return cfg
    name = str(name_or_path)
    if name in PRESETS:
        return MateConvConfig(**{**PRESETS[name], **overrides})
    if os.path.isdir(name):
        name = os.path.join(name, "config.json")
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            d = json.load(f)
        for k in ("model_type", "architectures", "auto_map", "transformers_version"):
            d.pop(k, None)
        return MateConvConfig(**{**d, **overrides})
    raise ValueError(f"unknown preset or path {name_or_path!r}; presets: {', '.join(PRESETS)}")


def parameter_report(config: MateConvConfig, seq_len: int | None = None) -> dict:
    """Total and active-per-token parameters, and training FLOPs per token.

    ``flops_per_token = 6 * matmul_params_active + 6 * layers * seq_len * hidden`` (forward + backward;
    the attention term counts QK^T and AV over the causal half of a ``seq_len`` window). Embedding
    lookups are not matmuls; the (tied) LM head is.
    """
    c = config
    H, L, D = c.hidden_size, c.num_hidden_layers, c.head_dim
    attn = H * (c.num_attention_heads + 2 * c.num_key_value_heads) * D + c.num_attention_heads * D * H
    norms = 2 * H
    dense_ffn = 3 * H * c.intermediate_size
    expert = 3 * H * c.moe_intermediate_size
    total = active = 0
    for i in range(L):
        total += attn + norms
        active += attn + norms
        if c.is_moe_layer(i):
            router = H * c.n_routed_experts
            total += router + expert * (c.n_routed_experts + c.n_shared_experts)
            active += router + expert * (c.num_experts_per_tok + c.n_shared_experts)
        else:
            total += dense_ffn
            active += dense_ffn
    emb = c.vocab_size * H
    head = 0 if c.tie_word_embeddings else emb
    total += emb + head + H
    active += emb + head + H
    matmul_active = active - emb - head + emb - norms * L - H  # tied or not, the LM head matmul is vocab x H
    seq_len = seq_len or c.max_position_embeddings
    flops = 6 * matmul_active + 6 * L * seq_len * H
    return {
        "total_params": total,
        "active_params": active,
        "non_embedding_active_params": active - emb - head,
        "flops_per_token": flops,
        "seq_len": seq_len,
    }


def main() -> None:
    print(f"{'preset':28s} {'total':>14s} {'active/token':>14s} {'FLOPs/token@512':>16s}")
    for name in PRESETS:
        r = parameter_report(get_config(name), seq_len=512)
        print(f"{name:28s} {r['total_params']:>14,d} {r['active_params']:>14,d} {r['flops_per_token']:>16,d}")


if __name__ == "__main__":
    main()
