"""Model core: presets and parameter counts, forward/loss semantics, masks, RoPE length, save/load."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import MateConvConfig, MateConvForCausalLM, get_config, parameter_report

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)
SMALL_MOE = dict(SMALL, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                 moe_intermediate_size=32)


def count_params(cfg):
    with torch.device("meta"):
        m = MateConvForCausalLM(cfg)
    return sum(p.numel() for p in m.parameters())


def test_preset_parameter_counts():
    dense = get_config("mateconv-0.02b")
    assert count_params(dense) == 26_878_464 == parameter_report(dense)["total_params"]
    moe = get_config("mateconv-moe-0.1b")
    r = parameter_report(moe)
    assert count_params(moe) == 96_100_864 == r["total_params"]
    assert abs(r["active_params"] - 61.5e6) < 0.1e6
    matched = parameter_report(get_config("mateconv-moe-0.02b-matched"))
    assert matched["total_params"] == count_params(get_config("mateconv-moe-0.02b-matched"))
    assert abs(matched["active_params"] / 26_878_464 - 1) < 0.05
    assert matched["total_params"] > 2 * matched["active_params"]  # really sparse
    tiny, moe_tiny = (parameter_report(get_config(n)) for n in ("mateconv-tiny", "mateconv-moe-tiny"))
    assert abs(moe_tiny["active_params"] / tiny["active_params"] - 1) < 0.05
    assert abs(moe_tiny["flops_per_token"] / tiny["flops_per_token"] - 1) < 0.05
    assert count_params(get_config("mateconv-moe-tiny")) == moe_tiny["total_params"]


def test_use_moe_alone_gives_original_layout():
    c = MateConvConfig(use_moe=True)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (4, 2, 1)
    assert c.scoring_func == "softmax" and c.norm_topk_prob and c.moe_intermediate_size == c.intermediate_size
    assert (c.vocab_size, c.bos_token_id, c.eos_token_id, c.pad_token_id) == (6400, 1, 2, 3)
    assert MateConvConfig().tie_word_embeddings


def test_init_matches_original_scheme():
    torch.manual_seed(0)
    m = MateConvForCausalLM(get_config("mateconv-0.02b"))
    sd = dict(m.named_parameters())
    assert abs(sd["model.embed_tokens.weight"].std().item() - 0.02) < 1e-3
    assert abs(sd["model.layers.0.self_attn.qkv_proj.weight"].std().item() - 0.02) < 1e-3
    res = 0.02 / (2 * 8) ** 0.5
    assert abs(sd["model.layers.3.self_attn.o_proj.weight"].std().item() - res) < 3e-4
    assert abs(sd["model.layers.3.mlp.down_proj.weight"].std().item() - res) < 3e-4
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    assert not any(n.endswith("bias") for n in sd)


@pytest.mark.parametrize("cfg", [SMALL, SMALL_MOE])
def test_loss_is_shifted_cross_entropy_with_ignore_index(cfg):
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**cfg)).eval()
    x = torch.randint(0, 256, (2, 17))
    labels = x.clone()
    labels[0, :5] = -100
    out = m(x, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert out.aux_loss.shape == ()
    if cfg is SMALL:
        assert out.aux_loss.item() == 0
    else:
        assert out.aux_loss.item() > 0


@pytest.mark.parametrize("cfg", [SMALL, SMALL_MOE])
def test_gradients_finite_and_reach_every_parameter(cfg):
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**cfg)).train()
    x = torch.randint(0, 256, (4, 32))
    out = m(x, labels=x)
    (out.loss + out.aux_loss).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_right_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**SMALL_MOE)).eval()
    x = torch.randint(4, 256, (1, 10))
    padded = torch.cat([x, torch.full((1, 6), 3)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], 1).long()
    a = m(x).logits
    b = m(padded, attention_mask=mask).logits[:, :10]
    assert torch.allclose(a, b, atol=1e-5)
    assert m.expert_load().sum().item() == 10 * 2 * 2  # padded tokens are not counted (2 layers, top-2)


def test_left_padding_positions_count_real_tokens():
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**SMALL)).eval()
    x = torch.randint(4, 256, (1, 10))
    padded = torch.cat([torch.full((1, 5), 3), x], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], 1).long()
    assert torch.allclose(m(x).logits, m(padded, attention_mask=mask).logits[:, 5:], atol=1e-5)


def test_rope_has_no_fixed_table_and_matches_prefix():
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**dict(SMALL, max_position_embeddings=2048))).eval()
    x = torch.randint(0, 256, (1, 1100))  # beyond the original 512-position table
    full = m(x).logits
    assert torch.isfinite(full).all()
    assert torch.allclose(full[:, :300], m(x[:, :300]).logits, atol=1e-4)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**SMALL_MOE)).train()
    x = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, labels=x)
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_get_config_accepts_preset_json_and_checkpoint_dir(tmp_path):
    c = get_config("mateconv-moe-tiny")
    m = MateConvForCausalLM(c)
    m.save_pretrained(tmp_path / "ck")
    loaded = get_config(tmp_path / "ck")
    assert loaded.use_moe and loaded.n_routed_experts == c.n_routed_experts and loaded.hidden_size == c.hidden_size
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 1}))
    assert get_config(tmp_path / "c.json").hidden_size == 96
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("no-such-preset")


@pytest.mark.parametrize("cfg", [SMALL, dict(SMALL_MOE, tie_word_embeddings=False)])
def test_save_load_round_trip_is_exact(tmp_path, cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**cfg)).eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_mateconv.py").exists()
    x = torch.randint(0, 256, (2, 12))
    ref = m(x).logits
    for loaded in (MateConvForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded).__name__ == "MateConvForCausalLM"
        assert torch.equal(loaded.eval()(x).logits, ref)
        for (n, p), (n2, p2) in zip(m.state_dict().items(), loaded.state_dict().items()):
            assert n == n2 and torch.equal(p, p2)


def test_trust_remote_code_load_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**SMALL_MOE)).eval()
    ck = tmp_path / "ck"
    m.save_pretrained(ck)
    x = torch.randint(0, 256, (1, 9))
    torch.save({"x": x, "logits": m(x).logits.detach()}, tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ck)!r}, trust_remote_code=True).eval()\n"
        "assert 'model' not in sys.modules, 'the repo package was imported'\n"
        f"r = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "assert torch.equal(m(r['x']).logits, r['logits'])\n"
        "print('OK', type(m).__module__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK transformers_modules" in res.stdout


def test_right_padded_batch_matches_unpadded_rows():
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**SMALL)).eval()
    a, b = torch.randint(4, 256, (1, 12)), torch.randint(4, 256, (1, 7))
    batch = torch.full((2, 12), 3)
    batch[0], batch[1, :7] = a, b
    mask = (torch.arange(12)[None] < torch.tensor([[12], [7]])).long()
    out = m(batch, attention_mask=mask).logits
    assert torch.allclose(out[0], m(a).logits[0], atol=1e-5)
    assert torch.allclose(out[1, :7], m(b).logits[0], atol=1e-5)
    assert MateConvConfig(**SMALL, head_dim=16).head_dim == 16
    with pytest.raises(ValueError, match="head_dim"):
        MateConvConfig(**SMALL, head_dim=8)
