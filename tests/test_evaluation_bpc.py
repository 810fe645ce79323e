"""Bits per character equals a hand computation; the validation sample is fixed and spread; routing
statistics (near-dead experts, the two entropies) on hand-made counts and a real MoE model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.bpc import HeldoutBPC, collection_of, spread_sample
from evaluation.routing import RoutingCollector, flat_routing_metrics, near_dead_line, routing_stats
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE

MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=64, max_position_embeddings=256)
TEXTS = ["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。", "白日依山尽"]


@pytest.fixture(scope="module")
def tok():
    from tokenizer import load_tokenizer

    return load_tokenizer(ORIGINAL_TOKENIZER_FIXTURE)


def _model(moe: bool = False, seed: int = 0):
    from model import MateConvForCausalLM, get_config

    torch.manual_seed(seed)
    extra = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16) if moe else {}
    return MateConvForCausalLM(get_config("mateconv-moe-tiny" if moe else "mateconv-tiny", **MICRO, **extra)).eval()


def _hand_nll(model, seq: list[int], first_target: int = 1) -> float:
    """Sum over positions t >= first_target of -log softmax(logits[t-1])[seq[t]] (one forward, no helpers)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq[:-1]])).logits[0].double()
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    return float(-sum(logp[t - 1, seq[t]] for t in range(first_target, len(seq))))


def test_bpc_of_texts_equals_hand_computation(tok):
    model = _model()
    bpc = HeldoutBPC(tok, TEXTS, n=None, max_seq_len=128)
    out = bpc.evaluate(model)
    total_nll, total_chars, total_tok = 0.0, 0, 0
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        seq = [tok.bos_token_id] + ids + [tok.eos_token_id]
        total_nll += _hand_nll(model, seq)  # the text's tokens and the closing eos; bos is context
        total_chars += len(text)
        total_tok += len(ids) + 1
    assert out["n_texts"] == 3 and out["n_chars"] == total_chars and out["n_tokens"] == total_tok
    assert out["bpc"] == pytest.approx(total_nll / total_chars / math.log(2), rel=1e-5)
    assert out["loss"] == pytest.approx(total_nll / total_tok, rel=1e-5)


def test_long_text_is_scored_in_windows_every_token_once(tok):
    model = _model()
    text = TEXTS[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = [tok.bos_token_id] + ids + [tok.eos_token_id]
    L = 5
    assert len(seq) - 1 > 2 * L  # at least three windows
    out = HeldoutBPC(tok, [text], n=None, max_seq_len=L).evaluate(model)
    hand = sum(_hand_nll(model, seq[s:s + L + 1]) for s in range(0, len(seq) - 1, L))
    assert out["n_tokens"] == len(ids) + 1 and out["n_chars"] == len(text)
    assert out["bpc"] == pytest.approx(hand / len(text) / math.log(2), rel=1e-5)


def _conv(q, a, i=0, col="tang", task="qa"):
    return {"id": f"{col}-{i:05d}-{task}", "task": task,
            "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_bpc_of_sft_answers_counts_answer_characters(tok, tmp_path):
    from tokenizer.chat import encode_conversation

    model = _model()
    recs = [_conv("请背诵《静夜思》。", TEXTS[0], 0), _conv("下一句？", "疑是地上霜。", 1)]
    path = tmp_path / "sft_validation.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    out = HeldoutBPC(tok, path, n=None, max_seq_len=128).evaluate(model)
    nll, ntok = 0.0, 0
    for r in recs:
        ids, mask = map(np.asarray, encode_conversation(tok, r["conversations"]))
        first = int(np.flatnonzero(mask)[0])
        assert mask[first:].sum() == len(tok(r["conversations"][1]["content"], add_special_tokens=False)
                                         ["input_ids"]) + 1  # the answer's tokens and its end token
        nll += _hand_nll(model, [int(t) for t in ids[:first + mask[first:].sum()]], first_target=first)
        ntok += int(mask.sum())
    chars = sum(len(r["conversations"][1]["content"]) for r in recs)
    assert out["n_chars"] == chars and out["n_tokens"] == ntok
    assert out["bpc"] == pytest.approx(nll / chars / math.log(2), rel=1e-5)


def test_sft_window_keeps_the_answer_and_cut_answers_count_their_decoded_prefix(tok):
    long_prompt = "请解释：" + "天地玄黄宇宙洪荒" * 20
    bpc = HeldoutBPC(tok, [_conv(long_prompt, "日月盈昃。")], n=None, max_seq_len=32)
    assert bpc.n_texts == 1 and bpc.n_chars == len("日月盈昃。")  # prompt start dropped, whole answer kept
    long_answer = "辰宿列张，寒来暑往，秋收冬藏。" * 10
    bpc = HeldoutBPC(tok, [_conv("背诵", long_answer)], n=None, max_seq_len=16)
    (_, item), = bpc.items
    scored = [int(t) for t in item["targets"] if t != -100]
    decoded = tok.decode(scored)
    assert 0 < len(scored) <= 16 and long_answer.startswith(decoded) and bpc.n_chars == len(decoded)


def test_spread_sample_is_fixed_and_covers_every_collection():
    recs = ([{"id": f"tang-{i:05d}-author", "task": "author"} for i in range(800)]
            + [{"id": f"songci-{i:05d}-cipai", "task": "cipai"} for i in range(150)]
            + [{"id": f"yuanqu-{i:05d}-title", "task": "title"} for i in range(50)])
    a, b = spread_sample(recs, 40, seed=3), spread_sample(recs, 40, seed=3)
    assert a == b and len(a) == len(set(a)) == 40 and a == sorted(a)
    cols = [collection_of(recs[i]) for i in a]
    assert cols.count("tang") == 32 and cols.count("songci") == 6 and cols.count("yuanqu") == 2
    assert spread_sample(recs, 40, seed=4) != a
    first_block_only = spread_sample(1000, 10, seed=0)  # positions: one per block of 100
    assert [i // 100 for i in first_block_only] == list(range(10))
    assert spread_sample(recs, None) == list(range(1000))


def test_heldout_bpc_rejects_records_of_the_wrong_shape(tok, tmp_path):
    path = tmp_path / "bad_validation.jsonl"
    path.write_text('{"text": "春眠不觉晓"}\n{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_validation.jsonl:2: missing field 'text'"):
        HeldoutBPC(tok, path)
    path.write_text('{"text": "a"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_validation.jsonl:2: not valid JSON"):
        HeldoutBPC(tok, Path(path))


# ------------------------------------------------------------------------------------------ routing


def test_routing_stats_on_hand_counts():
    counts = torch.tensor([[25.0, 25.0, 25.0, 25.0], [60.0, 30.0, 8.0, 2.0]])
    st = routing_stats(counts)
    l0, l1 = st["layers"]
    assert l0["max_violation"] == pytest.approx(0.0) and l0["near_dead"] == []
    assert l0["expert_load_entropy"] == pytest.approx(math.log(4)) and l0["expert_load_entropy_norm"] == 1.0
    assert l1["load_fraction"] == pytest.approx([0.6, 0.3, 0.08, 0.02])
    assert l1["max_violation"] == pytest.approx(0.6 / 0.25 - 1)
    assert l1["near_dead"] == [3]  # 2% < 10% of 25%; 8% is not
    assert st["near_dead"] == [{"layer": 1, "expert": 3, "load_fraction": pytest.approx(0.02)}]
    assert l1["router_entropy"] is None  # counts alone do not give per-token router entropies
    flat = flat_routing_metrics(st)
    assert flat["moe/near_dead"] == 1.0 and flat["moe/layer1/near_dead"] == 1.0
    assert flat["moe/max_violation"] == pytest.approx(1.4) and "moe/router_entropy" not in flat
    assert "L1E3(2.0%)" in near_dead_line(st) and near_dead_line(routing_stats(counts[:1])) == ""
    assert routing_stats(torch.zeros(0, 0)) is None


def test_router_entropy_differs_from_load_entropy_on_a_real_moe():
    model = _model(moe=True)
    col = RoutingCollector(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 6400, (2, 24)))
    finally:
        col.close()
    st = col.stats()
    for lay in st["layers"]:
        assert sum(lay["expert_counts"]) == 2 * 24 * 2  # tokens x top-k
        assert 0 < lay["router_entropy"] <= math.log(4) + 1e-9
        assert 0 < lay["expert_load_entropy"] <= math.log(4) + 1e-9
        assert lay["router_entropy"] != pytest.approx(lay["expert_load_entropy"])
    assert "moe/layer0/router_entropy" in flat_routing_metrics(st)


def test_sharded_evaluation_sums_to_the_whole_and_every_rank_runs_the_same_passes(tok):
    model = _model()
    texts = TEXTS * 3 + ["春眠不觉晓", "夜来风雨声"]  # 11 items: 6 + 5 over 2 ranks, batches of 5
    bpc = HeldoutBPC(tok, texts, n=None, max_seq_len=128, batch_size=5)
    whole = bpc.evaluate(model, per_text=True)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        parts = []
        for rank in (0, 1):
            calls.clear()
            parts.append(bpc.evaluate(model, rank=rank, world_size=2, per_text=True))
            assert len(calls) == bpc.n_forward_passes(2) == 2
    finally:
        handle.remove()
    summed = [a + b for a, b in zip(parts[0]["text_nll"], parts[1]["text_nll"])]
    assert summed == pytest.approx(whole["text_nll"], rel=1e-5)
    assert [a + b for a, b in zip(parts[0]["text_tokens"], parts[1]["text_tokens"])] == whole["text_tokens"]
    # with the all-reduce (here: the sum of the two ranks' tensors) every rank returns the whole
    other = torch.cat([torch.tensor(parts[1]["text_nll"], dtype=torch.float64),
                       torch.tensor(parts[1]["text_tokens"], dtype=torch.float64)])
    out = bpc.evaluate(model, rank=0, world_size=2, all_reduce=lambda t: t + other)
    assert out["bpc"] == pytest.approx(whole["bpc"], rel=1e-5) and out["n_tokens"] == whole["n_tokens"]
