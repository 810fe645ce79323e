"""Multiple-choice tasks: built from the test split only, identical across builds, scored as a hand
computation, and a randomly initialised model scores chance within its CI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evaluation.mc import (
    TASKS,
    ensure_mc_items,
    load_mc_items,
    paired_mc,
    score_mc,
    summarize_mc,
)
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE

MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=64, max_position_embeddings=512)
N = 100


@pytest.fixture(scope="module")
def tok():
    from tokenizer import load_tokenizer

    return load_tokenizer(ORIGINAL_TOKENIZER_FIXTURE)


@pytest.fixture(scope="module")
def mc_files(tmp_path_factory):
    return ensure_mc_items(tmp_path_factory.mktemp("mc"), n_per_task=N)


@pytest.fixture(scope="module")
def items(mc_files):
    return load_mc_items(mc_files)


def _model(seed: int = 0):
    from model import MateConvForCausalLM, get_config

    torch.manual_seed(seed)
    return MateConvForCausalLM(get_config("mateconv-tiny", **MICRO)).eval()


def test_items_come_from_test_works_only_and_are_identical_across_builds(mc_files, items, tmp_path):
    from dataset.build_corpus import read_corpus
    from dataset.embedded import body_text

    again = ensure_mc_items(tmp_path / "again", n_per_task=N, force=True)
    for task in TASKS:
        assert mc_files[task].read_bytes() == again[task].read_bytes(), task
    works = {w["id"]: w for w in read_corpus()}
    train_bodies = {body_text(w) for w in works.values() if w["split"] == "train"}
    assert {it["task"] for it in items} == set(TASKS)
    for task in TASKS:
        assert sum(it["task"] == task for it in items) == N
    for it in items:
        w = works[it["work_id"]]
        assert w["split"] == "test" and it["split"] == "test"
        assert body_text(w) not in train_bodies
        assert len(it["options"]) == 4 and len(set(it["options"])) == 4
        right = it["options"][it["label"]]
        if it["task"] == "next_line":
            assert len({len(o) for o in it["options"]}) == 1  # distractors have the same length
            assert right in body_text(w) and it["prompt"].endswith("，")
        if it["task"] == "cloze":
            assert right in body_text(w)
    # distractors come from test works too: every next-line option is a line of a test work, every
    # cloze / author / title choice occurs in a test work
    import re

    test_works = [w for w in works.values() if w["split"] == "test"]
    test_lines = {c.rstrip("，。？！；：、") for w in test_works
                  for c in re.findall(r"[^，。？！；：、\n]+[，。？！；：、]?", body_text(w))}
    test_text = "\n".join(body_text(w) for w in test_works)
    for it in items:
        if it["task"] == "next_line":
            assert set(it["options"]) <= test_lines
        if it["task"] == "cloze":
            assert all(c in test_text for c in it["choices"])
        if it["task"] == "author":
            assert set(it["choices"]) <= {w.get("author") for w in test_works}
        if it["task"] == "title":
            assert set(it["choices"]) <= {w["title"] for w in test_works}


def test_option_scores_equal_a_hand_computation(tok, items):
    from tokenizer.chat import encode_chat

    model = _model()
    picked = [next(it for it in items if it["task"] == t) for t in ("next_line", "form")]
    recs = score_mc(model, tok, picked, batch_size=3)
    for it, rec in zip(picked, recs):
        if it["format"] == "chat":
            ctx = encode_chat(tok, it["messages"]) + tok(it["assistant_prefix"], add_special_tokens=False)["input_ids"]
        else:
            ctx = [tok.bos_token_id] + tok(it["prompt"], add_special_tokens=False)["input_ids"]
        for j, opt in enumerate(it["options"]):
            o = tok(opt, add_special_tokens=False)["input_ids"]
            seq = ctx + o
            with torch.no_grad():
                lg = model(input_ids=torch.tensor([seq[:-1]])).logits[0].double()
            lp = lg - torch.logsumexp(lg, -1, keepdim=True)
            hand = float(sum(lp[t - 1, seq[t]] for t in range(len(ctx), len(seq))))
            assert rec["logp_sum"][j] == pytest.approx(hand, rel=1e-4, abs=1e-4)
            assert rec["logp_norm"][j] == pytest.approx(hand / len(opt), rel=1e-4, abs=1e-4)
        assert rec["pred"] == max(range(4), key=lambda k: rec["logp_sum"][k])
        assert rec["correct"] == int(rec["pred"] == it["label"])


def test_random_model_scores_chance_within_its_ci(tok, items):
    recs = score_mc(_model(seed=1), tok, items)
    summary = summarize_mc(recs, n_resamples=1000)
    pooled = sum(r["correct"] for r in recs) / len(recs)
    se = math.sqrt(0.25 * 0.75 / len(recs))
    assert abs(pooled - 0.25) < 1.96 * se, pooled  # all 500 items: chance within the 95% interval
    for task, s in summary.items():
        assert s["chance"] == 0.25 and s["n"] == N
        assert s["acc"]["ci_low"] <= 0.25 <= s["acc"]["ci_high"], (task, s["acc"])
        assert s["centred"]["mean"] == pytest.approx((s["acc"]["mean"] - 0.25) / 0.75)
        assert s["centred"]["ci_low"] <= 0 <= s["centred"]["ci_high"]
    # paired comparison of a model with itself: zero difference; against another seed: both at chance
    same = paired_mc(recs, recs)
    assert all(v["diff"] == 0 for v in same.values())
    other = paired_mc(recs, score_mc(_model(seed=2), tok, items[:N]))
    assert set(other) == {items[0]["task"]} and other[items[0]["task"]]["n"] == N


def test_bad_item_files_name_file_line_and_field(tmp_path):
    path = tmp_path / "mc_x_test.jsonl"
    good = {"id": "a", "task": "t", "options": ["甲", "乙"], "label": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": 2}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mc_x_test.jsonl:2: field 'label' must index 'options'"):
        load_mc_items(path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "options"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mc_x_test.jsonl:1: multiple-choice item without field 'options'"):
        load_mc_items(path)
