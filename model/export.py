"""Native transformers export / import.

    python -m model.export --src out/pretrain --dst out/pretrain-hf      # MateConv -> native
    python -m model.export --src out/pretrain-hf --dst out/back          # native -> MateConv

The direction is taken from ``config.json`` of ``--src``. A native checkpoint loads with
``AutoModelForCausalLM.from_pretrained(dst)`` without ``trust_remote_code`` (and so with llama.cpp,
vLLM, Ollama ...):

* dense            -> ``LlamaForCausalLM`` (q/k/v and gate/up are split out of our fused weights);
* softmax MoE      -> ``GraniteMoeSharedForCausalLM``: softmax top-k with renormalisation, an ungated
  shared SwiGLU (our shared experts concatenated), GQA, with the Granite multipliers set to neutral
  values (embedding 1, residual 1, logits 1, attention 1/sqrt(head_dim));
* sigmoid MoE      -> ``Glm4MoeForCausalLM`` (DeepSeek-V3-style router: sigmoid scores, selection-only
  bias = our aux-loss-free bias, optional renormalisation, routed scaling, first-k dense layers), with
  one expert group, no qk-norm, full-width RoPE and no MTP layers.

Options with no exact native twin are refused with a message (softmax without top-k renormalisation,
softmax with first-k dense layers / a non-zero aux-free bias / a routed scaling factor; sigmoid without
a shared expert).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import torch

from .configuration_mateconv import MateConvConfig
from .modeling_mateconv import MateConvForCausalLM

_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "generation_config.json")


class ExportError(ValueError):
    """The configuration has no exact native transformers twin."""


# ---------------------------------------------------------------------------------------------------------
# MateConv -> native
# ---------------------------------------------------------------------------------------------------------


def _common_native_kwargs(c: MateConvConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        hidden_act="silu",
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        initializer_range=c.initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
        attention_bias=False,
    )


def check_exportable(model_or_config) -> str:
    """Return the native architecture name for this model, or raise ``ExportError`` saying why not."""
    c = model_or_config.config if hasattr(model_or_config, "config") else model_or_config
    if c.n_moe_layers == 0:
        return "LlamaForCausalLM"
    problems = []
    if c.scoring_func == "sigmoid":
        # Glm4Moe: sigmoid scores + selection-only bias, optional renormalisation and scaling, first-k dense
        if c.n_shared_experts < 1:
            problems.append("n_shared_experts=0 with sigmoid scoring (Glm4Moe always has a shared expert)")
        if c.n_routed_experts < 2:
            problems.append("fewer than 2 routed experts (Glm4Moe's group scoring takes the top-2 of a group)")
        if problems:
            raise ExportError("cannot export this MoE exactly to Glm4MoeForCausalLM: " + "; ".join(problems))
        return "Glm4MoeForCausalLM"
    if not c.norm_topk_prob:
        problems.append("norm_topk_prob=False (GraniteMoeShared always renormalises the top-k weights)")
    if c.first_k_dense_replace:
        problems.append(f"first_k_dense_replace={c.first_k_dense_replace} (GraniteMoeShared has MoE in every layer)")
    if c.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={c.routed_scaling_factor} (no native equivalent with softmax)")
    if hasattr(model_or_config, "moe_layers"):
        for i, m in enumerate(model_or_config.moe_layers()):
            if m.aux_free and bool(m.e_score_correction_bias.abs().max() > 0):
                problems.append(f"MoE layer {i} has a non-zero aux-free selection bias (no native softmax equivalent)")
                break
    if problems:
        raise ExportError("cannot export this softmax MoE exactly to GraniteMoeSharedForCausalLM (use "
                          "scoring_func='sigmoid' for the Glm4Moe export): " + "; ".join(problems))
    return "GraniteMoeSharedForCausalLM"


def to_native(model: MateConvForCausalLM):
    """An equivalent native transformers model (``LlamaForCausalLM`` or ``GraniteMoeSharedForCausalLM``)."""
    c = model.config
    arch = check_exportable(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    H, nh, nkv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = H // nh
    out = {}
    for k, v in sd.items():
        if k.endswith("self_attn.qkv_proj.weight"):
            p = k[: -len("qkv_proj.weight")]
            q, kk, vv = v.split([nh * hd, nkv * hd, nkv * hd])
            out[p + "q_proj.weight"], out[p + "k_proj.weight"], out[p + "v_proj.weight"] = q, kk, vv
        elif arch != "GraniteMoeSharedForCausalLM" and k.endswith("gate_up_proj.weight"):
            p = k[: -len("gate_up_proj.weight")]  # dense MLP or Glm4Moe shared experts: split gate / up
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = v.chunk(2)
        elif arch == "Glm4MoeForCausalLM" and ".mlp." in k:
            if k.endswith("e_score_correction_bias") and not c.aux_free_balancing:
                v = torch.zeros_like(v)  # our selection ignores the bias when aux-free balancing is off
            out[k.replace("mlp.router.weight", "mlp.gate.weight").replace(
                "mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias")] = v
        elif arch == "GraniteMoeSharedForCausalLM" and ".mlp." in k:
            p, rest = k.split(".mlp.")
            if rest == "e_score_correction_bias":
                continue
            out[p + "." + {
                "router.weight": "block_sparse_moe.router.weight",
                "experts.gate_up_proj": "block_sparse_moe.experts.gate_up_proj",
                "experts.down_proj": "block_sparse_moe.experts.down_proj",
                "shared_experts.gate_up_proj.weight": "shared_mlp.input_linear.weight",
                "shared_experts.down_proj.weight": "shared_mlp.output_linear.weight",
            }[rest]] = v
        else:
            out[k] = v
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    if arch == "LlamaForCausalLM":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(intermediate_size=c.intermediate_size, mlp_bias=False, head_dim=hd,
                          **_common_native_kwargs(c))
        native = LlamaForCausalLM(cfg)
    elif arch == "Glm4MoeForCausalLM":
        from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

        kw = _common_native_kwargs(c)
        kw["rope_parameters"]["partial_rotary_factor"] = 1.0
        cfg = Glm4MoeConfig(
            intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
            n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
            n_shared_experts=c.n_shared_experts, routed_scaling_factor=c.routed_scaling_factor,
            n_group=1, topk_group=1, first_k_dense_replace=c.first_k_dense_replace,
            norm_topk_prob=c.norm_topk_prob, use_qk_norm=False, num_mtp_layers=0, head_dim=hd, **kw,
        )
        native = Glm4MoeForCausalLM(cfg)
    else:
        from transformers import GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM

        cfg = GraniteMoeSharedConfig(
            intermediate_size=c.moe_intermediate_size,
            shared_intermediate_size=c.moe_intermediate_size * c.n_shared_experts,
            num_local_experts=c.n_routed_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            router_aux_loss_coef=c.aux_loss_alpha,
            embedding_multiplier=1.0,
            logits_scaling=1.0,
            residual_multiplier=1.0,
            attention_multiplier=1.0 / math.sqrt(hd),
            **_common_native_kwargs(c),
        )
        native = GraniteMoeSharedForCausalLM(cfg)
    dtype = next(model.parameters()).dtype
    native.to(dtype)
    missing, unexpected = native.load_state_dict(out, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing={missing} unexpected={unexpected}")
    if c.tie_word_embeddings:
        native.tie_weights()
    return native.eval()


# ---------------------------------------------------------------------------------------------------------
# native -> MateConv
# ---------------------------------------------------------------------------------------------------------


def from_native(native) -> MateConvForCausalLM:
    """A MateConv model equal to a ``LlamaForCausalLM`` / ``GraniteMoeSharedForCausalLM`` we can represent."""
    nc = native.config
    mt = nc.model_type
    if mt not in ("llama", "granitemoeshared", "glm4_moe"):
        raise ExportError(f"cannot import model_type={mt!r}: only llama, granitemoeshared and glm4_moe")
    hd = nc.hidden_size // nc.num_attention_heads
    if getattr(nc, "head_dim", hd) != hd:
        raise ExportError("head_dim != hidden_size / num_attention_heads is not supported")
    if getattr(nc, "attention_bias", False) or getattr(nc, "mlp_bias", False):
        raise ExportError("biases are not supported")
    if nc.hidden_act != "silu":
        raise ExportError(f"hidden_act={nc.hidden_act!r} is not supported (SwiGLU only)")
    rope = getattr(nc, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(nc, "rope_theta", 1e4)}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError(f"rope {rope} is not supported (default RoPE over the full head only)")
    kw = dict(
        vocab_size=nc.vocab_size, hidden_size=nc.hidden_size, num_hidden_layers=nc.num_hidden_layers,
        num_attention_heads=nc.num_attention_heads, num_key_value_heads=nc.num_key_value_heads,
        max_position_embeddings=nc.max_position_embeddings, rope_theta=rope["rope_theta"],
        rms_norm_eps=nc.rms_norm_eps, tie_word_embeddings=bool(nc.tie_word_embeddings),
        bos_token_id=nc.bos_token_id, eos_token_id=nc.eos_token_id, pad_token_id=nc.pad_token_id,
    )
    if mt == "llama":
        cfg = MateConvConfig(intermediate_size=nc.intermediate_size, **kw)
    elif mt == "glm4_moe":
        if nc.use_qk_norm or nc.n_group != 1 or nc.topk_group != 1 or getattr(nc, "num_mtp_layers", 0):
            raise ExportError("Glm4Moe with qk-norm, expert groups or MTP layers has no MateConv equivalent")
        cfg = MateConvConfig(
            intermediate_size=nc.intermediate_size, use_moe=True, n_routed_experts=nc.n_routed_experts,
            num_experts_per_tok=nc.num_experts_per_tok, n_shared_experts=nc.n_shared_experts,
            moe_intermediate_size=nc.moe_intermediate_size, first_k_dense_replace=nc.first_k_dense_replace,
            scoring_func="sigmoid", norm_topk_prob=nc.norm_topk_prob, routed_scaling_factor=nc.routed_scaling_factor,
            aux_free_balancing=True, **kw,
        )
    else:
        neutral = (nc.embedding_multiplier == 1 and nc.logits_scaling == 1 and nc.residual_multiplier == 1
                   and math.isclose(nc.attention_multiplier, 1 / math.sqrt(hd), rel_tol=1e-6))
        if not neutral:
            raise ExportError("GraniteMoeShared multipliers are not neutral; no MateConv equivalent")
        shared = nc.shared_intermediate_size
        if shared % nc.intermediate_size:
            raise ExportError("shared_intermediate_size must be a multiple of the expert width")
        cfg = MateConvConfig(
            intermediate_size=nc.intermediate_size, use_moe=True, n_routed_experts=nc.num_local_experts,
            num_experts_per_tok=nc.num_experts_per_tok, n_shared_experts=shared // nc.intermediate_size,
            moe_intermediate_size=nc.intermediate_size, scoring_func="softmax", norm_topk_prob=True,
            aux_loss_alpha=nc.router_aux_loss_coef, **kw,
        )
    sd = native.state_dict()
    out = {}
    for k, v in sd.items():
        if "rotary_emb" in k:
            continue
        if k.endswith("self_attn.q_proj.weight"):
            p = k[: -len("q_proj.weight")]
            out[p + "qkv_proj.weight"] = torch.cat([v, sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
        elif k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "up_proj.weight")):
            continue
        elif k.endswith("gate_proj.weight"):  # dense MLP or Glm4Moe shared experts
            p = k[: -len("gate_proj.weight")]
            out[p + "gate_up_proj.weight"] = torch.cat([v, sd[p + "up_proj.weight"]])
        elif mt == "glm4_moe" and ".mlp." in k:
            out[k.replace("mlp.gate.weight", "mlp.router.weight").replace(
                "mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias")] = v
        elif ".block_sparse_moe." in k or ".shared_mlp." in k:
            p, rest = k.split(".", 3)[:3], k.split(".", 3)[3]
            p = ".".join(p)
            out[p + ".mlp." + {
                "block_sparse_moe.router.weight": "router.weight",
                "block_sparse_moe.experts.gate_up_proj": "experts.gate_up_proj",
                "block_sparse_moe.experts.down_proj": "experts.down_proj",
                "shared_mlp.input_linear.weight": "shared_experts.gate_up_proj.weight",
                "shared_mlp.output_linear.weight": "shared_experts.down_proj.weight",
            }[rest]] = v
        else:
            out[k] = v
    model = MateConvForCausalLM(cfg).to(next(native.parameters()).dtype)
    missing, unexpected = model.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("e_score_correction_bias")]
    if cfg.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing={missing} unexpected={unexpected}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


def _copy_side_files(src: str, dst: str) -> None:
    """Copy the tokenizer files (not weights, config, code, or a trainer's optimizer/RNG state) from src to dst."""
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name not in _TOKENIZER_FILES or not os.path.isfile(path):
            continue
        shutil.copy2(path, os.path.join(dst, name))


def convert(src: str, dst: str) -> str:
    """Convert the checkpoint directory ``src`` into ``dst``; returns the written architecture name."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    os.makedirs(dst, exist_ok=True)
    if model_type == "mateconv":
        model = MateConvForCausalLM.from_pretrained(src)
        native = to_native(model)
        native.save_pretrained(dst)
        arch = type(native).__name__
    else:
        from transformers import AutoModelForCausalLM

        from . import MateConvForCausalLM as _registered  # noqa: F401  (registers the Auto classes)

        native = AutoModelForCausalLM.from_pretrained(src)
        model = from_native(native)
        model.save_pretrained(dst)
        arch = type(model).__name__
    _copy_side_files(src, dst)
    return arch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="checkpoint directory or trainer run directory (MateConv, or native llama/granitemoeshared/glm4_moe)")
    ap.add_argument("--dst", required=True, help="output directory")
    args = ap.parse_args(argv)
    from .loading import resolve_model_dir

    try:  # a run directory or a pipeline run: its checkpoint (model.load's resolution)
        src = resolve_model_dir(args.src)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        arch = convert(src, args.dst)
    except ExportError as e:
        raise SystemExit(f"export refused: {e}") from None
    print(f"wrote {arch} checkpoint to {args.dst}")


if __name__ == "__main__":
    main()
