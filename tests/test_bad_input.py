"""Bad input: every error names the file and the line (or token position / field); --on_error skip counts."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launchers import subprocess_env

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


# ----------------------------------------------------------------------------- stages 5 and 9 (issue 14)


QA = {"conversations": [{"role": "user", "content": "床前明月光的下一句？"}, {"role": "assistant", "content": "疑是地上霜。"}]}
PAIR = {"q": "天空为什么是蓝的？", "history": [], "pos": "因为瑞利散射。", "neg": "不知道。"}


def jline(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def run_stage(script, *args, timeout=300, preexec_fn=None):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


STAGE_DATA = {  # script -> (data flag, good record, 2nd bad record (reason, words))
    "5.full_sft.py": ("--data_path", QA, '{"conversations": "hello"}', "wrong_type",
                      "field 'conversations': expected a list"),
    "9.train_dpo.py": ("--pairs_path", PAIR, jline({"q": "问", "history": [], "pos": "好"}), "missing_field",
                       "field 'neg': missing field"),
}


@pytest.mark.parametrize("script", list(STAGE_DATA))
def test_sft_and_dpo_stages_raise_or_count_bad_records(tmp_path, script):
    """A 4-record file with 2 bad records: raise names line and reason (default); skip reports 2 skipped."""
    flag, good, bad, reason, words = STAGE_DATA[script]
    src = lines_file(tmp_path / "four.jsonl", jline(good), bad, jline(good), '{"broken json')
    base = [flag, src, "--init_from", "none", "--out_dir", tmp_path / "out", "--max_steps", 1, "--batch_size", 1,
            "--eval_interval", 0, "--probe_samples", 0] if script == "9.train_dpo.py" else \
        [flag, src, "--init_from", "none", "--out_dir", tmp_path / "out", "--max_steps", 1, "--batch_size", 1]
    r = run_stage(script, *base)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{src}:2: " in r.stderr and words in r.stderr and f"[{reason}]" in r.stderr
    r = run_stage(script, *base, "--on_error", "skip")
    out = r.stdout + r.stderr
    assert "4 records, kept 2, dropped 0, skipped 2" in out, out[-3000:]
    assert f"skipped {reason}: 1" in out and "skipped malformed_json: 1" in out
    assert f"{src}:2: " in out and f"{src}:4: " in out
    assert "data: 2 train samples" in out


@pytest.mark.parametrize("script", list(STAGE_DATA))
def test_all_bad_and_empty_chat_data_end_in_a_message(tmp_path, script):
    flag = STAGE_DATA[script][0]
    bad = lines_file(tmp_path / "bad.jsonl", "{oops", STAGE_DATA[script][2])
    empty = lines_file(tmp_path / "empty.jsonl", "", "  ")
    common = ["--init_from", "none", "--out_dir", tmp_path / "out", "--max_steps", 1]
    r = run_stage(script, flag, bad, *common, "--on_error", "skip")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{bad}: no usable records: all 2 skipped (malformed_json 1, {STAGE_DATA[script][3]} 1)" in r.stderr
    assert f"{bad}:1: malformed JSON" in r.stderr
    r = run_stage(script, flag, empty, *common)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{empty}: no records: the input is empty [empty_file]" in r.stderr


def test_bom_first_line_is_kept(tmp_path, tok):
    bom = b"\xef\xbb\xbf"
    sft = tmp_path / "bom_sft.jsonl"
    sft.write_bytes(bom + jline(QA).encode() + b"\n" + jline(QA).encode() + b"\n")
    ds = SFTDataset(sft, tok, 64)
    assert len(ds) == 2 and ds.lines == [1, 2]
    assert torch_equal(ds[0]["input_ids"], ds[1]["input_ids"])
    pairs = tmp_path / "bom_pairs.jsonl"
    pairs.write_bytes(bom + jline(PAIR).encode() + b"\n")
    assert len(PreferenceDataset(pairs, tok, 64)) == 1
    text = tmp_path / "bom_text.jsonl"
    text.write_bytes(bom + GOOD + b"\n" + GOOD + b"\n")
    meta = build_bin(text, tmp_path / "bom.bin", FIXTURE, workers=2, batch_size=1, progress=False, log=None)
    assert meta["num_documents"] == 2
    assert prepare("pretrain", text, tmp_path / "p.jsonl", dedup=False, progress=False, log=None).kept == 2


def torch_equal(a, b) -> bool:
    return a.tolist() == b.tolist()


def test_stage3_empty_input_is_an_error(tmp_path):
    empty = lines_file(tmp_path / "empty.jsonl", "")
    r = run_stage("3.pretrain.py", "--input", empty, "--out_dir", tmp_path / "out", "--tokenizer", FIXTURE)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {empty}: no documents: the input is empty [empty_file]" in r.stderr
    assert not (tmp_path / "out" / "pretrain.bin").exists()
    bad = lines_file(tmp_path / "bad.jsonl", '{"text": ""}', "{oops")
    with pytest.raises(DataError, match=re.escape(f"{bad}: no usable documents: all 2 skipped "
                                                  "(empty_text 1, malformed_json 1)")):
        build_bin(bad, tmp_path / "b.bin", FIXTURE, on_error="skip", progress=False, log=None)
    assert not (tmp_path / "b.bin").exists()


# ----------------------------------------------------------------------------- output paths (issue 14)


def _no_dac_override():
    """Child process: root without CAP_DAC_OVERRIDE, so directory permissions apply to it as to a user."""
    import ctypes
    import os

    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; PR_CAPBSET_DROP = 24
            if libc.prctl(24, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _read_only_dir(path):
    path.mkdir()
    path.chmod(0o555)
    return path


def test_output_paths_are_checked_before_work(tmp_path):
    src = lines_file(tmp_path / "in.jsonl", GOOD)
    a_file = lines_file(tmp_path / "a_file", "x")
    a_dir = tmp_path / "a_dir.jsonl"
    a_dir.mkdir()
    ro = _read_only_dir(tmp_path / "ro")
    prep = ["-m", "dataset.prepare", "pretrain", "--input", src, "--workers", 1, "--output"]
    cases = [  # (argv, expected message)
        (prep + [a_dir], f"output path {a_dir} is a directory; a file is expected there"),
        (prep + [a_file / "o.jsonl"], f"output path {a_file / 'o.jsonl'}: {a_file} is a file, not a directory"),
        (prep + [ro / "sub" / "o.jsonl"], f"output path {ro / 'sub' / 'o.jsonl'}: directory {ro} is not writable"),
        (["3.pretrain.py", "--input", src, "--tokenizer", FIXTURE, "--out_dir", a_file],
         f"output directory {a_file} is a file; a directory is expected there"),
        (["3.pretrain.py", "--input", src, "--tokenizer", FIXTURE, "--out_dir", ro],
         f"output directory {ro} is not writable"),
        (["3.pretrain.py", "--input", src, "--tokenizer", FIXTURE, "--out_dir", tmp_path, "--name", "a_dir"],
         None),
    ]
    (tmp_path / "a_dir.bin").mkdir()
    cases[-1] = (cases[-1][0], f"output path {tmp_path / 'a_dir.bin'} is a directory; a file is expected there")
    for argv, words in cases:
        r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=subprocess_env(), capture_output=True,
                           text=True, timeout=120, preexec_fn=_no_dac_override)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr[-2000:])
        assert f"error: {words}" in r.stderr, (argv, r.stderr[-2000:])
    assert not list(ro.iterdir())


@pytest.mark.parametrize("script", ["4.pretrain.py", "5.full_sft.py", "9.train_dpo.py"])
def test_trainer_run_dir_is_checked(tmp_path, script):
    a_file = lines_file(tmp_path / "a_file", "x")
    ro = _read_only_dir(tmp_path / "ro")
    for out_dir, words in ((a_file, "is a file, not a directory"), (ro, f"directory {ro} is not writable")):
        r = run_stage(script, "--out_dir", out_dir, "--init_from", "none", "--max_steps", 1,
                      preexec_fn=_no_dac_override)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "error: run directory" in r.stderr and words in r.stderr, r.stderr[-3000:]


def test_empty_bin_is_a_message_in_stage_4(tmp_path, tok):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    empty.with_suffix(".json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(DataError, match=re.escape(f"{empty}: empty file (0 tokens)")):
        PretrainDataset(empty, 8, tok)
    r = run_stage("4.pretrain.py", "--data_path", empty, "--out_dir", tmp_path / "out", "--max_steps", 1)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"error: pretraining data: {empty}: empty file (0 tokens): rebuild it with 3.pretrain.py" in r.stderr
