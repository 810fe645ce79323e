"""The shared held-out preference pairs: model-independent, deterministic, scored as a hand computation."""

from __future__ import annotations

import json

import pytest
import torch

from evaluation.pairs import pair_logps, preference_accuracy, reward_wins, shared_pairs
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE


def _rec(i, task, q, a, col="tang"):
    return {"id": f"{col}-{i:05d}-{task}", "task": task,
            "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


RECS = [_rec(0, "continue_line", "“床前明月光”的下一句是什么？", "疑是地上霜。"),
        _rec(1, "continue_line", "“春眠不觉晓”的下一句是什么？", "处处闻啼鸟。"),
        _rec(2, "continue_line", "“白日依山尽”的下一句是什么？", "黄河入海流。", "songshi"),
        _rec(3, "author", "《静夜思》的作者是谁？", "李白"), _rec(4, "author", "《春晓》的作者是谁？", "孟浩然"),
        _rec(5, "qa", "x", "y")]


def test_pairs_are_fixed_and_independent_of_any_model(tmp_path):
    path = tmp_path / "sft_test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECS), encoding="utf-8")
    a, b = shared_pairs(path, n=10, seed=0), shared_pairs(path, n=10, seed=0)
    assert a == b and len(a) == 5  # the "qa" record is not a pair task
    refs = {r["id"]: r for r in RECS}
    for p in a:
        src = refs[p["id"][len("pair-"):]]
        assert p["chosen"] == src["conversations"][1]["content"] and p["messages"] == src["conversations"][:1]
        other = refs[p["rejected_from"]]
        assert other["task"] == src["task"] and p["rejected"] == other["conversations"][1]["content"] != p["chosen"]


def test_pair_logps_equal_a_hand_computation(tmp_path):
    from model import MateConvForCausalLM, get_config
    from tokenizer import load_tokenizer
    from tokenizer.chat import encode_chat

    tok = load_tokenizer(ORIGINAL_TOKENIZER_FIXTURE)
    torch.manual_seed(0)
    model = MateConvForCausalLM(get_config("mateconv-tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=64)).eval()
    path = tmp_path / "sft_test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECS), encoding="utf-8")
    pairs = shared_pairs(path, n=3, seed=1)
    recs = pair_logps(model, tok, pairs, max_seq_len=128, batch_size=3)
    for p, r in zip(pairs, recs):
        ctx = encode_chat(tok, p["messages"])
        for side in ("chosen", "rejected"):
            ans = tok(p[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seq = ctx + ans
            with torch.no_grad():
                lg = model(input_ids=torch.tensor([seq[:-1]])).logits[0].double()
            lp = lg - torch.logsumexp(lg, -1, keepdim=True)
            assert r[f"logp_{side}"] == pytest.approx(float(sum(lp[t - 1, seq[t]] for t in range(len(ctx), len(seq)))),
                                                     rel=1e-4)
            assert r[f"tokens_{side}"] == len(ans)
    acc = preference_accuracy(recs, n_resamples=100)
    assert acc["n"] == 3 and acc["mean"] == sum(r["logp_chosen"] > r["logp_rejected"] for r in recs) / 3
    # reward wins: a checkpoint against itself ties on every pair
    assert set(reward_wins(recs, recs).values()) == {0.5}
