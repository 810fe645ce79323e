"""evaluation: metric values on hand-checked examples, bootstrap intervals, the train-split guard,
held-out loss / routing statistics and generation stopping on a real tiny model and tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.generate_eval import (
    generate_answers,
    generate_ids,
    load_heldout_examples,
    paired_compare,
    render_prompt,
)
from evaluation.heldout import (
    TrainingDataError,
    assert_disjoint_from_train,
    check_heldout_path,
    heldout_loss,
    items_loss,
    sft_items,
)
from evaluation.metrics import (
    answer_in_prediction,
    bootstrap_mean_ci,
    exact_match,
    lcs_length,
    normalize_text,
    paired_bootstrap,
    paired_ratio_bootstrap,
    ratio_bootstrap,
    rouge_l,
    seed_summary,
    token_f1,
    tokenize,
)
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE

ROOT = Path(__file__).resolve().parents[1]

FIXTURE_TOK = ORIGINAL_TOKENIZER_FIXTURE
MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=64, max_position_embeddings=128)



@pytest.fixture(scope="module")
def tok():
    from tokenizer import load_tokenizer

    return load_tokenizer(FIXTURE_TOK)


def _model(moe: bool = False, seed: int = 0):
    from model import MateConvForCausalLM, get_config

    torch.manual_seed(seed)
    extra = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16) if moe else {}
    return MateConvForCausalLM(get_config("mateconv-moe-tiny" if moe else "mateconv-tiny", **MICRO, **extra)).eval()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _sft(i, q, a, **kw):
    return {"id": f"x{i}", "task": kw.pop("task", "qa"), **kw,
            "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# ------------------------------------------------------------------------------------------ metrics


def test_normalisation_and_tokenisation():
    assert normalize_text(" 床前，明月光！ ") == "床前明月光"
    assert normalize_text("ＡＢＣ　１２３。") == "abc123"  # full-width -> ASCII, ideographic space and 。 dropped
    assert tokenize("床前明月光，疑是地上霜。", "word") == ["床前", "明月光", "疑是", "地上", "霜"]
    assert tokenize("Hi, 你好", "char") == ["h", "i", "你", "好"]
    with pytest.raises(ValueError):
        tokenize("x", "sentence")


def test_token_f1_hand_checked():
    # words: pred [床前, 明月光], ref [床前, 明月光, 疑是, 地上, 霜]: P=1, R=2/5, F1=2*0.4/1.4
    assert token_f1("床前明月光", "床前明月光，疑是地上霜") == pytest.approx(2 * 0.4 / 1.4)
    # chars: pred 李白白 vs ref 李白: overlap (multiset) 2, P=2/3, R=1, F1=0.8
    assert token_f1("李白白", "李白", "char") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("李白", "") == 0.0 and token_f1("", "李白") == 0.0
    assert token_f1("杜甫", "李白", "char") == 0.0
    assert token_f1("李白。", "李白", "char") == 1.0  # punctuation never counts


def test_rouge_l_hand_checked():
    assert lcs_length("abcbdab", "bdcaba") == 4
    # chars: 白日依山尽 vs 白日山尽头: LCS 白日山尽 = 4, P = 4/5, R = 4/5
    assert rouge_l("白日依山尽", "白日山尽头", "char") == pytest.approx(0.8)
    # order matters for ROUGE-L but not for token F1
    assert rouge_l("明月 床前", "床前 明月", "char") == pytest.approx(0.5)
    assert token_f1("明月床前", "床前明月", "char") == 1.0
    assert rouge_l("床前明月光", "床前明月光") == 1.0


def test_exact_match_and_answer_in_prediction():
    assert exact_match("李白。", " 李白 ") == 1.0 and exact_match("是李白", "李白") == 0.0
    assert answer_in_prediction("这首诗的作者是李白。", "李白") == 1.0
    assert answer_in_prediction("杜甫", "李白") == 0.0 and answer_in_prediction("x", "") == 0.0


def test_bootstrap_ci_covers_true_difference():
    rng = np.random.default_rng(1)
    covered, n_trials, true = 0, 40, 0.3
    for t in range(n_trials):
        b = rng.normal(0.5, 0.2, size=60)
        a = b + true + rng.normal(0, 0.3, size=60)
        r = paired_bootstrap(a, b, n_resamples=1000, seed=t)
        covered += r["ci_low"] <= true <= r["ci_high"]
        assert r["diff"] == pytest.approx(float(np.mean(a - b)))
    assert covered >= 34  # nominal 95%: 38 of 40 expected; a broken interval fails this
    r = paired_bootstrap(a, b, n_resamples=1000, seed=0)
    assert r["ci_low"] > 0 and r["p_a_better"] == 1.0  # a clear effect excludes 0
    same = paired_bootstrap([0.2, 0.5, 0.9], [0.2, 0.5, 0.9])
    assert same["ci_low"] == same["ci_high"] == same["diff"] == 0.0
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)  # seeded
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_single_mean_ratio_and_seed_summaries():
    r = bootstrap_mean_ci([0.0, 1.0] * 50, n_resamples=1000)
    assert r["mean"] == 0.5 and 0.38 < r["ci_low"] < 0.5 < r["ci_high"] < 0.62
    rr = ratio_bootstrap([10.0, 2.0, 6.0], [5, 1, 3])
    assert rr["mean"] == pytest.approx(2.0) and rr["ci_low"] == pytest.approx(2.0) and rr["ci_high"] == pytest.approx(2.0)
    p = paired_ratio_bootstrap([3.0, 4.0], [2.0, 2.0], [1, 2])
    assert p["diff"] == pytest.approx((7.0 - 4.0) / 3.0)
    s = seed_summary([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["n_seeds"]) == (2.0, 1.0, 3)
    assert s["ci_high"] - s["mean"] == pytest.approx(4.303 / math.sqrt(3))
    one = seed_summary([0.7])
    assert one["std"] == 0.0 and one["ci_low"] is None


# ---------------------------------------------------------------------------------- train-split guard


def test_train_split_guard(tmp_path, tok):
    for bad in ("sft_train.jsonl", "pretrain_train.bin", "train.jsonl", "data-train.jsonl"):
        with pytest.raises(TrainingDataError, match="train"):
            check_heldout_path(tmp_path / bad)
    with pytest.raises(TrainingDataError, match="training split"):
        check_heldout_path(tmp_path / "sft_validation.jsonl", split="train")
    assert check_heldout_path(tmp_path / "pretrain_validation.jsonl", "validation").name == "pretrain_validation.jsonl"
    check_heldout_path(tmp_path / "sft_test.jsonl", "test")
    # a held-out file that contains a training record is refused, by id or by identical conversation
    train = _write(tmp_path / "sft_train.jsonl", [_sft(1, "《静夜思》的作者是谁？", "李白")])
    val = _write(tmp_path / "sft_validation.jsonl", [_sft(2, "《春晓》的作者是谁？", "孟浩然")])
    assert assert_disjoint_from_train(val)["checked"] is True
    leaked = _write(tmp_path / "sft_test.jsonl", [_sft(9, "《静夜思》的作者是谁？", "李白")])
    with pytest.raises(TrainingDataError, match="also occur"):
        assert_disjoint_from_train(leaked)
    # the evaluation itself leaves such records out (and counts them) instead of scoring them
    _write(leaked, [_sft(9, "《静夜思》的作者是谁？", "李白"), _sft(3, "《相思》的作者是谁？", "王维"),
                    _sft(1, "另一个问题", "另一个答案")])  # x1 shares the id of a train record
    assert [e["id"] for e in load_heldout_examples(leaked, "test")] == ["x3"]
    res = heldout_loss(_model(), tok, leaked, "sft", 64, split="test", n_resamples=50)
    assert res["n_items"] == 1 and res["train_overlap_check"]["excluded"] == 2
    assert sorted(res["train_overlap_check"]["overlap_ids"]) == ["x1", "x9"]
    with pytest.raises(TrainingDataError):
        load_heldout_examples(train, "validation")
    with pytest.raises(TrainingDataError):
        heldout_loss(_model(), tok, train, "sft", 32)


def test_evaluate_cli_refuses_train(tmp_path):
    from evaluation.evaluate import main

    _model().save_pretrained(tmp_path / "ckpt")
    _write(tmp_path / "sft_train.jsonl", [_sft(1, "问", "答")])
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(FIXTURE_TOK), "--data_dir", str(tmp_path),
            "--out", str(tmp_path / "m.json")]
    with pytest.raises(TrainingDataError, match="training split"):
        main(args + ["--split", "train"])
    with pytest.raises(TrainingDataError, match="train split"):
        main(args + ["--sft_file", str(tmp_path / "sft_train.jsonl")])
    with pytest.raises(FileNotFoundError, match="random model"):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


# ------------------------------------------------------------------------------ held-out loss, routing


def test_heldout_loss_matches_model_loss_and_routing_stats(tmp_path, tok):
    path = _write(tmp_path / "pretrain_validation.jsonl",
                  [{"text": "床前明月光，疑是地上霜。"}, {"text": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"}])
    moe = _model(moe=True)
    res = heldout_loss(moe, tok, path, "pretrain", max_seq_len=64, split="validation", n_resamples=200)
    ids = [1] + tok("床前明月光，疑是地上霜。", add_special_tokens=False)["input_ids"] + [2]
    with torch.no_grad():
        ref = moe(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert res["item_nll_sum"][0] / res["item_tokens"][0] == pytest.approx(ref, rel=1e-5)
    assert res["n_items"] == 2 and res["loss"] == pytest.approx(sum(res["item_nll_sum"]) / sum(res["item_tokens"]))
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert res["loss_ci_low"] <= res["loss"] <= res["loss_ci_high"]
    rt = res["routing"]
    assert rt["n_moe_layers"] == 2 and rt["n_routed_experts"] == 4
    n_tokens = res["n_tokens"]
    for lay in rt["layers"]:
        assert sum(lay["expert_counts"]) == n_tokens * 2  # every real token routed to top-2, padding excluded
        assert sum(lay["load_fraction"]) == pytest.approx(1.0)
        assert lay["max_violation"] == pytest.approx(max(lay["load_fraction"]) / 0.25 - 1)
        assert 0 < lay["router_entropy"] <= math.log(4) + 1e-9
    # padding does not change anything: batch of 1 vs batch of 2 gives the same losses and loads
    res1 = heldout_loss(moe, tok, path, "pretrain", max_seq_len=64, batch_size=1, n_resamples=200)
    assert res1["item_nll_sum"] == pytest.approx(res["item_nll_sum"], rel=1e-4)
    assert res1["routing"]["layers"][1]["expert_counts"] == rt["layers"][1]["expert_counts"]
    assert heldout_loss(_model(), tok, path, "pretrain", 64, n_resamples=100)["routing"] is None


def test_sft_loss_only_on_answers(tmp_path, tok):
    path = _write(tmp_path / "sft_validation.jsonl", [_sft(1, "《静夜思》的作者是谁？", "李白")])
    items = sft_items(path, tok, 64)
    tgt = items[0]["targets"]
    answer = tok("李白</s>", add_special_tokens=False)["input_ids"]
    assert tgt[tgt != -100].tolist() == answer
    r = items_loss(_model(), items, pad_id=2)
    assert r["n_tokens"] == len(answer)


# ------------------------------------------------------------------------------------------ generation


def _naive_greedy(model, prompt, n, eos):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if t == eos:
                return out, True
            out.append(t)
            ids.append(t)
    return out, False


def test_generation_stops_on_eos_and_counts_only_new_tokens(tok):
    model = _model()
    prompts = [tok(render_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
               for q in ("《静夜思》的作者是谁？", "请背诵《春晓》。", "你好")]
    assert tok.decode(prompts[0]).endswith("<s>assistant\n")
    eos = tok.eos_token_id
    assert eos == 2
    got = generate_ids(model, prompts, eos, eos, max_new_tokens=7, batch_size=3)
    for p, g in zip(prompts, got):  # batched + cached = one by one without cache
        ids, stopped = _naive_greedy(model, p, 7, eos)
        assert g == {"ids": ids, "stopped_on_eos": stopped}
        assert len(g["ids"]) == 7 or g["stopped_on_eos"]  # max_new_tokens counts new tokens only


def test_sampled_answers_are_seeded_per_prompt_whatever_the_batch(tok):
    model = _model()
    prompts = [tok(render_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
               for q in ("《静夜思》的作者是谁？", "请背诵《春晓》。", "你好", "写一首五言绝句。")]
    eos = tok.eos_token_id
    kw = dict(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    together = generate_ids(model, prompts, eos, eos, batch_size=4, **kw)
    assert generate_ids(model, prompts, eos, eos, batch_size=4, **kw) == together  # reproducible
    # prompt i draws from its own stream: the same answers in batches of 1 and of 3
    assert [g["ids"] for g in generate_ids(model, prompts, eos, eos, batch_size=1, **kw)] == \
        [g["ids"] for g in together]
    assert [g["ids"] for g in generate_ids(model, prompts, eos, eos, batch_size=3, **kw)] == \
        [g["ids"] for g in together]
    other = generate_ids(model, prompts, eos, eos, batch_size=4, **dict(kw, seed=4))
    greedy = generate_ids(model, prompts, eos, eos, max_new_tokens=12, batch_size=4)
    assert other != together and greedy != together  # the seed and the sampling matter


def test_trained_model_answers_and_stops_right_after_the_answer(tmp_path, tok):
    """Train a micro model on one conversation (real SFT items): greedy decoding must give the answer and
    stop on </s> right after it — not run on into a new turn — and a short budget must cut it."""
    path = _write(tmp_path / "sft_validation.jsonl", [_sft(1, "《静夜思》的作者是谁？", "李白", answer="李白", task="author")])
    item = sft_items(path, tok, 64)[0]
    model = _model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(40):
        logits = model(item["input_ids"][None]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, item["targets"], ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ex = load_heldout_examples(path, "validation")
    (rec,) = generate_answers(model, tok, ex, max_new_tokens=12)
    n_answer = len(tok("李白", add_special_tokens=False)["input_ids"])
    assert rec["prediction"] == "李白" and rec["stopped_on_eos"] and rec["n_new_tokens"] == n_answer
    assert rec["exact_match"] == 1.0 and rec["token_f1_word"] == 1.0 and rec["rouge_l_char"] == 1.0
    (cut,) = generate_answers(model, tok, ex, max_new_tokens=1)
    assert cut["n_new_tokens"] == 1 and not cut["stopped_on_eos"]


def test_heldout_examples_subset_and_paired_compare(tmp_path):
    path = _write(tmp_path / "sft_validation.jsonl",
                  [_sft(i, f"问题{i}", f"答案{i}", **({"answer": f"答案{i}", "task": "author"} if i % 2 else {}))
                   for i in range(10)])
    ex = load_heldout_examples(path, "validation", max_examples=4, seed=0)
    assert len(ex) == 4 and ex == load_heldout_examples(path, "validation", max_examples=4, seed=0)
    assert all(e["reference"] == f"答案{e['id'][1:]}" and e["messages"][-1]["role"] == "user" for e in ex)
    a = [{"id": "1", "m": 1.0}, {"id": "2", "m": 0.0}]
    b = [{"id": "2", "m": 0.0}, {"id": "1", "m": 0.5}]
    assert paired_compare(a, b, "m", n_resamples=100)["diff"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same examples"):
        paired_compare(a, [{"id": "3", "m": 0.0}], "m")


def test_heldout_loss_on_a_packed_bin(tmp_path, tok):
    """A held-out ``.bin`` (stage 3 output) is read as the contract's windows; a train-named .bin is refused."""
    from dataset.build_bin import build_bin

    src = _write(tmp_path / "pretrain_validation.jsonl",
                 [{"text": "床前明月光，疑是地上霜。举头望明月，低头思故乡。"}, {"text": "春眠不觉晓，处处闻啼鸟。"}])
    out = tmp_path / "pretrain_validation.bin"
    side = build_bin([src], out, tok, progress=False, log=lambda *a, **k: None)
    res = heldout_loss(_model(), tok, out, "pretrain", max_seq_len=8, split="validation", n_resamples=50)
    assert res["n_items"] == (side["num_tokens"] - 1) // 8 and res["n_tokens"] == res["n_items"] * 8
    assert res["train_overlap_check"]["checked"] is False  # no JSONL records to compare for a .bin
    with pytest.raises(TrainingDataError):
        heldout_loss(_model(), tok, tmp_path / "pretrain_train.bin", "pretrain", 8)


def test_preference_judge_ranks_by_the_reports_rouge_l():
    from prefs.generators import Prompt
    from prefs.judges import ReferenceJudge, rouge_l_f1

    ref = "床前明月光，疑是地上霜。"
    cands = ["床前明月光 疑是地上霜", "ＡＢ床前看月光！", "疑是地上霜，床前明月光。", ""]
    for c in cands[:3]:  # punctuation, full-width letters and spaces normalised exactly as in the report
        assert rouge_l_f1(c, ref) == rouge_l(c, ref, "char")
    assert rouge_l_f1(cands[0], ref) == 1.0 and rouge_l_f1("", ref) == 0.0
    verdict = ReferenceJudge("rougeL").rank(Prompt(id="p", messages=[{"role": "user", "content": "q"}],
                                                   reference=ref), cands)
    assert verdict.ranking == sorted(range(4), key=lambda i: (-rouge_l(cands[i], ref, "char") if cands[i] else 0, i))


def test_bit_parallel_lcs_equals_the_dynamic_programme_on_tokens():
    import random

    def dp(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice(["春", "眠", "不觉", "晓", "处处"]) for _ in range(rng.randrange(0, 30))]
        b = [rng.choice(["春", "眠", "不觉", "晓", "夜来"]) for _ in range(rng.randrange(0, 30))]
        assert lcs_length(a, b) == dp(a, b)


@pytest.mark.slow
def test_evaluate_cli_prints_plain_progress_lines_and_no_bars_into_a_log(tmp_path):
    """Through a pipe (as under nohup or the pipeline): '[evaluate] ...' lines per part, no tqdm bars."""
    import subprocess
    import sys

    _model().save_pretrained(tmp_path / "ckpt")
    rows = [_sft(i, f"“{a}”的下一句是什么？", b, task="continue_line")
            for i, (a, b) in enumerate([("床前明月光", "疑是地上霜。"), ("春眠不觉晓", "处处闻啼鸟。"), ("白日依山尽", "黄河入海流。")])]
    _write(tmp_path / "sft_validation.jsonl", rows)
    _write(tmp_path / "pretrain_validation.jsonl", [{"text": "床前明月光，疑是地上霜。"}, {"text": "春眠不觉晓。"}])
    mc = tmp_path / "mc"
    mc.mkdir()
    _write(mc / "mc_next_line_test.jsonl", [{"id": "m1", "task": "next_line", "format": "text", "prompt": "床前明月光，",
                                             "options": ["疑是地上霜", "处处闻啼鸟", "黄河入海流", "低头思故乡"],
                                             "label": 0}])
    out = tmp_path / "eval" / "dense_seed0_sft.json"
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--checkpoint", str(tmp_path / "ckpt"),
                           "--tokenizer", str(FIXTURE_TOK), "--data_dir", str(tmp_path), "--mc_dir", str(mc),
                           "--max_new_tokens", "4", "--verse_examples", "2", "--verse_new_tokens", "4",
                           "--n_resamples", "50", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for what in ("held-out loss on pretraining text", "bits per character on", "multiple choice: 1 items",
                 "shared held-out preference pairs", "greedy answers to", "verse form: sampled (temperature 0.7, top_p 0.9, seeded per prompt) answers", "done in"):
        assert any(x.startswith("[evaluate]") and what in x for x in lines), what
    assert "it/s]" not in proc.stderr and "\r" not in proc.stderr  # no progress bars in a log
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["mc"]["n_items"] == 1 and res["verse"]["n_examples"] == 2 and res["pairs"]["n_pairs"] == 3
    assert json.loads(lines[-1])["out"] == str(out)
