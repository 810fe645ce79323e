"""MoE layer: dispatch equals a per-token reference, balance loss, aux-loss-free bias balancing, load logging."""

import pytest
import torch
import torch.nn.functional as F

from model import MateConvConfig, MateConvForCausalLM
from model.modeling_mateconv import MateConvMoE

BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, use_moe=True, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=32)


def make_moe(**kw):
    torch.manual_seed(0)
    cfg = MateConvConfig(**{**BASE, **kw})
    m = MateConvForCausalLM(cfg)  # initialises the layer with the model's init
    return m.model.layers[0].mlp, cfg


def reference_moe(layer, x):
    """Per-token loop: sum_j w_j * expert_j(x) + shared(x) (slow, obviously correct)."""
    flat = x.reshape(-1, x.shape[-1])
    _, idx, w = layer.route(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            g, u = F.linear(flat[t], layer.experts.gate_up_proj[e]).chunk(2)
            out[t] += w[t, j] * F.linear(F.silu(g) * u, layer.experts.down_proj[e])
    out = out.view_as(x)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x)
    return out


@pytest.mark.parametrize("kw", [{}, dict(scoring_func="sigmoid"), dict(norm_topk_prob=False, n_shared_experts=0),
                                dict(num_experts_per_tok=1), dict(aux_free_balancing=True)])
def test_grouped_dispatch_equals_per_token_reference(kw):
    layer, _ = make_moe(**kw)
    with torch.no_grad():
        layer.e_score_correction_bias.normal_(0, 0.05)
        x = torch.randn(3, 7, 64)
        y, _ = layer(x)
        assert torch.allclose(y, reference_moe(layer, x), atol=1e-5)
        assert layer.last_counts.sum().item() == 3 * 7 * layer.top_k  # no token dropped


def test_routing_weights_renormalised_and_bias_only_selects():
    layer, _ = make_moe(aux_free_balancing=True)
    x = torch.randn(50, 64)
    scores, idx, w = layer.route(x)
    assert torch.allclose(w.sum(-1), torch.ones(50), atol=1e-6)
    with torch.no_grad():
        layer.e_score_correction_bias.zero_()
        layer.e_score_correction_bias[5] = 10.0  # forces expert 5 into every top-k ...
    scores2, idx2, w2 = layer.route(x)
    assert (idx2 == 5).any(-1).all()
    # ... but the mixing weight of expert 5 is still its unbiased (renormalised) score
    other = idx2[idx2 != 5].view(-1)
    s5, so = scores2[:, 5], scores2.gather(1, other[:, None]).squeeze(1)
    w5 = w2.gather(1, (idx2 == 5).float().argmax(-1, keepdim=True)).squeeze(1)
    assert torch.allclose(w5, s5 / (s5 + so), atol=1e-6)


def test_balance_loss_is_minimal_for_uniform_routing():
    layer, _ = make_moe()
    B, T, E, k = 2, 16, 8, 2
    uniform_scores = torch.full((B, T, E), 1.0 / E)
    balanced_idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], -1).expand(B, T, k)
    loss_uniform = layer.balance_loss(uniform_scores, balanced_idx)
    assert torch.allclose(loss_uniform, torch.tensor(layer.alpha))
    # any skew (in scores and/or in counts) costs more
    skew_scores = torch.softmax(torch.tensor([3.0] + [0.0] * (E - 1)), 0).expand(B, T, E)
    skew_idx = torch.tensor([0, 1]).expand(B, T, k)
    assert layer.balance_loss(skew_scores, skew_idx) > 3 * loss_uniform
    torch.manual_seed(1)
    for _ in range(20):
        s = torch.softmax(torch.randn(B, T, E) * 2, -1)
        idx = s.topk(k, -1).indices
        assert layer.balance_loss(s, idx) >= loss_uniform - 1e-6


def test_balance_loss_gradient_pushes_router_toward_balance():
    layer, _ = make_moe()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0  # expert 0 favoured where x[0] > 0
    x = torch.randn(4, 32, 64).abs()
    _, aux = layer(x)
    aux.backward()
    assert layer.router.weight.grad[0, 0] > 0  # gradient descent lowers the favoured expert's logit


def imbalance(counts):
    return (counts.max() / counts.mean()).item()


def test_aux_free_bias_reduces_imbalance_of_a_skewed_router():
    layer, _ = make_moe(aux_free_balancing=True, bias_update_rate=0.002, aux_loss_alpha=0.0)
    layer.train()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.02)
        layer.router.weight[0] += 0.05  # skew: expert 0 is in the top-2 of every token
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64) + 0.5
    history = []
    with torch.no_grad():
        for _ in range(150):  # forward, then the trainer's post-optimizer-step call
            layer(x)
            history.append(imbalance(layer.last_counts))
            layer.update_bias()
    late = sum(history[-20:]) / 20
    assert history[0] == 4.0  # expert 0 takes every token: max/mean = E / k
    assert late < 1.4, history[-20:]
    assert layer.e_score_correction_bias[0] < 0  # the overloaded expert is pushed down


def test_update_router_bias_is_noop_without_aux_free():
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**BASE)).train()
    x = torch.randint(0, 256, (2, 16))
    m(x)
    m.update_router_bias()
    assert all((layer.e_score_correction_bias == 0).all() for layer in m.moe_layers())


def test_expert_load_shapes_and_first_k_dense():
    torch.manual_seed(0)
    m = MateConvForCausalLM(MateConvConfig(**{**BASE, "num_hidden_layers": 3, "first_k_dense_replace": 1}))
    x = torch.randint(0, 256, (2, 16))
    m(x)
    load = m.expert_load()
    assert load.shape == (2, 8) and load.dtype == torch.float32
    assert torch.equal(load.sum(1), torch.full((2,), 2 * 16 * 2.0))
    dense = MateConvForCausalLM(MateConvConfig(**{**BASE, "use_moe": False}))
    dense(x)
    assert dense.expert_load().numel() == 0
    assert isinstance(m.model.layers[1].mlp, MateConvMoE) and not isinstance(m.model.layers[0].mlp, MateConvMoE)


def test_grouped_experts_backward_matches_autograd_reference():
    layer, _ = make_moe(n_routed_experts=6, num_experts_per_tok=3)
    layer.double()
    x = torch.randn(2, 9, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 9, 64, dtype=torch.float64)
    y, _ = layer(x)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    y_ref = reference_moe(layer, x)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *layer.parameters()])
    assert torch.allclose(y, y_ref, atol=1e-10)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-10)
    assert grads[-1].abs().sum() > 0  # shared expert (last params) and router get gradients too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_forward_backward_match_reference_under_autocast(dtype):
    """The grouped path (one autograd node, matmuls in the autocast dtype) against the per-token reference in
    float64: float32 to rounding, bfloat16 within bfloat16 tolerances (relative error of the whole tensor)."""
    layer, _ = make_moe(n_routed_experts=8, num_experts_per_tok=3)
    torch.manual_seed(1)
    x = torch.randn(4, 16, 64, requires_grad=True)
    g = torch.randn(4, 16, 64)
    params = list(layer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y, _ = layer(x)
    grads = torch.autograd.grad((y.float() * g).sum(), [x, *params])
    ref = {k: v.double() for k, v in layer.state_dict().items()}
    layer64, _ = make_moe(n_routed_experts=8, num_experts_per_tok=3)
    layer64.double().load_state_dict(ref)
    x64 = x.detach().double().requires_grad_()
    y_ref = reference_moe(layer64, x64)
    grads_ref = torch.autograd.grad((y_ref * g.double()).sum(), [x64, *layer64.parameters()])
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def rel(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))

    assert y.dtype == dtype and rel(y, y_ref) < tol  # the autocast dtype, as an nn.Linear (the dense MLP) returns
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        assert a.dtype == (x.dtype if name == "x" else torch.float32), name  # fp32 weight gradients
        assert rel(a, b) < tol, (name, rel(a, b))
