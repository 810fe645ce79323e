"""Bad input: every error names the file and the line (or token position / field); --on_error skip counts."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset.build_bin import build_bin
from dataset.datasets import PreferenceDataset, PretrainDataset, SFTDataset
from dataset.errors import DataError
from dataset.prepare import prepare
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE, load_tokenizer, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ORIGINAL_TOKENIZER_FIXTURE
GOOD = json.dumps({"text": "床前明月光，疑是地上霜。"}, ensure_ascii=False).encode()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURE)


def lines_file(path, *lines: bytes | str):
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


def located(path, line):
    return re.escape(f"{path}:{line}:")


BAD_TEXT_LINES = {  # line 2 of a pretraining file -> (expected words in the message, reason)
    "malformed_json": (b'{"text": "unterminated', "malformed JSON"),
    "missing_field": (b'{"content": "no text field"}', "field 'text': missing field"),
    "wrong_type": (b'{"text": 42}', "field 'text': expected a string, got int"),
    "empty_text": (b'{"text": "   "}', "field 'text': empty"),
    "invalid_utf8": (b'{"text": "\xe5\xba\x8a\xff\xfe"}', "invalid UTF-8 at byte"),
    "invalid_unicode": (b'{"text": "\xe5\xba\x8a\\ud800\xe5\x89\x8d"}', "field 'text': lone surrogate U+D800 at character 1"),
}


@pytest.mark.parametrize("reason", list(BAD_TEXT_LINES))
def test_stage2_and_stage3_name_file_and_line(tmp_path, reason):
    bad, words = BAD_TEXT_LINES[reason]
    src = lines_file(tmp_path / "in.jsonl", GOOD, bad, GOOD)
    with pytest.raises(DataError, match=located(src, 2) + ".*" + re.escape(words)) as e:
        prepare("pretrain", src, tmp_path / "out.jsonl", progress=False, log=None)
    assert e.value.reason == reason and e.value.line == 2
    assert not (tmp_path / "out.jsonl").exists()  # atomic: nothing half-written
    with pytest.raises(DataError, match=located(src, 2) + ".*" + re.escape(words)):
        build_bin(src, tmp_path / "out.bin", FIXTURE, progress=False, log=None)
    assert not (tmp_path / "out.bin").exists()


def test_on_error_skip_counts_and_lists_skips(tmp_path, tok):
    src = lines_file(tmp_path / "in.jsonl", GOOD, *(v[0] for v in BAD_TEXT_LINES.values()), GOOD.replace("床".encode(), "窗".encode()))
    rep = prepare("pretrain", src, tmp_path / "out.jsonl", on_error="skip", progress=False, log=None)
    assert rep.kept == 2 and rep.skipped == {r: 1 for r in BAD_TEXT_LINES}
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["skipped"] == {r: 1 for r in BAD_TEXT_LINES} and summary["kept"] == 2
    assert any(f"{src}:3:" in x for x in summary["skipped_examples"])
    meta = build_bin(src, tmp_path / "out.bin", FIXTURE, on_error="skip", workers=2, batch_size=2, progress=False,
                     log=None)
    assert meta["num_documents"] == 2 and meta["skipped"] == {r: 1 for r in BAD_TEXT_LINES}
    assert f"{src}:2:" in meta["skipped_examples"][0]


def test_cli_skip_prints_summary_and_raise_exits_with_location(tmp_path):
    src = lines_file(tmp_path / "in.jsonl", GOOD, b"{oops")
    cmd = [sys.executable, "-m", "dataset.prepare", "pretrain", "--input", str(src), "--output",
           str(tmp_path / "o.jsonl"), "--workers", "1"]
    r = subprocess.run(cmd + ["--on_error", "skip"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "skipped malformed_json: 1" in r.stdout and f"{src}:2:" in r.stdout
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{src}:2:" in r.stderr


def test_missing_files_are_named(tmp_path, tok):
    missing = tmp_path / "nowhere.jsonl"
    for call in (lambda: prepare("sft", missing, tmp_path / "o.jsonl", progress=False, log=None),
                 lambda: build_bin(missing, tmp_path / "o.bin", FIXTURE, progress=False, log=None),
                 lambda: SFTDataset(missing, tok, 64),
                 lambda: PreferenceDataset(missing, tok, 64),
                 lambda: PretrainDataset(tmp_path / "nowhere.bin", 64)):
        with pytest.raises(DataError, match="nowhere.*not found") as e:
            call()
        assert e.value.reason == "missing_file"


def test_sft_field_errors_name_line_and_field(tmp_path, tok):
    good = json.dumps({"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]},
                      ensure_ascii=False)
    cases = {
        '{"conversations": "hello"}': "field 'conversations': expected a list",
        '{"messages": []}': "field 'conversations': missing field",
        '{"conversations": [{"role": "user", "content": 3}]}': "field 'conversations[0].content': expected a string",
        '{"conversations": [{"role": "bot", "content": "x"}]}': "field 'conversations[0].role': unknown role",
        '{"conversations": [{"role": "user", "content": "only a question"}]}': "no assistant message",
        '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}':
            "field 'conversations[1].content': empty message",
    }
    for bad, words in cases.items():
        src = lines_file(tmp_path / "sft.jsonl", good, "", bad)
        with pytest.raises(DataError, match=located(src, 3) + ".*" + re.escape(words)):
            SFTDataset(src, tok, 64)
    ds = SFTDataset(lines_file(tmp_path / "sft.jsonl", good, *cases), tok, 64, on_error="skip")
    assert len(ds) == 1 and sum(ds.summary["skipped"].values()) == len(cases)


def test_deepctrl_csv_and_pair_field_errors(tmp_path):
    deep = lines_file(tmp_path / "d.jsonl", json.dumps({"id": 1, "instruction": "", "input": "问题", "history": []}))
    with pytest.raises(DataError, match=located(deep, 1) + ".*field 'output': missing field"):
        prepare("sft", deep, tmp_path / "o.jsonl", progress=False, log=None)
    hist = lines_file(tmp_path / "h.jsonl", json.dumps({"instruction": "", "input": "问题问题问题问题问题", "output": "答案答案",
                                                        "history": [["only question"]]}))
    with pytest.raises(DataError, match=located(hist, 1) + ".*field 'history\\[0\\]'"):
        prepare("sft", hist, tmp_path / "o.jsonl", progress=False, log=None)
    csv_path = tmp_path / "s.csv"
    csv_path.write_text('history,q,a\n[],问题问题问题问题问题,答案答案答案\n"[[1, 2",问题问题问题问题问题,答案答案答案\n', encoding="utf-8")
    with pytest.raises(DataError, match=located(csv_path, 3) + ".*field 'history'"):
        prepare("sft", csv_path, tmp_path / "o.jsonl", progress=False, log=None)
    rep = prepare("sft", csv_path, tmp_path / "o.jsonl", on_error="skip", progress=False, log=None)
    assert rep.kept == 1 and rep.skipped == {"wrong_type": 1}
    pairs = lines_file(tmp_path / "p.jsonl", json.dumps({"q": "问", "history": [], "pos": "好"}))
    with pytest.raises(DataError, match=located(pairs, 1) + ".*field 'neg': missing field"):
        prepare("prefs", pairs, tmp_path / "o.jsonl", progress=False, log=None)


def test_sample_longer_than_the_context(tmp_path, tok):
    short = {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}
    long_q = {"conversations": [{"role": "user", "content": "很长的问题" * 100}, {"role": "assistant", "content": "答"}]}
    src = lines_file(tmp_path / "sft.jsonl", json.dumps(short), json.dumps(long_q, ensure_ascii=False))
    with pytest.raises(DataError, match=located(src, 2) + ".*sample longer than the context \\(32 tokens\\)"):
        SFTDataset(src, tok, 32)
    ds = SFTDataset(src, tok, 32, on_error="skip")
    assert len(ds) == 1 and ds.summary["skipped"] == {"too_long": 1}
    pair = {"q": "问", "history": [], "pos": "好", "neg": "坏" * 40 + "的回答"}
    long_prompt = {"q": "很长的问题" * 100, "history": [], "pos": "好", "neg": "坏"}
    psrc = lines_file(tmp_path / "p.jsonl", json.dumps(pair, ensure_ascii=False),
                      json.dumps(long_prompt, ensure_ascii=False))
    with pytest.raises(DataError, match=located(psrc, 2) + ".*sample longer than the context"):
        PreferenceDataset(psrc, tok, 32)
    assert len(PreferenceDataset(psrc, tok, 32, on_error="skip")) == 1


def _bin(path, ids, tok, **meta):
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(path)
    side = {"dtype": "uint16", "vocab_size": 6400, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "num_tokens": arr.size, "num_documents": 1, "sources": [], "bos_token_id": 1, "eos_token_id": 2}
    side.update(meta)
    path.with_suffix(".json").write_text(json.dumps(side))
    return path


def test_bin_with_id_out_of_vocab(tmp_path, tok):
    ids = np.full(100, 5, dtype=np.uint16)
    ids[73] = 6400
    path = _bin(tmp_path / "bad.bin", ids, tok)
    with pytest.raises(DataError, match=re.escape(f"{path} (token 73): token id 6400 >= vocab size 6400")):
        PretrainDataset(path, 16, tokenizer=tok)
    with pytest.raises(DataError, match=re.escape(f"{path} (token 73)")):
        PretrainDataset(path, 16)  # vocab size from the sidecar
    path = _bin(tmp_path / "bad2.bin", np.full(100, 5), tok, max_token_id=7000)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*max_token_id 7000 >= vocab size 6400"):
        PretrainDataset(path, 16, tokenizer=tok, verify="sidecar")


def test_bin_built_with_another_tokenizer(tmp_path, tok):
    path = _bin(tmp_path / "other.bin", np.full(100, 5), tok, tokenizer_fingerprint="0123456789abcdef")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*fingerprint 0123456789abcdef.*"
                       + tokenizer_fingerprint(tok)) as e:
        PretrainDataset(path, 16, tokenizer=tok)
    assert e.value.reason == "fingerprint_mismatch"
    assert len(PretrainDataset(path, 16)) == 6  # without a tokenizer there is nothing to compare


def test_bin_sidecar_problems(tmp_path, tok):
    path = tmp_path / "raw.bin"
    np.full(100, 5, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*sidecar raw.json not found"):
        PretrainDataset(path, 16)
    path = _bin(tmp_path / "short.bin", np.full(100, 5), tok, num_tokens=99)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*sidecar says 99 tokens, the file holds 100"):
        PretrainDataset(path, 16)


def test_csv_invalid_utf8_and_bad_header(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes("history,q,a\n[],问题问题问题问题问题,答案答案答案\n".encode() + b"[],\xff\xfe,x\n")
    with pytest.raises(DataError, match=located(path, 3) + ".*invalid UTF-8"):
        prepare("sft", path, tmp_path / "o.jsonl", progress=False, log=None)
    rep = prepare("sft", path, tmp_path / "o.jsonl", on_error="skip", progress=False, log=None)
    assert rep.kept == 1 and rep.skipped == {"invalid_utf8": 1}
    path.write_text("history,question,answer\n[],q,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=located(path, 1) + ".*field 'q': missing column"):
        prepare("sft", path, tmp_path / "o.jsonl", progress=False, log=None)
