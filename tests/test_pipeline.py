"""The main job end to end: ``python pipeline.py --quick`` on the embedded data, as README says.

Checks that every stage ran as its numbered script, that the report's numbers are the ones in the
metrics files of that run, that no metric was computed on training data, and that a rerun skips
finished stages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.report import fmt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "quick"
    # --force: the run dir is new, so this only makes the data stage run even when an earlier run of
    # this checkout built data/ (the stage is then checked below like every other)
    cmd = [sys.executable, "pipeline.py", "--quick", "--force", "--run_dir", str(run_dir), "--data_dir", str(ROOT / "data"),
           "--lanes", "2", "--num_threads", "2"]  # what the default picks on 2 cores: the arms side by side
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return run_dir, proc.stdout


def test_every_stage_ran_as_its_script(quick_run):
    run_dir, out = quick_run
    for script in ("3.pretrain.py", "4.pretrain.py", "5.full_sft.py", "7.gen_prefs_openai.py", "9.train_dpo.py",
                   "evaluation.evaluate", "evaluation.report"):
        assert script in out, f"{script} not run:\n{out}"
    for arm in ("dense", "moe"):
        for stage in ("pretrain", "sft", "dpo"):
            rows = [json.loads(x) for x in (run_dir / "arms" / arm / "seed1" / stage / "metrics.jsonl").read_text().splitlines()]
            assert rows and all(r.get("loss") is None or r["loss"] == r["loss"] for r in rows)  # logged, no NaN
        pairs = (run_dir / "arms" / arm / "seed1" / "prefs" / "pairs_train.jsonl").read_text().splitlines()
        assert pairs, "no preference pairs were written"
        assert all({"prompt", "chosen", "rejected", "q", "pos", "neg"} <= set(json.loads(p)) for p in pairs)
    assert (run_dir / "report.md").is_file()
    rep = json.loads((run_dir / "report.json").read_text())
    for fig in rep["figures"]:
        png = run_dir / fig["file"]
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_two_lanes_run_the_arms_side_by_side_with_one_thread_each(quick_run):
    run_dir, out = quick_run
    assert "2 lane(s) of 1 thread(s)" in out
    lines = out.splitlines()

    def at(prefix):
        return next(i for i, x in enumerate(lines) if prefix in x)

    # both arms' pretraining started before either finished, and every trainer ran with one thread
    assert max(at("run  dense_seed1_pretrain"), at("run  moe_seed1_pretrain")) < min(
        at("done dense_seed1_pretrain"), at("done moe_seed1_pretrain")), out
    for arm in ("dense", "moe"):
        for stage in ("pretrain", "sft", "dpo"):
            log = (run_dir / "logs" / f"{arm}_seed1_{stage}.log").read_text()
            assert "(1 threads: --num_threads)" in log, (arm, stage, log[:2000])
    assert len({x.split("stage ", 1)[1].split(" ", 1)[0] for x in lines if "] stage " in x}) == len(
        [x for x in lines if "] stage " in x])  # every "stage k/N" number once


def test_budget_splits_the_minutes_over_lanes():
    import pipeline

    one, two = pipeline.budget_for(11, 2, lanes=1), pipeline.budget_for(11, 2, lanes=2)
    assert two.pretrain_minutes == pytest.approx(2 * one.pretrain_minutes, abs=0.01)
    assert pipeline.budget_for(11, 3, lanes=2).pretrain_minutes == pytest.approx(one.pretrain_minutes, abs=0.01)
    args = pipeline.parse_args(["--num_threads", "2", "--cpu"])
    assert pipeline.pick_lanes(args, 2) == (2, 1) and pipeline.pick_lanes(args, 1) == (1, 2)
    assert pipeline.pick_lanes(pipeline.parse_args(["--lanes", "1", "--cpu"]), 2)[0] == 1


def test_report_numbers_come_from_this_runs_eval_files(quick_run):
    run_dir, _ = quick_run
    rep = json.loads((run_dir / "report.json").read_text())
    rows = {(r["arm"], r["stage"], r["metric"]): r for r in rep["table"]}
    checked = 0
    for arm in ("dense", "moe"):
        for stage in ("sft", "dpo"):
            ev = json.loads((run_dir / "eval" / f"{arm}_seed1_{stage}.json").read_text())
            for metric, value in (("pretrain_loss", ev["pretrain"]["loss"]), ("sft_loss", ev["sft"]["loss"])):
                assert rows[(arm, stage, metric)]["per_seed"]["1"]["value"] == pytest.approx(value)
                checked += 1
            md = (run_dir / "report.md").read_text()
            assert fmt(ev["pretrain"]["loss"]) in md and fmt(ev["sft"]["loss"]) in md
    assert checked == 8
    forgetting = {(f["arm"], f["heldout"]) for f in rep["forgetting"]}
    assert {("dense", "pretrain"), ("dense", "sft"), ("moe", "pretrain"), ("moe", "sft")} <= forgetting


def test_no_metric_is_computed_on_training_data(quick_run):
    run_dir, _ = quick_run
    train_ids = {json.loads(x)["id"] for x in (ROOT / "data" / "embedded" / "sft_train.jsonl").read_text().splitlines()}
    for ev_file in sorted((run_dir / "eval").glob("*_seed1_*.json")):
        ev = json.loads(ev_file.read_text())
        assert ev["split"] == "test"
        for part in ("pretrain", "sft", "generation"):
            assert ev[part]["split"] == "test" and Path(ev[part]["data_file"]).name.endswith("_test.jsonl")
        gens = ev_file.with_name(ev_file.stem + "_generations.jsonl").read_text().splitlines()
        assert gens and not ({json.loads(g)["id"] for g in gens} & train_ids)


def test_rerun_skips_finished_stages(quick_run):
    run_dir, _ = quick_run
    cmd = [sys.executable, "pipeline.py", "--quick", "--run_dir", str(run_dir), "--data_dir", str(ROOT / "data"),
           "--stages", "data,pretrain,sft,prefs,dpo,eval"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run  " not in proc.stdout and proc.stdout.count("skip ") >= 13, proc.stdout


def test_last_lines_name_the_chat_command_and_show_sampled_verse(quick_run):
    run_dir, out = quick_run
    tail = out.strip().splitlines()[-6:]
    chat = [x for x in tail if "talk to the best model: python chat.py --model " in x]
    assert chat, tail
    model_dir = Path(chat[0].split("--model ", 1)[1].strip().strip("'"))
    model_dir = model_dir if model_dir.is_absolute() else ROOT / model_dir
    assert (model_dir / "config.json").is_file() and str(run_dir) in str(model_dir.resolve())
    samples = [x for x in tail if "] sample [" in x]
    assert len(samples) == 3, tail
    assert samples[0].split("sample [", 1)[1].startswith("write_poem]")  # the sampled verse answers come first
