"""Native export: our logits equal transformers' own Llama / GraniteMoeShared / Glm4Moe implementations."""

import json

import pytest
import torch

from model import MateConvConfig, MateConvForCausalLM
from model.export import ExportError, check_exportable, convert, from_native, main, to_native

DENSE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128)
MOE = dict(DENSE, use_moe=True, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
           moe_intermediate_size=32)



def random_model(cfg, seed=0):
    """Random weights everywhere (norm gains too), so a mapping error cannot hide behind init values."""
    torch.manual_seed(seed)
    m = MateConvForCausalLM(MateConvConfig(**cfg)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.05)
    return m


CASES = [
    ("dense", DENSE, "LlamaForCausalLM"),
    ("dense-untied-theta", dict(DENSE, tie_word_embeddings=False, rope_theta=5e5, num_key_value_heads=4),
     "LlamaForCausalLM"),
    ("moe", MOE, "GraniteMoeSharedForCausalLM"),
    ("moe-top1-noshared-untied", dict(MOE, num_experts_per_tok=1, n_shared_experts=0, tie_word_embeddings=False),
     "GraniteMoeSharedForCausalLM"),
    ("moe-all-dense-layers", dict(MOE, first_k_dense_replace=3), "LlamaForCausalLM"),
    ("moe-sigmoid-auxfree", dict(MOE, scoring_func="sigmoid", aux_free_balancing=True), "Glm4MoeForCausalLM"),
    ("moe-sigmoid-dense1-unnorm-scaled", dict(MOE, scoring_func="sigmoid", first_k_dense_replace=1,
                                              norm_topk_prob=False, routed_scaling_factor=2.5,
                                              tie_word_embeddings=False), "Glm4MoeForCausalLM"),
]


@pytest.mark.parametrize("name,cfg,arch", CASES, ids=[c[0] for c in CASES])
def test_exported_logits_equal_native_implementation(name, cfg, arch):
    m = random_model(cfg)
    for layer in m.moe_layers():  # a trained aux-free bias (exported exactly where the native router has one)
        if layer.aux_free:
            layer.e_score_correction_bias.normal_(0.0, 0.1)
    native = to_native(m)
    assert type(native).__name__ == arch
    x = torch.randint(0, cfg["vocab_size"], (3, 50))
    with torch.no_grad():
        ours, theirs = m(x).logits, native(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.abs().max() > 1  # non-trivial logits
    back = from_native(native)
    with torch.no_grad():
        assert torch.equal(back(x).logits, ours) or (back(x).logits - ours).abs().max() <= 1e-6


def test_comparison_can_fail():
    """The equality check detects a wrong mapping (here: RoPE theta)."""
    m = random_model(DENSE)
    native = to_native(m)
    native.config.rope_parameters["rope_theta"] = 500.0
    from transformers import LlamaForCausalLM

    wrong = LlamaForCausalLM(native.config).eval()
    wrong.load_state_dict(native.state_dict())
    x = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert (m(x).logits - wrong(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("kw,msg", [
    (dict(scoring_func="sigmoid", n_shared_experts=0), "shared expert"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(first_k_dense_replace=1), "first_k_dense_replace"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
])
def test_options_without_native_twin_are_refused(kw, msg):
    m = MateConvForCausalLM(MateConvConfig(**{**MOE, **kw}))
    with pytest.raises(ExportError, match=msg):
        check_exportable(m)


def test_nonzero_aux_free_bias_is_refused():
    m = MateConvForCausalLM(MateConvConfig(**{**MOE, "aux_free_balancing": True}))
    assert check_exportable(m) == "GraniteMoeSharedForCausalLM"  # zero bias: still exact
    m.moe_layers()[0].e_score_correction_bias[1] = 0.1
    with pytest.raises(ExportError, match="bias"):
        to_native(m)


@pytest.mark.parametrize("cfg,arch", [(DENSE, "LlamaForCausalLM"), (MOE, "GraniteMoeSharedForCausalLM"),
                                      (dict(MOE, scoring_func="sigmoid", aux_free_balancing=True),
                                       "Glm4MoeForCausalLM")])
def test_cli_export_loads_without_trust_remote_code_and_imports_back(tmp_path, cfg, arch):
    from transformers import AutoModelForCausalLM

    m = random_model(cfg)
    m.save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    main(["--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "native")])
    assert not list((tmp_path / "native").glob("*.py"))  # no custom code shipped
    assert (tmp_path / "native" / "tokenizer_config.json").exists()
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()  # no trust_remote_code
    assert type(native).__name__ == arch
    x = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        ref = m(x).logits
        assert (native(x).logits - ref).abs().max() <= 1e-4
    assert convert(str(tmp_path / "native"), str(tmp_path / "back")) == "MateConvForCausalLM"
    back = MateConvForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max() <= 1e-6


def test_cli_refusal_is_a_clear_message(tmp_path):
    MateConvForCausalLM(MateConvConfig(**{**MOE, "norm_topk_prob": False})).save_pretrained(tmp_path / "s")
    with pytest.raises(SystemExit, match="export refused: .*norm_topk_prob"):
        main(["--src", str(tmp_path / "s"), "--dst", str(tmp_path / "d")])
