"""Rehearsal in SFT (``--replay_path`` / ``--replay_ratio``): pretraining windows mixed into the SFT items.

The mix (``dataset.datasets.ReplayMix``) on real files, then a real ``5.full_sft.py`` run with replay whose
log states the mix; bad flag combinations end with a message, not a traceback.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launchers import subprocess_env

from dataset.datasets import PretrainDataset, ReplayMix, SFTDataset
from tokenizer import load_tokenizer, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def write_bin(path: Path, ids, tok) -> Path:
    arr = np.asarray(ids, dtype="uint16")
    arr.tofile(path)
    meta = {"dtype": "uint16", "vocab_size": len(tok), "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "num_tokens": int(arr.size), "num_documents": 1, "sources": [], "bos_token_id": 1, "eos_token_id": 2,
            "max_token_id": int(arr.max())}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def write_sft(path: Path, n: int) -> Path:
    rows = [{"conversations": [{"role": "user", "content": f"第{i}个问题"},
                               {"role": "assistant", "content": "回答" * (i % 5 + 1)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mix_holds_every_sft_item_and_spreads_the_windows(tmp_path, tok):
    sft = SFTDataset(write_sft(tmp_path / "s.jsonl", 30), tok, 32)
    pre = PretrainDataset(write_bin(tmp_path / "p.bin", np.arange(3, 3 + 32 * 40 + 1) % 6000, tok), 32, tok)
    mix = ReplayMix(sft, pre, 0.25)
    assert mix.n_replay == 10 and len(mix) == 40  # 10 / 40 = 25% of the items
    for i in range(30):  # the SFT items unchanged, in order
        assert torch.equal(mix[i]["input_ids"], sft[i]["input_ids"])
        assert torch.equal(mix[i]["targets"], sft[i]["targets"])
    starts = [int(mix[30 + j]["input_ids"][0]) for j in range(10)]
    assert starts == [int(pre[j * 4]["input_ids"][0]) for j in range(10)]  # every 4th of 40 windows
    assert all((mix[30 + j]["targets"] >= 0).all() for j in range(10))  # a window is all targets
    assert "10 pretraining windows" in mix.describe()
    assert ReplayMix(sft, pre, 0.9).n_replay == len(pre)  # never more windows than the file has
    with pytest.raises(IndexError):
        mix[40]
    with pytest.raises(ValueError, match="replay ratio"):
        ReplayMix(sft, pre, 1.0)


def test_item_lengths_without_reading_the_items(tmp_path, tok):
    sft = SFTDataset(write_sft(tmp_path / "s.jsonl", 30), tok, 32)
    pre = PretrainDataset(write_bin(tmp_path / "p.bin", np.arange(3, 3 + 16 * 40 + 1) % 6000, tok), 16, tok)
    mix = ReplayMix(sft, pre, 0.25)
    assert list(mix.lengths()) == [len(mix[i]["input_ids"]) for i in range(len(mix))]
    lens = sft.lengths().tolist()
    assert len(set(lens)) > 3 and max(lens) == 32 and mix.lengths()[-1] == 16  # capped at the context; a window


def sft_run(tmp_path, *extra):
    data = write_sft(tmp_path / "sft.jsonl", 40)
    args = ["--data_path", data, "--init_from", "none", "--out_dir", tmp_path / "out", "--run_name", "run",
            "--batch_size", 4, "--max_seq_len", 32, "--max_steps", 3, "--eval_interval", 0, "--log_interval", 1,
            "--save_interval", 100, *extra]
    return subprocess.run([sys.executable, "5.full_sft.py", *map(str, args)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_sft_with_replay_trains_and_reports_the_mix(tmp_path, tok):
    bin_path = write_bin(tmp_path / "p.bin", (np.arange(33 * 50) * 7 + 3) % 6000, tok)
    r = sft_run(tmp_path, "--replay_path", bin_path, "--replay_ratio", 0.2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replay: 10 pretraining windows" in r.stdout + r.stderr
    state = json.loads(next((tmp_path / "out" / "run" / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["train_samples"] == 50  # 40 SFT items + 10 windows


@pytest.mark.slow
def test_sft_grouped_by_length_trains_and_resume_keeps_the_batch_order(tmp_path, tok):
    r = sft_run(tmp_path, "--group_by_length")
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads(next((tmp_path / "out" / "run" / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["group_by_length"] is True
    r = sft_run(tmp_path, "--resume", "--max_steps", 4)  # the other batch order: refused, named
    assert r.returncode != 0 and "--group_by_length on vs off" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    r = sft_run(tmp_path, "--group_by_length", "--resume", "--max_steps", 4)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("flags,message", [
    (["--replay_ratio", "0.2"], "--replay_ratio needs --replay_path"),
    (["--replay_path", "{bin}", "--replay_ratio", "1.5"], "expected a fraction in (0, 1)"),
    (["--replay_path", "{missing}", "--replay_ratio", "0.2"], "missing.bin"),
    (["--replay_path", "{bin}"], "--replay_ratio 0.0: expected a fraction in (0, 1)"),  # not silently unused
    (["--replay_path", "{bin}", "--replay_ratio", "-0.2"], "expected a fraction in (0, 1)"),
])
def test_bad_replay_flags_end_with_a_message(tmp_path, tok, flags, message):
    bin_path = write_bin(tmp_path / "p.bin", (np.arange(33 * 50) * 7 + 3) % 6000, tok)
    flags = [f.format(bin=bin_path, missing=tmp_path / "missing.bin") for f in flags]
    r = sft_run(tmp_path, *flags)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
