"""Damaged checkpoints (issue 14): checksums recorded at save, damaged files named, --resume falls back.

A real SFT run (tiny model, real trainer, real files) saves checkpoints at steps 2 and 4; copies of
its run directory are then damaged on disk (truncated / one bit flipped / emptied) and resumed or
loaded with the project's own commands and ``model.load``.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import subprocess_env

import model
from model.integrity import CHECKSUM_FILE, DamagedWeightsError, sha256_file
from trainer.checkpoint import resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real training runs in subprocesses


def sft(*args, timeout=300):
    return subprocess.run([sys.executable, "5.full_sft.py", *map(str, args)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def common(data, out_dir):
    return ["--data_path", data, "--init_from", "none", "--out_dir", out_dir, "--run_name", "run", "--batch_size", 4,
            "--max_seq_len", 48, "--save_interval", 2, "--eval_interval", 0, "--log_interval", 1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    data = d / "sft.jsonl"
    rows = [{"conversations": [{"role": "user", "content": f"第{i}个问题"}, {"role": "assistant", "content": "回答" * (i % 5 + 1)}]}
            for i in range(32)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    r = sft(*common(data, d / "out"), "--max_steps", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, d / "out" / "run"


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "out" / "run"
    shutil.copytree(trained[1], run)
    return run


def flip_bit(path: Path, offset_from_end: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


def test_checkpoints_record_the_checksums_of_their_files(trained):
    ck = trained[1] / "checkpoints" / "step_0000004"
    rec = json.loads((ck / CHECKSUM_FILE).read_text())
    assert rec["algorithm"] == "sha256"
    assert {"model.safetensors", "optimizer.pt", "rng_rank0.pt"} <= set(rec["files"])
    w = rec["files"]["model.safetensors"]
    assert w["size"] == (ck / "model.safetensors").stat().st_size and w["sha256"] == sha256_file(ck / "model.safetensors")


def test_resume_falls_back_past_a_truncated_latest_checkpoint(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    r = sft(*common(trained[0], tmp_path / "out"), "--max_steps", 6, "--resume")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"warning: damaged checkpoint file {weights}" in out and "truncated" in out
    assert "resuming from step_0000002, the newest checkpoint that passes the check" in out
    assert "at step 2" in out and "step 6/6" in out


def test_bit_flip_is_named_by_model_load_and_by_resume(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    flip_bit(weights)
    with pytest.raises(DamagedWeightsError, match="sha256 differs") as e:
        model.load(run, device="cpu")
    assert e.value.file == str(weights)
    warnings = []
    assert resume_checkpoint(run / "checkpoints", warn=warnings.append).name == "step_0000002"
    assert str(weights) in warnings[0]
    # the previous checkpoint loads
    m, _ = model.load(run / "checkpoints" / "step_0000002", device="cpu")
    assert m is not None


def test_serving_names_the_damaged_file(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = subprocess.run([sys.executable, "-m", "serving", "--model", str(run), "--port", "1"], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"damaged checkpoint file {weights}" in r.stderr and "truncated" in r.stderr


def test_resume_without_a_checkpoint_and_with_all_damaged_is_a_message(trained, tmp_path):
    r = sft(*common(trained[0], tmp_path / "fresh"), "--max_steps", 2, "--resume")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"error: --resume: no complete checkpoint in {tmp_path / 'fresh' / 'run' / 'checkpoints'}" in r.stderr
    run = copy_run(trained, tmp_path)
    for ck in ("step_0000002", "step_0000004"):
        (run / "checkpoints" / ck / "optimizer.pt").write_bytes(b"")
    r = sft(*common(trained[0], tmp_path / "out"), "--max_steps", 6, "--resume")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"error: --resume: every checkpoint in {run / 'checkpoints'} is damaged" in r.stderr
    assert "optimizer.pt: 0 bytes" in r.stderr
