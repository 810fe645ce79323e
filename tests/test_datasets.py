"""Torch datasets and collation with the real fixture tokenizer (no pad token) and small real files."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.collate import pad_collate, preference_collate
from dataset.datasets import (
    ChatEncoder,
    PreferenceDataset,
    PretrainDataset,
    SFTDataset,
    pad_token_id,
)
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE, load_tokenizer, tokenizer_fingerprint

FIXTURE = ORIGINAL_TOKENIZER_FIXTURE
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURE)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def conv(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"conversations": msgs}


def write_bin(path, ids, tok, dtype="uint16", **extra):
    arr = np.asarray(ids, dtype=dtype)
    arr.tofile(path)
    meta = {"dtype": dtype, "vocab_size": len(tok), "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "num_tokens": int(arr.size), "num_documents": 1, "sources": [], "bos_token_id": 1, "eos_token_id": 2,
            "max_token_id": int(arr.max())}
    meta.update(extra)
    Path(path).with_suffix(".json").write_text(json.dumps(meta))
    return path


# ----------------------------------------------------------------------------- pretraining


def test_pretrain_windows_are_shifted_with_stride_seq_len(tmp_path, tok):
    ids = np.arange(3, 3 + 23) % 6400
    ds = PretrainDataset(write_bin(tmp_path / "p.bin", ids, tok), max_seq_len=5, tokenizer=tok)
    assert len(ds) == (23 - 1) // 5 == 4
    item = ds[1]
    assert item["input_ids"].dtype == torch.long and item["targets"].dtype == torch.long
    assert item["input_ids"].tolist() == list(ids[5:10])
    assert item["targets"].tolist() == list(ids[6:11])
    assert ds[-1]["targets"].tolist() == list(ids[16:21])
    with pytest.raises(IndexError):
        ds[4]


def test_pretrain_dataset_pickles_without_data(tmp_path, tok):
    ids = np.random.default_rng(0).integers(3, 6400, size=200_000)
    ds = PretrainDataset(write_bin(tmp_path / "p.bin", ids, tok), max_seq_len=64)
    ds[3]  # opens the map
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the memmap is not copied into DataLoader workers
    assert torch.equal(pickle.loads(blob)[3]["input_ids"], ds[3]["input_ids"])


def test_pretrain_raw_bin_without_sidecar_needs_dtype(tmp_path, tok):
    path = tmp_path / "raw.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    ds = PretrainDataset(path, 9, dtype="uint16")
    assert ds[0]["input_ids"].tolist() == list(range(9))


# ----------------------------------------------------------------------------- SFT


def answer_text(tok, item):
    t = item["targets"]
    return tok.decode(t[t != -100].tolist())


def test_sft_targets_only_on_answers_and_end_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv("床前明月光的下一句？", "疑是地上霜。"),
                                                conv("你好", "你好！", "写一首诗", "春眠不觉晓", system="你是诗人")])
    ds = SFTDataset(path, tok, max_seq_len=128)
    assert len(ds) == 2
    one = ds[0]
    assert one["input_ids"].shape == one["targets"].shape
    assert answer_text(tok, one) == "疑是地上霜。</s>"
    # pre-shifted: every target equals the next input token
    t, x = one["targets"], one["input_ids"]
    pos = (t != -100).nonzero().flatten()
    assert torch.equal(t[pos[:-1]], x[pos[:-1] + 1])
    # the input sequence is the original chat template
    assert tok.decode(x.tolist()) == "<s>user\n床前明月光的下一句？</s>\n<s>assistant\n疑是地上霜。</s>"
    # multi-turn: both answers are targets; the system prompt and questions are not
    assert answer_text(tok, ds[1]) == "你好！</s>春眠不觉晓</s>"


def test_builtin_template_matches_tokenizer_template_tokens(tok):
    msgs = conv("问题一", "回答一", "问题二", "回答二")["conversations"]
    a = ChatEncoder(tok, "auto").encode(msgs)
    b = ChatEncoder(tok, "mateconv").encode(msgs)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    # and equal to encoding the whole rendered conversation at once
    whole = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert a[0].tolist() == whole


def test_sft_truncation_keeps_start(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv("短问题", "很长的回答" * 50)])
    ds = SFTDataset(path, tok, max_seq_len=32)
    item = ds[0]
    assert len(item["input_ids"]) == 32
    full = SFTDataset(path, tok, max_seq_len=4096)[0]
    assert torch.equal(item["input_ids"], full["input_ids"][:32])
    assert torch.equal(item["targets"], full["targets"][:32])


def test_sft_subset_is_deterministic_given_seed(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv(f"问题{i}", f"回答{i}") for i in range(20)])
    a = SFTDataset(path, tok, 64, limit=5, seed=1)
    b = SFTDataset(path, tok, 64, limit=5, seed=1)
    c = SFTDataset(path, tok, 64, limit=5, seed=2)
    assert a.lines == b.lines and len(a) == 5 and a.lines != c.lines
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(5))


def test_pad_collate_right_pads_and_masks(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv("一", "二"), conv("一个更长的问题", "一个更长的回答")])
    ds = SFTDataset(path, tok, 64)
    pid = pad_token_id(tok)
    assert pid == tok.eos_token_id == 2  # fixture has no pad token
    batch = pad_collate(pid)([ds[0], ds[1]])
    n0 = len(ds[0]["input_ids"])
    assert batch["input_ids"].shape == batch["targets"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert (batch["input_ids"][0, n0:] == pid).all() and (batch["targets"][0, n0:] == -100).all()
    assert batch["attention_mask"][1].all()


# ----------------------------------------------------------------------------- preferences


def test_preference_dataset_reads_all_pair_formats_identically(tmp_path, tok):
    original = {"q": "天空为什么是蓝的？", "history": [["你好", "你好！"]], "pos": "因为瑞利散射。", "neg": "不知道。"}
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "天空为什么是蓝的？"}]
    chosen_rejected = {"chosen": msgs + [{"role": "assistant", "content": "因为瑞利散射。"}],
                       "rejected": msgs + [{"role": "assistant", "content": "不知道。"}]}
    canonical = {"id": 7, "prompt": msgs, "chosen": "因为瑞利散射。", "rejected": "不知道。"}
    items = [PreferenceDataset(write_jsonl(tmp_path / f"{i}.jsonl", [r]), tok, 128)[0]
             for i, r in enumerate([original, chosen_rejected, canonical])]
    for it in items[1:]:
        assert all(torch.equal(it[k], items[0][k]) for k in items[0])
    it = items[0]
    assert answer_text(tok, {"targets": it["chosen_targets"]}) == "因为瑞利散射。</s>"
    assert answer_text(tok, {"targets": it["rejected_targets"]}) == "不知道。</s>"
    batch = preference_collate(pad_token_id(tok))([it])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["rejected_attention_mask"].sum() == len(it["rejected_input_ids"])


def test_fixture_files_load(tok):
    assert len(PreferenceDataset(DATA / "original_pairs.jsonl", tok, 256)) >= 2
    assert len(PreferenceDataset(DATA / "chosen_rejected.jsonl", tok, 256)) >= 2


def test_any_chat_template_masks_exactly_the_answers():
    """A tokenizer whose chat template differs from the MateConv one (and from the built-in rendering)."""
    tok = load_tokenizer(FIXTURE)
    tok.chat_template = ("{% for m in messages %}{{ '[' + m['role'] + ']: ' + m['content'] + eos_token + '\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]: ' }}{% endif %}")
    msgs = conv("第一问", "第一答", "第二问", "第二答", system="系统")["conversations"]
    enc = ChatEncoder(tok)
    assert enc._same_as_builtin == {False: False, True: False}
    ids, mask = enc.encode(msgs)
    assert tok.decode(ids.tolist()) == tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids[mask].tolist()) == "第一答</s>第二答</s>"
    ids, mask = enc.encode(msgs, loss_on="last")
    assert tok.decode(ids[mask].tolist()) == "第二答</s>"
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert not mask[:n].any() and mask[n]  # the generation prompt is tokenized as at inference


def test_chat_datasets_pickle_for_spawned_workers(tmp_path, tok):
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [conv("问", "答")]), tok, 32)
    assert torch.equal(pickle.loads(pickle.dumps(ds))[0]["targets"], ds[0]["targets"])
    pairs = PreferenceDataset(DATA / "original_pairs.jsonl", tok, 64)
    assert torch.equal(pickle.loads(pickle.dumps(pairs))[1]["rejected_targets"], pairs[1]["rejected_targets"])


def test_workers_give_identical_samples(tmp_path, tok):
    rows = [conv(f"第{i}个问题", "回答" * (i % 7 + 1)) for i in range(40)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    a = SFTDataset(path, tok, 32, workers=1)
    b = SFTDataset(path, tok, 32, workers=2)
    assert a.lines == b.lines == list(range(1, 41))
    assert all(torch.equal(a[i]["targets"], b[i]["targets"]) for i in range(len(a)))


def test_default_tokenizer_sft_and_padding(tmp_path):
    tok = load_tokenizer(None)
    first = conv("床前明月光的下一句？", "疑是地上霜。", system="你是诗人")
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [first, conv("你好", "你好！")]), tok, 128)
    assert answer_text(tok, ds[0]) == "疑是地上霜。</s>"
    rendered = tok.apply_chat_template(first["conversations"], tokenize=False)
    assert rendered.startswith("<s>system\n你是诗人</s>\n")
    assert tok.decode(ds[0]["input_ids"].tolist()) == rendered.removesuffix("\n")  # inputs drop the last token
    batch = pad_collate(pad_token_id(tok))([ds[0], ds[1]])
    assert pad_token_id(tok) == 3
    assert (batch["input_ids"][1][batch["attention_mask"][1] == 0] == 3).all()
