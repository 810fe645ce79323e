"""``model.load`` / ``model.loading.resolve_model_dir``: checkpoint, trainer run, pipeline run and exported
native directories (real models and tokenizer saved to real directories)."""

from __future__ import annotations

import json

import pytest
import torch

from model import MateConvForCausalLM, get_config, load
from model.loading import resolve_checkpoint, resolve_model_dir
from tokenizer import load_tokenizer


def save_checkpoint(path, preset="mateconv-tiny", seed=0, complete=True):
    tok = load_tokenizer(None)
    torch.manual_seed(seed)
    MateConvForCausalLM(get_config(preset, vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "trainer_state.json").write_text(json.dumps({"step": 1, "complete": complete}))
    return path


def make_run(run_dir, steps=(1, 2), latest=None, preset="mateconv-tiny"):
    for s in steps:
        save_checkpoint(run_dir / "checkpoints" / f"step_{s:07d}", preset, seed=s)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{(latest or steps[-1]):07d}\n")
    return run_dir


def test_checkpoint_and_trainer_run_dirs(tmp_path):
    run = make_run(tmp_path / "run", steps=(1, 2))
    ck2 = run / "checkpoints" / "step_0000002"
    assert resolve_model_dir(ck2) == ck2
    assert resolve_model_dir(run) == ck2 == resolve_model_dir(run / "checkpoints")
    # an incomplete newest checkpoint (a save interrupted before trainer_state.json) is passed over
    save_checkpoint(run / "checkpoints" / "step_0000003", seed=3, complete=False)
    (run / "checkpoints" / "latest").write_text("step_0000003\n")
    assert resolve_model_dir(run) == ck2
    model, tok = load(run, device="cpu")
    ref = MateConvForCausalLM.from_pretrained(ck2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert not model.training and len(tok) == model.config.vocab_size
    # the trainer re-exports the same resolution (one owner)
    from trainer.checkpoint import resolve_checkpoint as trainer_resolve

    assert trainer_resolve is resolve_checkpoint


def test_pipeline_run_dir_takes_the_baseline_arm_and_the_latest_stage(tmp_path):
    pipe = tmp_path / "pipe"
    (pipe / "eval").mkdir(parents=True)
    (pipe / "run.json").write_text(json.dumps({"baseline_arm": "dense"}))
    make_run(pipe / "arms" / "dense" / "seed0" / "pretrain", steps=(1,))
    make_run(pipe / "arms" / "dense" / "seed0" / "sft", steps=(1, 2))
    make_run(pipe / "arms" / "dense" / "seed1" / "sft", steps=(5,))
    make_run(pipe / "arms" / "moe" / "seed0" / "sft", steps=(1,), preset="mateconv-moe-tiny")
    sft = pipe / "arms" / "dense" / "seed0" / "sft" / "checkpoints" / "step_0000002"
    assert resolve_model_dir(pipe) == sft
    assert resolve_model_dir(pipe / "arms" / "dense" / "seed0") == sft  # a seed directory
    (pipe / "arms" / "dense" / "seed0" / "dpo").mkdir()  # a DPO stage that has not saved yet: not taken
    assert resolve_model_dir(pipe) == sft
    make_run(pipe / "arms" / "dense" / "seed0" / "dpo", steps=(3,))
    assert resolve_model_dir(pipe) == pipe / "arms" / "dense" / "seed0" / "dpo" / "checkpoints" / "step_0000003"
    (pipe / "run.json").write_text(json.dumps({"baseline_arm": "moe"}))
    model, _ = load(pipe, device="cpu")
    assert model.config.use_moe  # the baseline named by run.json


def test_exported_native_dir_loads_and_generates_like_ours(tmp_path):
    from model.export import main as export_main
    from model.generation import decode

    run = make_run(tmp_path / "run", steps=(1,))
    export_main(["--src", str(run), "--dst", str(tmp_path / "native")])  # a run dir resolves to its checkpoint
    native, tok = load(tmp_path / "native", device="cpu")
    ours, _ = load(run, device="cpu")
    assert type(native).__name__ == "LlamaForCausalLM"
    prompt = [tok.bos_token_id] + tok("你好", add_special_tokens=False)["input_ids"]
    assert decode(native, [prompt], 8, eos_token_ids=[])[0] == decode(ours, [prompt], 8, eos_token_ids=[])[0]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model path not found: {tmp_path / 'nowhere'}"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model in .*empty: expected a model directory"):
        resolve_model_dir(tmp_path / "empty")
    (tmp_path / "pipe" / "arms" / "dense" / "seed0" / "sft").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="pipe"):
        resolve_model_dir(tmp_path / "pipe")
    with pytest.raises(SystemExit, match="error: no model in"):
        from model.export import main as export_main

        export_main(["--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "d")])
