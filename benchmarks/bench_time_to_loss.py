"""Time to loss: our ``4.pretrain.py`` recipe, run as a user runs it, vs a plain peer recipe, same wall budget.

* **ours**: ``python 4.pretrain.py --max_minutes M`` with the CPU defaults (a subprocess, its whole wall time
  from launch counts, compile time included), plus ``--keep_checkpoints 0`` so that every periodic checkpoint
  (``--save_interval``, default 100 steps) stays for scoring; extra flags with ``--ours "..."``.
* **peer**: transformers ``LlamaForCausalLM`` of the same shape and initial weights (``model.export.to_native``),
  ``torch.optim.AdamW`` lr 2e-3, betas (0.9, 0.95), weight decay 0.1, 5% warmup + cosine to 0.1x over the
  steps that fit the budget (timed probe, like ``--max_minutes``), random windows of the same ``.bin``, the
  same batch and sequence length and autocast dtype; weights snapshotted at evenly spaced times.
* Both are scored afterwards (not counted in the budget) by **one** function: held-out bits per character
  (``evaluation.bpc.HeldoutBPC``, ``--eval_docs`` seeded documents of ``pretrain_validation.jsonl``, fp32).

Prints both curves (seconds since launch -> bits/char) and two ``RATIO`` lines: the bits/char difference at the
budget (ours - peer; negative = ours better), and the time ours needs to reach the peer's final bits/char
divided by the peer's budget (floor <= 0.5; linear interpolation between our checkpoints).

``--steps N`` instead compares at a fixed number of optimizer steps (no timing claim; valid on a busy
machine), e.g. for recipe sweeps; ``--ours`` may be repeated to score several configurations of ours, and
``--no_peer`` skips the peer::

    python benchmarks/bench_time_to_loss.py --minutes 5 --threads 2
    python benchmarks/bench_time_to_loss.py --steps 300 --threads 1 --no_peer \\
        --ours "--optimizer adamw" --ours "--optimizer muon"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PEER = {"lr": 2e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "warmup": 0.05, "min_ratio": 0.1}


def scorer(tokenizer, path: str, n: int, seq: int):
    from evaluation.bpc import HeldoutBPC

    h = HeldoutBPC(tokenizer, path, n=n, seed=0, max_seq_len=seq, batch_size=32)

    def score(model) -> float:
        with torch.no_grad():
            return float(h.evaluate(model, torch.device("cpu"))["bpc"])

    return score, h.describe()


# ------------------------------------------------------------------------------------------ ours


def run_ours(extra: list[str], args, out: Path, budget_s: float | None) -> list[tuple[float, Path]]:
    """Run 4.pretrain.py as a user would; -> [(seconds since launch, checkpoint dir)]."""
    cmd = [sys.executable, "4.pretrain.py", "--model", args.preset, "--out_dir", str(out), "--run_name", "ours",
           "--keep_checkpoints", "0", "--num_threads", str(args.threads), "--data_path", args.bin]
    if budget_s is not None:
        cmd += ["--max_minutes", f"{budget_s / 60:g}"]
    else:
        cmd += ["--max_steps", str(args.steps), "--save_interval", str(max(1, args.steps // args.points))]
    cmd += extra
    print("ours:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"4.pretrain.py exited {p.returncode}:\n{log[-3000:]}")
    for line in log.splitlines():
        if "optimizer steps" in line or "precision" in line or "done:" in line:
            print("  " + line.split("] ", 1)[-1], flush=True)
    ckpts = sorted((out / "ours" / "checkpoints").glob("step_*"))
    points = [((c / "trainer_state.json").stat().st_mtime - t0, c) for c in ckpts]
    print(f"  wall {wall:.1f} s, {len(points)} checkpoints", flush=True)
    return points


# ------------------------------------------------------------------------------------------ peer


def run_peer(args, budget_s: float | None, dtype) -> list[tuple[float, dict]]:
    """The peer recipe in this process; -> [(seconds since its start, state dict snapshot)]."""
    from model import MateConvForCausalLM, get_config
    from model.export import to_native
    from trainer.schedule import lr_at

    t_start = time.time()
    torch.manual_seed(args.seed)
    model = to_native(MateConvForCausalLM(get_config(args.preset))).train()
    side = json.loads(Path(args.bin).with_suffix(".json").read_text())
    data = np.memmap(args.bin, dtype=np.dtype(side["dtype"]), mode="r")
    rng = np.random.default_rng(args.seed)
    B, T = args.batch, args.seq

    def batch():
        off = rng.integers(0, len(data) - T - 1, size=B)
        w = torch.from_numpy(np.stack([data[o:o + T + 1].astype(np.int64) for o in off]))
        return w[:, :-1], w[:, 1:]

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": PEER["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=PEER["lr"], betas=PEER["betas"], fused=True)
    from model.losses import nll_sum

    def step(k: int, total: int):
        w = max(1, round(PEER["warmup"] * total))
        for g in opt.param_groups:
            g["lr"] = lr_at(k, total, PEER["lr"], w, PEER["min_ratio"])
        x, y = batch()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=x).logits
        s, n = nll_sum(logits, y)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if budget_s is not None:  # time a probe on a copy (weights, optimizer and data stream untouched)
        import copy

        saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), rng.bit_generator.state
        times = []
        for k in range(3):
            t0 = time.perf_counter()
            step(k, 1000)
            times.append(time.perf_counter() - t0)
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        rng.bit_generator.state = saved[2]
        left = budget_s - (time.time() - t_start)
        total = max(1, int(left / float(np.median(times[1:]))))
    else:
        total = args.steps
    marks = ([budget_s * (i + 1) / args.points for i in range(args.points)] if budget_s is not None else
             [total * (i + 1) // args.points for i in range(args.points)])
    snaps, k = [], 0
    while k < total:
        step(k, total)
        k += 1
        now = time.time() - t_start
        last = k == total or (budget_s is not None and now >= budget_s)
        due = last or len(snaps) < len(marks) and (now >= marks[len(snaps)] if budget_s is not None
                                                   else k >= marks[len(snaps)])
        if due:
            snaps.append((now, {n: v.detach().clone() for n, v in model.state_dict().items()}))
        if last:
            break
    print(f"peer: LlamaForCausalLM {args.preset} shape, AdamW lr {PEER['lr']:g} betas {PEER['betas']} wd "
          f"{PEER['weight_decay']}, 5% warmup + cosine to 0.1x over {total} steps; ran {k} steps in "
          f"{time.time() - t_start:.1f} s ({k * B * T / (time.time() - t_start):,.0f} tokens/s)", flush=True)
    peer_model = model
    return [(t, sd) for t, sd in snaps], peer_model


# ------------------------------------------------------------------------------------------ main


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time (linear interpolation) at which the curve is at or below ``target``; None if never."""
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return t
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
        prev = (t, v)
    return None


def value_at(curve: list[tuple[float, float]], t: float) -> float:
    """The curve at time ``t`` (linear interpolation; the last point at or before ``t`` past the end)."""
    before = [(a, v) for a, v in curve if a <= t]
    after = [(a, v) for a, v in curve if a > t]
    if not before:
        return curve[0][1]
    if not after:
        return before[-1][1]
    (t0, v0), (t1, v1) = before[-1], after[0]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall budget of each recipe")
    ap.add_argument("--steps", type=int, default=0, help="compare at this many optimizer steps instead (no timing)")
    ap.add_argument("--preset", default="mateconv-tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16,
                    help="peer batch (the peer recipe is 16 x 128; ours runs its CPU default, 32)")
    ap.add_argument("--seq", type=int, default=128, help="peer sequence length (our CPU default, 128)")
    ap.add_argument("--bin", default="data/pretrain/pretrain_train.bin")
    ap.add_argument("--eval_path", default="data/embedded/pretrain_validation.jsonl")
    ap.add_argument("--eval_docs", type=int, default=400)
    ap.add_argument("--points", type=int, default=6, help="peer snapshots (ours: its checkpoints)")
    ap.add_argument("--ours", action="append", default=None, help="extra flags for 4.pretrain.py (repeatable)")
    ap.add_argument("--no_peer", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    torch.set_num_threads(args.threads)
    from trainer.distributed import keep_freed_memory

    keep_freed_memory()  # the peer trains in this process: the same malloc setting as our trainer's
    if not Path(args.bin).is_file():
        subprocess.run([sys.executable, "3.pretrain.py"], cwd=ROOT, check=True)
    from transformers.utils import logging as hf_logging

    from model import MateConvForCausalLM
    from tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()
    from trainer.trainer import resolve_dtype

    dtype, note = resolve_dtype("auto", torch.device("cpu"))
    budget = None if args.steps else args.minutes * 60.0
    score, desc = scorer(load_tokenizer(None), args.eval_path, args.eval_docs, args.seq)
    import subprocess as sp

    cpu = sp.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
    print(f"machine: {cpu}; {os.cpu_count()} CPUs, {args.threads} threads; autocast: {note}")
    print(f"scoring: {desc} (fp32)")
    print(f"budget: {args.minutes:.1f} min each" if budget else f"fixed: {args.steps} optimizer steps each")
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, extra in enumerate(args.ours or [""]):
            name = "ours" + (f"[{extra}]" if extra else "")
            points = run_ours(shlex.split(extra), args, Path(tmp) / f"ours{i}", budget)
            curve = []
            for t, ck in points:
                m = MateConvForCausalLM.from_pretrained(str(ck)).float()
                curve.append((t, score(m)))
            curves[name] = curve
    if not args.no_peer:
        snaps, peer_model = run_peer(args, budget, dtype)
        curve = []
        for t, sd in snaps:
            peer_model.load_state_dict(sd)
            curve.append((t, score(peer_model.float())))
        curves["peer"] = curve
    unit = "s" if budget else "s (not comparable: fixed steps)"
    for name, curve in curves.items():
        print(f"curve {name}: " + ", ".join(f"{t:.0f}{unit[0]}:{v:.3f}" for t, v in curve))
    if "peer" in curves:
        peer_final = curves["peer"][-1][1]
        for name, curve in curves.items():
            if name == "peer":
                continue
            at = value_at(curve, budget) if budget else curve[-1][1]
            diff = at - peer_final
            print(f"RATIO {name} bits/char at the {'budget' if budget else 'last step'} - peer = {diff:+.3f} "
                  f"({at:.3f} vs {peer_final:.3f}; negative: ours better"
                  + (f"; ours' run took {curve[-1][0]:.0f} s, its last point {curve[-1][1]:.3f}" if budget else "")
                  + ")")
            if budget:
                t = time_to_reach(curve, peer_final)
                print(f"RATIO {name} time to the peer's final bits/char / peer budget = "
                      + (f"{t / budget:.2f} (floor <= 0.5)" if t is not None else
                         f"> {curve[-1][0] / budget:.2f} (not reached; floor <= 0.5)"))
    else:
        for name, curve in curves.items():
            print(f"RESULT {name}: bits/char {curve[-1][1]:.3f} at the last checkpoint")
    if any(math.isnan(v) for c in curves.values() for _, v in c):
        raise SystemExit("a score is NaN")


if __name__ == "__main__":
    main()
