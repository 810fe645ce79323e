"""The fused, chunked LM head + cross-entropy (``model.losses.linear_nll_sum``): same loss and gradients as the
plain logits path (``nll_sum(F.linear(h, W), targets)``), in fp32 and under bf16 autocast, alone, through the
model's ``targets=`` forward (dense and MoE) and through the trainer's loss; a short real training run learns."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from model import MateConvForCausalLM, get_config
from model.losses import IGNORE_INDEX, linear_nll_sum, nll_sum, shift_labels

N, H, V = 1000, 48, 300


def _inputs(seed=0, n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=torch.float32).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[::7] = IGNORE_INDEX          # scattered ignored rows
    t[300:700] = IGNORE_INDEX      # a run of ignored rows longer than a chunk (whole chunks without a target)
    return h, w, t


def _loss_and_grads(fn, h, w, t, scale=1.0, autocast=False):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, count = fn(h, w, t)
    (total * scale).backward()
    return total.detach(), count, h.grad, w.grad


def _reference(h, w, t):
    return nll_sum(F.linear(h, w), t)


@pytest.mark.parametrize("chunk", [128, 333, 1000, 4096])  # 333 and 128 do not divide N (nor its 514 targets)
def test_fp32_matches_cross_entropy(chunk):
    h, w, t = _inputs()
    ref = _loss_and_grads(_reference, h, w, t, scale=2.5)
    got = _loss_and_grads(lambda a, b, c: linear_nll_sum(a, b, c, chunk_rows=chunk), h, w, t, scale=2.5)
    assert got[0].dtype == torch.float32 and int(got[1]) == int(ref[1]) == int((t != IGNORE_INDEX).sum())
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-5)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    assert bool((got[2][t == IGNORE_INDEX] == 0).all())  # rows without a target get no gradient


def test_reference_is_the_plain_cross_entropy():
    h, w, t = _inputs()
    want = F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(linear_nll_sum(h, w, t, chunk_rows=64)[0], want, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("chunk", [128, 333])
def test_bf16_autocast_matches_autocast_reference(chunk):
    h, w, t = _inputs(1)
    ref = _loss_and_grads(_reference, h, w, t, autocast=True)
    got = _loss_and_grads(lambda a, b, c: linear_nll_sum(a, b, c, chunk_rows=chunk), h, w, t, autocast=True)
    # same bf16 logits, fp32 softmax: the loss agrees closely; gradients to bf16 precision
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-2)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32  # the inputs' dtypes
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[3], ref[3], rtol=2e-2, atol=2e-2)
    # and both are near the fp32 values
    exact = _loss_and_grads(_reference, h, w, t)
    torch.testing.assert_close(got[0], exact[0], rtol=1e-2, atol=0.0)


def test_bf16_inputs_without_autocast_give_bf16_grads():
    h, w, t = _inputs(2, dtype=torch.bfloat16)
    ref = _loss_and_grads(_reference, h, w, t)
    got = _loss_and_grads(lambda a, b, c: linear_nll_sum(a, b, c, chunk_rows=100), h, w, t)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-1)
    torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(got[3].float(), ref[3].float(), rtol=3e-2, atol=3e-2)


def test_all_ignored_and_all_valid_and_batched_shapes():
    h, w, t = _inputs(3)
    none = torch.full_like(t, IGNORE_INDEX)
    total, count, gh, gw = _loss_and_grads(lambda a, b, c: linear_nll_sum(a, b, c, chunk_rows=128), h, w, none)
    assert float(total) == 0.0 and int(count) == 0 and not gh.any() and not gw.any()
    full = t.clamp_min(0)
    ref = _loss_and_grads(_reference, h, w, full)
    got = _loss_and_grads(lambda a, b, c: linear_nll_sum(a, b, c, chunk_rows=300), h, w, full)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # [B, T, H] hidden with [B, T] targets
    got3 = _loss_and_grads(lambda a, b, c: linear_nll_sum(a.view(10, 100, H), b, c.view(10, 100), chunk_rows=128),
                           h, w, t)
    ref3 = _loss_and_grads(_reference, h, w, t)
    for a, b in zip(got3, ref3):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="targets for"):
        linear_nll_sum(h, w, t[:-1])


# ------------------------------------------------------------------------------------------- the model's targets=


def _tiny(preset, seed=0):
    torch.manual_seed(seed)
    m = MateConvForCausalLM(get_config(preset, vocab_size=512))
    return m.train()


def _batch(seed=0, B=3, T=40, V=512, padded=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.cat([ids[:, 1:], torch.full((B, 1), IGNORE_INDEX)], 1)
    tgt[0, :7] = IGNORE_INDEX  # an SFT-like prompt without loss
    att = None
    if padded:  # right padding of the last row
        att = torch.ones(B, T, dtype=torch.long)
        att[-1, T - 9:] = 0
        tgt[-1, T - 10:] = IGNORE_INDEX
    return ids, tgt, att


def _model_grads(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["mateconv-tiny", "mateconv-moe-tiny"])
@pytest.mark.parametrize("autocast", [False, True])
def test_model_targets_path_equals_logits_path(preset, autocast):
    m = _tiny(preset)
    ids, tgt, att = _batch(padded=True)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(ids, attention_mask=att, targets=tgt)
    assert out.logits is None and out.loss is None  # fused: no [B, T, V] tensor
    got = _model_grads(m, out.nll_sum / out.nll_count + out.aux_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref_out = m(ids, attention_mask=att)
    total, count = nll_sum(ref_out.logits, tgt)
    ref = _model_grads(m, total / count + ref_out.aux_loss)
    assert int(out.nll_count) == int(count) == int((tgt != IGNORE_INDEX).sum())
    torch.testing.assert_close(out.nll_sum.detach(), total.detach(), rtol=1e-4 if autocast else 1e-6, atol=1e-3)
    torch.testing.assert_close(out.aux_loss.detach(), ref_out.aux_loss.detach())
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied: one gradient from the head and the embedding
    assert set(got) == set(ref) and "model.embed_tokens.weight" in got
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], **tol, msg=lambda s, n=n: f"{n}: {s}")
    # HF labels= keep their meaning: the loss of the shifted labels (the same targets here, bar the padding)
    labels = ids.clone()
    labels[0, :8] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hf = m(ids, labels=labels)
        fused = m(ids, targets=shift_labels(labels))
    torch.testing.assert_close(hf.loss, fused.nll_sum / fused.nll_count, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        m(ids, labels=labels, targets=tgt)


def test_model_targets_falls_back_to_logits_without_grad_and_under_zero3():
    m = _tiny("mateconv-tiny")
    ids, tgt, _ = _batch(1)
    out = m(ids, targets=tgt)
    with torch.no_grad():
        ev = m(ids, targets=tgt)
    assert out.logits is None and ev.logits is not None  # eval keeps the logits path
    torch.testing.assert_close(ev.nll_sum, nll_sum(ev.logits, tgt)[0])
    torch.testing.assert_close(ev.nll_sum, out.nll_sum.detach(), rtol=1e-6, atol=1e-4)
    # a DeepSpeed ZeRO-3 partitioned weight (``ds_id``) is only gathered by the module's own forward
    m.lm_head.weight.ds_id = 0
    try:
        z3 = m(ids, targets=tgt)
    finally:
        del m.lm_head.weight.ds_id
    assert z3.logits is not None and z3.nll_sum.requires_grad
    torch.testing.assert_close(z3.nll_sum, out.nll_sum, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("preset", ["mateconv-tiny", "mateconv-moe-tiny"])
@pytest.mark.parametrize("autocast", [False, True])
def test_sequence_nll_on_target_rows_equals_the_full_logits(preset, autocast):
    """The evaluation path (multiple choice, answers, preference pairs): the LM head on target rows only gives
    the per-sequence NLL of the full logits; a model without the method (an exported transformers model) goes
    through its logits."""
    from model.export import to_native
    from model.losses import sequence_nll, sequence_nll_of

    m = _tiny(preset).eval()
    ids, tgt, att = _batch(2, padded=True)
    tgt[1, :30] = IGNORE_INDEX  # a long prompt: few target rows
    tgt[2, :] = IGNORE_INDEX  # a row without any target
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got_sum, got_count = sequence_nll_of(m, ids, att, tgt)
        ref_sum, ref_count = sequence_nll(m(ids, attention_mask=att).logits, tgt)
    assert got_sum.dtype == torch.float32 and got_sum.shape == (3,)
    assert got_count.tolist() == ref_count.tolist() == (tgt != IGNORE_INDEX).sum(-1).tolist()
    assert float(got_sum[2]) == 0.0
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-3 if autocast else 1e-6, atol=1e-2 if autocast else 1e-4)
    if preset == "mateconv-tiny":  # a transformers Llama with the same weights: the logits path, same numbers
        native = to_native(m).eval()
        assert not hasattr(native, "sequence_nll")
        with torch.no_grad():
            nat_sum, _ = sequence_nll_of(native, ids, att, tgt)
            ours, _ = sequence_nll_of(m, ids, att, tgt)
        torch.testing.assert_close(nat_sum, ours, rtol=1e-4, atol=1e-3)


def test_lm_task_loss_uses_the_fused_path_and_matches(monkeypatch):
    import model.modeling_mateconv as mm
    from trainer.tasks import PretrainTask, SFTTask

    calls = []
    real = mm.linear_nll_sum
    monkeypatch.setattr(mm, "linear_nll_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = _tiny("mateconv-moe-tiny", seed=1)
    ids, tgt, att = _batch(2, padded=True)
    for task, batch in ((SFTTask(), {"input_ids": ids, "targets": tgt, "attention_mask": att}),
                        (PretrainTask(), {"input_ids": ids, "targets": tgt})):
        n = len(calls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = task.compute_loss(m, batch)
        assert len(calls) == n + 1 and loss.aux is not None and int(loss.count) == task.count_units(batch)
        got = _model_grads(m, loss.sum / loss.count + loss.aux)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids, attention_mask=batch.get("attention_mask"))
        total, count = nll_sum(out.logits, tgt)
        ref = _model_grads(m, total / count + out.aux_loss)
        torch.testing.assert_close(loss.sum.detach(), total.detach(), rtol=1e-4, atol=1e-3)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=2e-2, atol=2e-3)
        # evaluation (eval mode, no grad): the logits path, the same loss, no aux
        m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ev = task.compute_loss(m, batch)
        m.train()
        assert len(calls) == n + 1 and ev.aux is None
        torch.testing.assert_close(ev.sum, total.detach(), rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------- a real training run


def test_short_pretraining_run_learns_with_the_fused_loss(tmp_path, monkeypatch):
    import model.modeling_mateconv as mm
    from dataset.build_bin import build_bin
    from tokenizer import ORIGINAL_TOKENIZER_FIXTURE
    from trainer import PretrainTask, run

    calls = []
    real = mm.linear_nll_sum
    monkeypatch.setattr(mm, "linear_nll_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = str(ORIGINAL_TOKENIZER_FIXTURE)
    src = tmp_path / "pretrain_train.jsonl"
    src.write_text("".join(json.dumps({"text": "床前明月光疑是地上霜举头望明月低头思故乡" * 3}, ensure_ascii=False) + "\n"
                           for _ in range(40)), encoding="utf-8")
    build_bin([src], tmp_path / "pretrain_train.bin", tok, progress=False, log=lambda *a, **k: None)
    args = ["--model", "mateconv-tiny", "--tokenizer", tok, "--data_path", str(tmp_path / "pretrain_train.bin"),
            "--out_dir", str(tmp_path / "runs"), "--max_steps", "30", "--max_seq_len", "32", "--batch_size", "4",
            "--log_interval", "1", "--save_interval", "100", "--eval_interval", "0", "--dtype", "bfloat16",
            "--num_workers", "0", "--device", "cpu", "--num_threads", "1"]
    assert run(PretrainTask(), args) == 0
    recs = [json.loads(x) for x in (tmp_path / "runs" / "pretrain_mateconv-tiny" / "metrics.jsonl")
            .read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 30 and len(calls) >= 30  # every training step went through the fused loss
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3  # a repeated verse is learned quickly
