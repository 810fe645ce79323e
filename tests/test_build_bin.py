"""Stage 3: packed .bin + sidecar with the real fixture tokenizer; counts, round trip, long documents."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset.build_bin import build_bin, dtype_for_vocab
from dataset.datasets import PretrainDataset
from tokenizer import DEFAULT_TOKENIZER_DIR, ORIGINAL_TOKENIZER_FIXTURE, load_tokenizer, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ORIGINAL_TOKENIZER_FIXTURE

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。",
         "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "长" * 3000,  # longer than any window: kept, spread over windows
         "Mixed 中文 and English, 数字 2024。\n第二行。"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURE)


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_bin_sidecar_counts_match_and_windows_decode_to_source(tmp_path, tok):
    src = write_texts(tmp_path / "pt.jsonl", TEXTS)
    meta = build_bin(src, tmp_path / "out" / "pt.bin", FIXTURE, progress=False, log=None)
    data = np.fromfile(tmp_path / "out" / "pt.bin", dtype=np.uint16)
    side = json.loads((tmp_path / "out" / "pt.json").read_text())
    assert side == meta
    assert side["dtype"] == "uint16" and side["vocab_size"] == 6400
    assert side["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert side["num_tokens"] == data.size
    assert side["num_documents"] == len(TEXTS) == int((data == 2).sum()) == int((data == 1).sum())
    assert side["max_token_id"] == int(data.max()) and side["bos_token_id"] == 1 and side["eos_token_id"] == 2
    assert side["sources"] == [str(src)]
    expected = "".join(f"<s>{t}</s>" for t in TEXTS)
    assert tok.decode(data.tolist()) == expected
    ds = PretrainDataset(tmp_path / "out" / "pt.bin", 64, tokenizer=tok)
    assert len(ds) == (data.size - 1) // 64
    windows = [ds[i]["input_ids"].tolist() for i in range(len(ds))]
    assert tok.decode([t for w in windows for t in w]) == tok.decode(data[: 64 * len(ds)].tolist())
    assert tok.decode(windows[0]).startswith("<s>" + TEXTS[0] + "</s><s>" + TEXTS[1][:5])
    assert ds[0]["targets"].tolist() == data[1:65].tolist()


def test_workers_and_batches_do_not_change_the_bytes(tmp_path):
    texts = [f"第{i}篇：" + "春江潮水连海平，海上明月共潮生。" * (i % 5 + 1) for i in range(120)]
    src = write_texts(tmp_path / "pt.jsonl", texts)
    build_bin(src, tmp_path / "a.bin", FIXTURE, workers=1, batch_size=1000, progress=False, log=None)
    build_bin(src, tmp_path / "b.bin", FIXTURE, workers=2, batch_size=7, progress=False, log=None)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_dtype_follows_vocab_size():
    assert dtype_for_vocab(6400) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32 and dtype_for_vocab(151_643) == np.uint32


def test_cli_with_input(tmp_path, tok):
    src = write_texts(tmp_path / "pt.jsonl", TEXTS[:2])
    r = subprocess.run([sys.executable, "3.pretrain.py", "--input", str(src), "--out_dir", str(tmp_path / "o"),
                        "--name", "corpus", "--tokenizer", str(FIXTURE), "--workers", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "o" / "corpus.json").read_text())
    assert side["num_documents"] == 2
    assert "2 documents" in r.stdout


def test_defaults_build_the_embedded_corpus(tmp_path):
    """``3.pretrain.py`` defaults (embedded train + validation, default tokenizer; the fixture tokenizer
    while the default one is not built), limited to a few documents to stay fast."""
    tok_args = [] if DEFAULT_TOKENIZER_DIR.is_dir() else ["--tokenizer", str(FIXTURE)]
    r = subprocess.run([sys.executable, "3.pretrain.py", "--out_dir", str(tmp_path / "pre"), "--workers", "1",
                        "--limit", "300", *tok_args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(tok_args[1] if tok_args else None)
    for split in ("train", "validation"):
        bin_path = tmp_path / "pre" / f"pretrain_{split}.bin"
        side = json.loads(bin_path.with_suffix(".json").read_text())
        src_path = ROOT / "data" / "embedded" / f"pretrain_{split}.jsonl"
        with open(src_path, encoding="utf-8") as f:
            src = [json.loads(next(f))["text"] for _ in range(300)]
        data = np.fromfile(bin_path, dtype=side["dtype"])
        assert side["num_documents"] == 300 and side["num_tokens"] == data.size
        assert side["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
        assert int((data == tok.eos_token_id).sum()) == 300
        assert tok.decode(data.tolist()) == "".join(f"{tok.bos_token}{t}{tok.eos_token}" for t in src)
        ds = PretrainDataset(bin_path, 128, tokenizer=tok)
        assert tok.decode(ds[0]["input_ids"].tolist()).startswith(f"{tok.bos_token}{src[0][:20]}")
