"""DPO loss, log-probabilities, KL and live-vs-precomputed reference, with a real tiny MateConv model and a
real tokenizer."""

import json

import pytest
import torch
import torch.nn.functional as F

from dataset.collate import preference_collate
from dataset.datasets import PreferenceDataset, pad_token_id
from model import MateConvForCausalLM, get_config
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE, load_tokenizer
from trainer.dpo import (
    TIE_TOLERANCE,
    IndexedPairs,
    answer_logps,
    dpo_batch,
    dpo_loss,
    pair_metrics,
    precompute_reference,
    reference_topk,
    token_kl,
)

TOKENIZER = ORIGINAL_TOKENIZER_FIXTURE

PAIRS = [
    {"q": "床前明月光的下一句是什么？", "history": [], "pos": "疑是地上霜。", "neg": "我不知道，也许是太阳出来了吧。"},
    {"q": "《静夜思》的作者是谁？", "history": [], "pos": "李白。", "neg": "杜甫写的，在宋朝。"},
    {"q": "白日依山尽的下一句？", "history": [], "pos": "黄河入海流。", "neg": "长江向东流去，一去不回头。"},
    {"q": "春眠不觉晓的下一句？", "history": [["你好", "你好！"]], "pos": "处处闻啼鸟。", "neg": "夜里睡不着。"},
    {"q": "举头望明月的下一句？", "history": [], "pos": "低头思故乡。", "neg": "抬头看太阳。"},
]


def trl_sigmoid_dpo(pc, pr, rc, rr, beta):
    """TRL's sigmoid DPO loss and rewards, written out independently."""
    pi_logratios = pc - pr
    ref_logratios = rc - rr
    logits = pi_logratios - ref_logratios
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * (pc - rc), beta * (pr - rr)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def pairs_ds(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), encoding="utf-8")
    return PreferenceDataset(path, tok, 64)


def tiny_model(moe: bool, seed: int):
    torch.manual_seed(seed)
    cfg = get_config("mateconv-moe-tiny" if moe else "mateconv-tiny", hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32)
    return MateConvForCausalLM(cfg).eval()


def test_dpo_loss_matches_trl_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(7, generator=g) for _ in range(4))
    beta = 0.2
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    want, wc, wr = trl_sigmoid_dpo(pc, pr, rc, rr, beta)
    torch.testing.assert_close(out.losses, want)
    torch.testing.assert_close(out.dpo_losses, want)
    torch.testing.assert_close(out.chosen_rewards, wc)
    torch.testing.assert_close(out.rejected_rewards, wr)
    # with the KL and SFT terms: added with their coefficients, the DPO part unchanged
    kl, nll = torch.rand(7, generator=g), torch.rand(7, generator=g)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, kl=kl, kl_coef=0.05, sft_nll=nll, sft_coef=0.3)
    torch.testing.assert_close(out.losses, want + 0.05 * kl + 0.3 * nll)
    torch.testing.assert_close(out.dpo_losses, want)
    # length normalisation: the same formula on per-token means
    lc, lr = torch.randint(1, 30, (7,), generator=g), torch.randint(1, 30, (7,), generator=g)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, length_norm=True, chosen_lengths=lc, rejected_lengths=lr)
    want_n, _, _ = trl_sigmoid_dpo(pc / lc, pr / lr, rc / lc, rr / lr, beta)
    torch.testing.assert_close(out.losses, want_n)
    # TRL metric names and meanings (sums over pairs)
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    m = pair_metrics(out, pc, pr)
    margin = wc - wr
    want_acc = torch.where(margin.abs() <= TIE_TOLERANCE, 0.5, (margin > 0).float()).sum()
    torch.testing.assert_close(m["rewards/accuracies"], want_acc)
    torch.testing.assert_close(m["rewards/margins"], (wc - wr).sum())
    torch.testing.assert_close(m["rewards/chosen"], wc.sum())
    torch.testing.assert_close(m["logps/rejected"], pr.sum())
    # the reference is a constant: no gradient reaches it
    rc_g = rc.clone().requires_grad_()
    pc_g = pc.clone().requires_grad_()
    dpo_loss(pc_g, pr, rc_g, rr, beta=beta).losses.sum().backward()
    assert rc_g.grad is None and pc_g.grad is not None and (pc_g.grad < 0).all()


def test_kl_is_policy_first_and_topk_bounds_it():
    g = torch.Generator().manual_seed(1)
    a, b = 3 * torch.randn(5, 40, generator=g), 3 * torch.randn(5, 40, generator=g)
    p, q = a.softmax(-1), b.softmax(-1)
    forward = (p * (p.log() - q.log())).sum(-1)  # KL(policy ‖ reference)
    reverse = (q * (q.log() - p.log())).sum(-1)
    kl = token_kl(a, b)
    torch.testing.assert_close(kl, forward)
    assert not torch.allclose(kl, reverse, atol=1e-2)
    torch.testing.assert_close(token_kl(a, topk=reference_topk(b, 40)), forward, atol=1e-5, rtol=1e-5)
    for k in (1, 5, 20):
        coarse = token_kl(a, topk=reference_topk(b, k))
        assert (coarse >= -1e-6).all() and (coarse <= forward + 1e-5).all()
    assert token_kl(a, a).abs().max() < 1e-6


@pytest.mark.parametrize("moe", [False, True])
def test_answer_logps_are_sums_over_answer_tokens(pairs_ds, moe):
    model = tiny_model(moe, 0)
    batch = preference_collate(pad_token_id(pairs_ds.encoder.tok))([pairs_ds[i] for i in range(3)])
    with torch.no_grad():
        logits = model(batch["rejected_input_ids"], attention_mask=batch["rejected_attention_mask"]).logits
    sums, n = answer_logps(logits, batch["rejected_targets"])
    for b in range(3):
        item = pairs_ds[b]
        with torch.no_grad():  # each sequence alone, unpadded
            lp = model(item["rejected_input_ids"][None]).logits[0].log_softmax(-1)
        want = sum(float(lp[t, y]) for t, y in enumerate(item["rejected_targets"].tolist()) if y != -100)
        assert abs(float(sums[b]) - want) < 1e-3
        assert int(n[b]) == int((item["rejected_targets"] != -100).sum()) > 0


@pytest.mark.parametrize("moe", [False, True])
def test_precomputed_and_live_reference_give_identical_losses(pairs_ds, moe):
    policy, ref = tiny_model(moe, 0), tiny_model(moe, 1)  # different weights: non-zero rewards and KL
    data = IndexedPairs(pairs_ds, 0)
    collate = preference_collate(pad_token_id(pairs_ds.encoder.tok))
    store = precompute_reference(ref, data, collate, batch_size=2, device="cpu", topk=16)
    batch = collate([data[i] for i in (4, 0, 2)])  # another batch composition and order than the precompute
    lookup = store.lookup(batch["ref_key"][:, 1], "cpu")
    for kw in (dict(kl_coef=0.0), dict(kl_coef=0.05), dict(kl_coef=0.05, kl_topk=16),
               dict(kl_coef=0.1, sft_coef=0.5, length_norm=True, beta=2.0)):
        kw = {"beta": 0.2, **kw}
        live, m_live, _ = dpo_batch(policy, batch, ref_model=ref, **kw)
        # the exact KL keeps the reference model (on chosen answers only); otherwise it is not needed
        keep = ref if kw["kl_coef"] > 0 and not kw.get("kl_topk") else None
        pre, m_pre, _ = dpo_batch(policy, batch, ref=lookup, ref_model=keep, **kw)
        torch.testing.assert_close(pre.losses, live.losses, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pre.chosen_rewards, live.chosen_rewards, atol=1e-5, rtol=1e-5)
        assert live.chosen_rewards.abs().max() > 1e-3
        if kw["kl_coef"]:
            assert float(m_live["kl"]) > 1e-3
            torch.testing.assert_close(m_pre["kl"], m_live["kl"], atol=1e-5, rtol=1e-5)
            # independent check: per-pair mean over chosen-answer tokens of the full KL(policy ‖ ref)
            if not kw.get("kl_topk"):
                tgt = batch["chosen_targets"]
                with torch.no_grad():
                    lp = policy(batch["chosen_input_ids"]).logits.log_softmax(-1)
                    lq = ref(batch["chosen_input_ids"]).logits.log_softmax(-1)
                tok_kl = (lp.exp() * (lp - lq)).sum(-1)
                want = ((tok_kl * (tgt != -100)).sum(-1) / (tgt != -100).sum(-1)).sum()
                torch.testing.assert_close(m_live["kl"], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kl_coef"):
        dpo_batch(policy, batch, ref=lookup, ref_model=None, beta=0.2, kl_coef=0.05)


def test_identical_policy_and_reference_give_log2_and_zero_rewards(pairs_ds):
    model = tiny_model(False, 0)
    collate = preference_collate(pad_token_id(pairs_ds.encoder.tok))
    batch = collate([IndexedPairs(pairs_ds, 0)[i] for i in range(len(pairs_ds))])
    res, m, _ = dpo_batch(model, batch, ref_model=model, beta=0.2, kl_coef=0.05)
    torch.testing.assert_close(res.losses, torch.full((len(pairs_ds),), float(torch.log(torch.tensor(2.0)))),
                               atol=1e-5, rtol=0)
    # every pair ties: counted 1/2 each (chance level), whatever the rounding noise of the margins
    assert float(m["rewards/accuracies"]) == float(m["reward_accuracy"]) == 0.5 * len(pairs_ds)
    assert float(m["rewards/ties"]) == len(pairs_ds)
    assert abs(float(m["kl"])) < 1e-5


def test_reward_accuracy_counts_ties_as_half_and_is_stable_under_rounding_noise():
    """A margin within TIE_TOLERANCE of 0 is a tie (1/2) whichever side rounding puts it on."""
    pc = torch.tensor([-10.0, -10.0, -10.0, -10.0, -10.0])
    pr = torch.tensor([-12.0, -8.0, -10.0, -10.0, -10.0])
    rc = torch.full((5,), -10.0)
    rr = torch.full((5,), -10.0)
    beta = 0.2
    noise = torch.tensor([0.0, 0.0, 0.0, 3e-5 / beta, -3e-5 / beta])  # rounding-size margins, both signs
    m = pair_metrics(dpo_loss(pc + noise, pr, rc, rr, beta=beta), pc + noise, pr)
    assert float(m["rewards/accuracies"]) == 1.0 + 0.0 + 0.5 * 3
    assert float(m["rewards/ties"]) == 3.0
    flipped = pair_metrics(dpo_loss(pc - noise, pr, rc, rr, beta=beta), pc - noise, pr)
    assert float(flipped["rewards/accuracies"]) == float(m["rewards/accuracies"])
    # a real margin just above the tolerance is a decision
    m2 = pair_metrics(dpo_loss(pc[:1] + 2 * TIE_TOLERANCE / beta, pr[:1] * 0 - 10, rc[:1], rr[:1], beta=beta),
                      pc[:1], pr[:1])
    assert float(m2["rewards/accuracies"]) == 1.0 and float(m2["rewards/ties"]) == 0.0
