"""Stage 2: normalisation, CJK ratio, converters on hand-written samples in the exact source formats."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dataset.prepare import (
    cjk_ratio,
    csv_row_to_sft,
    deepctrl_to_sft,
    normalize_text,
    prepare,
    to_canonical_pair,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def read(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def test_normalize_keeps_chinese_punctuation_and_cleans_the_rest():
    assert normalize_text("你好，世界！（测试）：“引号”；《书名》……") == "你好，世界！（测试）：“引号”；《书名》……"
    assert normalize_text("\ufeffＡＢＣ１２３\u200b") == "ABC123"
    assert normalize_text("a\u00a0b\u3000c") == "a b c"
    assert normalize_text("一\r\n二\r三  \n\n\n\n四\x07") == "一\n二\n三\n\n四"
    assert normalize_text("e\u0301") == "\u00e9"  # NFC


def test_cjk_ratio_ignores_whitespace_digits_and_punctuation():
    assert cjk_ratio("你好，世界。") == 1.0
    assert cjk_ratio("2023年，粮食产量增长1.3%。") == 1.0
    assert cjk_ratio("Hello, world!") == 0.0
    assert cjk_ratio("Python是语言") == pytest.approx(3 / 9)
    assert cjk_ratio("   ，。！ ") == 0.0
    assert cjk_ratio("中 文 " * 10 + "ab") == pytest.approx(20 / 22)  # not diluted by spaces


def test_deepctrl_converter_keeps_history_as_turns():
    rec = read(DATA / "deepctrl.jsonl")[2]
    out = deepctrl_to_sft(rec, system="你是助手")
    assert out["id"] == 3 and out["task"] == "科普"
    assert [m["role"] for m in out["conversations"]] == ["system", "user", "assistant", "user", "assistant"]
    assert out["conversations"][1]["content"] == "太阳离地球有多远？"
    assert out["conversations"][-1]["content"] == "月球到地球的平均距离约为38.4万千米。"
    both = deepctrl_to_sft(read(DATA / "deepctrl.jsonl")[1])
    assert both["conversations"][0]["content"] == "将下面的句子翻译成中文。\nKnowledge is power."


def test_csv_converter_parses_python_literal_history():
    out = csv_row_to_sft({"history": "[['你好', '你好！']]", "q": "再见", "a": "再见！"})
    assert out["conversations"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                                    {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"}]


def test_pair_formats_convert_to_one_canonical_pair():
    a = to_canonical_pair({"q": "问", "history": [["q1", "a1"]], "pos": "好答案", "neg": "坏答案"})
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "问"}]
    b = to_canonical_pair({"chosen": msgs + [{"role": "assistant", "content": "好答案"}],
                           "rejected": msgs + [{"role": "assistant", "content": "坏答案"}]})
    c = to_canonical_pair(b)
    assert a == b == c
    assert a["prompt"] == msgs and a["q"] == "问" and a["history"] == [["q1", "a1"]]
    assert (a["chosen"], a["rejected"], a["pos"], a["neg"]) == ("好答案", "坏答案", "好答案", "坏答案")


def test_prepare_pretrain_seqmonkey(tmp_path):
    out = tmp_path / "pt.jsonl"
    rep = prepare("pretrain", DATA / "seqmonkey.jsonl", out, progress=False, log=None)
    texts = [r["text"] for r in read(out)]
    assert texts[0] == "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。寒来暑往，秋收冬藏。"
    assert texts[1] == "李白（701年－762年），字太白，号青莲居士，唐朝诗人。\n\n有“诗仙”之称。"
    assert len(texts) == 4 and all(set(r) == {"text"} for r in read(out))
    assert rep.dropped == {"duplicate": 1, "not_chinese": 1, "too_short": 1}
    summary = json.loads((tmp_path / "pt.jsonl.summary.json").read_text())
    assert summary["kept"] == 4 and summary["records"] == 7
    en = prepare("pretrain", DATA / "seqmonkey.jsonl", tmp_path / "en.jsonl", lang="en", progress=False, log=None)
    assert en.kept == 1 and read(tmp_path / "en.jsonl")[0]["text"].startswith("The quick brown fox")


def test_prepare_sft_deepctrl_and_csv(tmp_path):
    rep = prepare("sft", DATA / "deepctrl.jsonl", tmp_path / "d.jsonl", progress=False, log=None)
    rows = read(tmp_path / "d.jsonl")
    assert [r["id"] for r in rows] == [1, 3]
    assert rep.dropped == {"duplicate": 1, "not_chinese": 2}
    rep = prepare("sft", DATA / "original_sft.csv", tmp_path / "c.jsonl", min_q_chars=1, progress=False, log=None)
    rows = read(tmp_path / "c.jsonl")
    assert rep.kept == 3
    assert rows[1]["conversations"][-1]["content"] == "春风拂面柳丝长，\n桃李芬芳映小塘。\n燕子归来寻旧垒，\n田间处处播种忙。"
    assert len(rows[2]["conversations"]) == 6


def test_prepare_prefs_both_formats(tmp_path):
    out = tmp_path / "p.jsonl"
    rep = prepare("prefs", [DATA / "original_pairs.jsonl", DATA / "chosen_rejected.jsonl"], out, lang="any",
                  progress=False, log=None)
    rows = read(out)
    assert rep.kept == 5 and len(rows) == 5
    assert all(set(r) >= {"prompt", "chosen", "rejected", "q", "history", "pos", "neg", "meta"} for r in rows)
    assert rows[4]["prompt"][0]["role"] == "system"


def test_workers_give_the_same_output_in_order(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": f"第{i}号文档，内容是中文。" * (1 + i % 3)}, ensure_ascii=False) + "\n"
                           for i in range(300)), encoding="utf-8")
    prepare("pretrain", src, tmp_path / "a.jsonl", workers=1, progress=False, log=None)
    prepare("pretrain", src, tmp_path / "b.jsonl", workers=2, chunk_lines=17, progress=False, log=None)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes() and a.count(b"\n") == 300


def test_cli_runs_and_limit(tmp_path):
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "dataset.prepare", "pretrain", "--input", str(DATA / "seqmonkey.jsonl"),
                        "--output", str(out), "--limit", "3", "--workers", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 records, kept 2" in r.stdout
    assert len(read(out)) == 2


def test_notebook_executes_on_embedded_data(tmp_path):
    import os

    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "2.Prepare_Train_Data.ipynb", as_version=4)
    env = {"MATECONV_PREPARED_DIR": str(tmp_path), "MATECONV_NB_LIMIT": "500"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
                                ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert len(read(tmp_path / "sft_train.jsonl")) == 500
    assert len(read(tmp_path / "pretrain_train.jsonl")) == 500


def _square(x):
    return x * x


def test_ordered_map_streams_an_endless_input_in_order():
    import itertools

    from dataset.jsonl import ordered_map

    # Pool.imap would try to queue the whole (endless) input; ordered_map keeps a bounded window
    got = list(itertools.islice(ordered_map(_square, itertools.count(), workers=2, max_pending=4), 50))
    assert got == [i * i for i in range(50)]
