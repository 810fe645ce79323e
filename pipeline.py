"""The main job: every MateConv stage on the embedded corpus, then the report.

    python pipeline.py                     # dense vs compute-matched MoE, 1 seed, an 11-minute budget (2 CPU cores)
    python pipeline.py --minutes 60        # the same job with a 60-minute budget (time split the same way)
    python pipeline.py --quick             # the same chain with tiny step budgets (CI smoke run, about 2 min)
    python pipeline.py --seeds 3           # repeats; the report gives mean ± spread across seeds
    python pipeline.py --arms dense,moe,moe-0.1b --stages pretrain,sft
    python pipeline.py --force             # rerun stages that already finished

Budgets are wall-clock time: ``--minutes`` is split over the arms and seeds, and within each arm most of it goes
to pretraining, then SFT (``--max_minutes`` of the trainer stages); preference generation and evaluation are
sized by counts that scale with the budget. Progress lines give stage k/N, the elapsed time and an ETA.

On CPU the arms' chains run side by side in ``--lanes`` lanes (default: one per free core, at most one per arm
and seed), each stage of a lane with ``cores / lanes`` torch threads: the small models of the demo use one core
far better than two (mateconv-tiny trains at ~6.4k tokens/s on one core and ~9.3k on two, so two lanes give each
arm twice the wall time at ~0.7x the rate).

Each stage runs as the user would run it by hand (``python 4.pretrain.py ...``) in a subprocess whose
output goes to ``<run_dir>/logs/``; the exact command line is printed first. A stage that finished
(stamp file ``<stage dir>/.done``) is skipped on rerun, so an interrupted job resumes where it stopped.
Results: ``<run_dir>/report.md`` (+ ``figures/*.png``, ``report.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ALL_STAGES = ("data", "pretrain", "sft", "prefs", "dpo", "eval", "report")
ARMS = {  # arm name -> model preset
    "dense": "mateconv-tiny",
    "moe": "mateconv-moe-tiny",
    "moe-0.1b": "mateconv-moe-0.1b",
}


@dataclass(frozen=True)
class Budget:
    """Budgets of one pipeline size. Training stages are limited by steps (``--quick``, deterministic for CI)
    or by wall time (``*_minutes``: ``--max_minutes`` of the trainer, which fixes its step count after a short
    warm-up); preference generation and evaluation by counts."""

    max_seq_len: int
    pretrain_batch: int
    sft_batch: int
    dpo_batch: int
    pref_prompts: int
    pref_eval_prompts: int
    eval_examples: int
    eval_items: int
    eval_new_tokens: int
    eval_interval: int
    log_interval: int
    bpc_items: int = 200
    mc_items: int = 100
    verse_examples: int = 40
    verse_new_tokens: int = 80  # a 七言律诗 answer is up to ~70 tokens
    pairs_items: int = 100
    pretrain_steps: int = 0  # > 0: a step budget instead of minutes
    sft_steps: int = 0
    dpo_steps: int = 0
    pretrain_minutes: float = 0.0
    sft_minutes: float = 0.0
    dpo_minutes: float = 0.0
    sft_train_limit: int = 0  # 0: the whole SFT train split; else its first N conversations (smoke runs)


DEFAULT_MINUTES = 11.0
# Share of one arm's time (its part of --minutes) per stage. Pretraining is where a small model learns most per
# CPU-minute; what is not given to the trainers goes to preference generation, evaluation and process start-up,
# whose cost is set by the counts below (measured on 2 cores: see README "The main job").
TIME_SHARES = {"pretrain": 0.63, "sft": 0.19, "dpo": 0.04}
# SFT recipe of the job (measured: benchmarks/README.md, "SFT recipe"): Muon as in pretraining, at a quarter of its
# rate, AdamW 1e-3 on the rest, and pretraining windows mixed in (a fraction SFT_REPLAY_RATIO of the items,
# `--replay_path`) so that the fine-tuned model keeps what pretraining taught it; batches grouped by length
# (`--group_by_length`: short answers no longer padded to the 128-token replay windows beside them).
SFT_FLAGS = ("--optimizer", "muon", "--muon_lr", 0.005, "--learning_rate", 1e-3)
SFT_REPLAY_RATIO = 0.3
PLANNED_SHARES = {"pretrain": 0.64, "sft": 0.22, "prefs": 0.05, "dpo": 0.05, "eval": 0.08}  # for the ETA


def budget_for(minutes: float, n_units: int, lanes: int = 1) -> Budget:
    """The time-budgeted job: ``minutes`` of wall time for ``n_units`` (arms x seeds) chains run ``lanes`` at a
    time."""
    unit = minutes / max(1, -(-n_units // max(1, lanes)))  # each lane runs ceil(n_units / lanes) chains
    scale = min(8.0, max(0.5, minutes / DEFAULT_MINUTES))  # counts grow with the budget, up to 8x
    return Budget(max_seq_len=128, pretrain_batch=32, sft_batch=32, dpo_batch=8,
                  pref_prompts=int(240 * scale), pref_eval_prompts=int(120 * min(scale, 2.0)),
                  eval_examples=int(40 * min(scale, 3.0)), eval_items=int(200 * min(scale, 3.0)),
                  eval_new_tokens=48, eval_interval=0, log_interval=20,
                  bpc_items=int(200 * min(scale, 5.0)), mc_items=int(min(200, 100 * scale)),
                  verse_examples=int(40 * min(scale, 3.0)), verse_new_tokens=80, pairs_items=int(100 * min(scale, 3.0)),
                  pretrain_minutes=round(unit * TIME_SHARES["pretrain"], 2),
                  sft_minutes=round(unit * TIME_SHARES["sft"], 2), dpo_minutes=round(unit * TIME_SHARES["dpo"], 2))


QUICK = Budget(max_seq_len=64, pretrain_steps=20, pretrain_batch=8, sft_steps=10, sft_batch=8,
               pref_prompts=24, pref_eval_prompts=16, dpo_steps=6, dpo_batch=4,
               eval_examples=16, eval_items=24, eval_new_tokens=16, eval_interval=10, log_interval=2,
               bpc_items=32, mc_items=16, verse_examples=4, verse_new_tokens=24, pairs_items=16,
               sft_train_limit=2000)


def fmt_minutes(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def log(msg: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Progress:
    """Stage k/N, elapsed time and an ETA for the whole job: the planned seconds of the stages still to run,
    scaled by how the finished ones compared with their plan once they make up a tenth of it (a 10 s data
    stage that took 19 s says nothing about stages whose budgets are wall time)."""

    def __init__(self, planned: dict[str, float], lanes: int = 1):
        self.planned, self.t0, self.lanes = dict(planned), time.time(), max(1, lanes)
        self.done: dict[str, float] = {}
        self.started = 0

    def start(self, name: str) -> None:
        self.started += 1
        k = self.started
        log(f"stage {k}/{len(self.planned)} {name} (elapsed {fmt_minutes(time.time() - self.t0)})")

    def skip(self, name: str) -> None:
        self.started += 1
        self.done[name] = 0.0
        self.planned[name] = 0.0

    def finish(self, name: str, seconds: float) -> str:
        self.done[name] = seconds
        plan_done = sum(self.planned.get(n, 0.0) for n in self.done)
        trusted = plan_done >= 0.1 * sum(self.planned.values())
        pace = sum(self.done.values()) / plan_done if trusted and plan_done > 0 else 1.0
        left = pace * sum(v for n, v in self.planned.items() if n not in self.done) / self.lanes
        return f"(elapsed {fmt_minutes(time.time() - self.t0)}, ETA {fmt_minutes(left)})"


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.budget = QUICK  # set for the chosen arms and seeds in main()
        self.run_dir = Path(args.run_dir).resolve()
        self.data_dir = Path(args.data_dir).resolve()
        self.embedded = self.data_dir / "embedded"
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.setdefault("WANDB_MODE", "offline")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if args.num_threads:  # every stage, the trainers through --num_threads and the others through OpenMP
            self.env["OMP_NUM_THREADS"] = str(args.num_threads)
        self.timings: dict[str, float] = {}
        self.progress = Progress({})
        self.lanes, self.lane_threads = 1, args.num_threads
        self.lock = threading.Lock()  # lanes share the timings, the progress and the log
        self.local = threading.local()  # this lane's environment
        self.failed = threading.Event()  # a stage of another lane failed: start no new stage

    # -- running a stage ---------------------------------------------------------------------------
    def run(self, name: str, cmd: list[str], stamp: Path | None, key: str = "") -> None:
        """Run one stage command unless its stamp file exists (with the same ``key``, when given);
        its output goes to logs/<name>.log."""
        cmd = [str(c) for c in cmd]
        if self.failed.is_set():
            raise SystemExit(f"pipeline: {name} not started (a stage of another lane failed)")
        if stamp is not None and stamp.exists() and not self.args.force and self._stamp_key(stamp) == key:
            with self.lock:
                log(f"skip {name} (finished earlier: {stamp})")
                self.progress.skip(name)
            return
        log_path = self.logs / f"{name}.log"
        with self.lock:
            log(f"run  {name}: {shlex.join(cmd)}  > {log_path}")
            self.progress.start(name)
        t0 = time.time()
        with open(log_path, "w", encoding="utf-8") as out:
            proc = subprocess.run(cmd, cwd=ROOT, env=getattr(self.local, "env", self.env), stdout=out,
                                  stderr=subprocess.STDOUT)
        dt = time.time() - t0
        if proc.returncode != 0:
            self.failed.set()
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
            with self.lock:
                print("\n".join("    " + line for line in tail), flush=True)
            raise SystemExit(f"pipeline: stage {name} failed (exit {proc.returncode}); full log: {log_path}")
        if stamp is not None:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps({"seconds": round(dt, 1), "command": cmd, "key": key}) + "\n",
                             encoding="utf-8")
        with self.lock:
            self.timings[name] = round(dt, 1)
            log(f"done {name} in {dt:.0f}s  {self.progress.finish(name, dt)}")

    @staticmethod
    def _stamp_key(stamp: Path) -> str:
        try:
            return json.loads(stamp.read_text(encoding="utf-8")).get("key", "")
        except (OSError, ValueError):
            return "<unreadable stamp>"

    def py(self, script: str, *args) -> list:
        return [sys.executable, script, *args]

    # -- stages ------------------------------------------------------------------------------------
    def stage_data(self) -> None:
        """Stage 3 on the embedded corpus; rebuilt when the corpus or the tokenizer changed."""
        from dataset.embedded import GENERATOR_VERSION, corpus_hash
        from tokenizer import load_tokenizer, tokenizer_fingerprint

        key = (f"corpus {corpus_hash()[:16]} derivation v{GENERATOR_VERSION} "
               f"tokenizer {tokenizer_fingerprint(load_tokenizer())}")
        self.run("data", self.py("3.pretrain.py", "--embedded_dir", self.embedded,
                                 "--out_dir", self.data_dir / "pretrain"),
                 self.data_dir / "pretrain" / ".done", key)

    def common_train_flags(self, seed: int) -> list:
        b = self.budget
        flags = ["--max_seq_len", b.max_seq_len, "--seed", seed, "--log_interval", b.log_interval,
                 "--eval_interval", b.eval_interval, "--save_interval", 10_000, "--device", "cpu"
                 if self.args.cpu else "auto", "--overwrite"]  # a stage without its stamp starts afresh
        if self.lane_threads:
            flags += ["--num_threads", self.lane_threads]
        return flags

    def limit_flags(self, stage: str) -> list:
        """A stage's length: its step budget (``--quick``) or its share of the wall-time budget."""
        steps = getattr(self.budget, f"{stage}_steps")
        if steps:
            return ["--max_steps", steps]
        return ["--max_minutes", getattr(self.budget, f"{stage}_minutes")]

    def arm_dir(self, arm: str, seed: int) -> Path:
        return self.run_dir / "arms" / arm / f"seed{seed}"

    def stage_pretrain(self, arm: str, seed: int) -> None:
        b, d = self.budget, self.arm_dir(arm, seed)
        self.run(f"{arm}_seed{seed}_pretrain", self.py(
            "4.pretrain.py", "--model", ARMS[arm], "--out_dir", d, "--run_name", "pretrain",
            "--data_path", self.data_dir / "pretrain" / "pretrain_train.bin",
            *self.limit_flags("pretrain"), "--batch_size", b.pretrain_batch, "--accumulation_steps", 1,
            *self.common_train_flags(seed)), d / "pretrain" / ".done")  # the trainer's CPU recipe (Muon + AdamW)

    def sft_train_file(self) -> Path:
        """The SFT train split, or (quick runs) a prefix of it, so tokenizing 85k conversations is not timed."""
        full = self.embedded / "sft_train.jsonl"
        n = self.budget.sft_train_limit
        if not n:
            return full
        subset = self.run_dir / "data" / f"sft_train_first{n}.jsonl"
        if not subset.exists():
            subset.parent.mkdir(parents=True, exist_ok=True)
            with open(full, encoding="utf-8") as src:
                lines = [line for _, line in zip(range(n), src)]
            tmp = subset.with_suffix(".tmp")
            tmp.write_text("".join(lines), encoding="utf-8")
            tmp.replace(subset)
        return subset

    def stage_sft(self, arm: str, seed: int) -> None:
        b, d = self.budget, self.arm_dir(arm, seed)
        self.run(f"{arm}_seed{seed}_sft", self.py(
            "5.full_sft.py", "--init_from", d / "pretrain", "--out_dir", d, "--run_name", "sft",
            "--data_path", self.sft_train_file(),
            *self.limit_flags("sft"), "--batch_size", b.sft_batch, "--accumulation_steps", 1,
            *SFT_FLAGS, "--warmup_ratio", 0.05, "--group_by_length",
            "--replay_path", self.data_dir / "pretrain" / "pretrain_train.bin", "--replay_ratio", SFT_REPLAY_RATIO,
            *self.common_train_flags(seed)), d / "sft" / ".done")

    def stage_prefs(self, arm: str, seed: int) -> None:
        b, d = self.budget, self.arm_dir(arm, seed)
        for split, n in (("train", b.pref_prompts), ("validation", b.pref_eval_prompts)):
            self.run(f"{arm}_seed{seed}_prefs_{split}", self.py(
                "7.gen_prefs_openai.py", "--generator", "local", "--model_dir", d / "sft",
                "--judge", "reference", "--prompts", self.embedded / f"prefs_prompts_{split}.jsonl",
                "--n_prompts", n, "--k_samples", 4, "--seed", seed, "--gen_temperature", 1.0,
                "--gen_max_tokens", 64 if not self.args.quick else 24, "--progress", "false",
                "--out_path", d / "prefs" / f"pairs_{split}.jsonl"), d / "prefs" / f".{split}.done")

    def stage_dpo(self, arm: str, seed: int) -> None:
        b, d = self.budget, self.arm_dir(arm, seed)
        self.run(f"{arm}_seed{seed}_dpo", self.py(
            "9.train_dpo.py", "--init_from", d / "sft", "--out_dir", d, "--run_name", "dpo",
            "--pairs_path", d / "prefs" / "pairs_train.jsonl",
            "--eval_pairs_path", d / "prefs" / "pairs_validation.jsonl",
            "--probe_pretrain_path", self.data_dir / "pretrain" / "pretrain_validation.bin",
            "--probe_sft_path", self.embedded / "sft_validation.jsonl",
            *self.limit_flags("dpo"), "--batch_size", b.dpo_batch, "--accumulation_steps", 1,
            "--learning_rate", 1e-4, "--warmup_ratio", 0.1, "--precompute_ref",
            *self.common_train_flags(seed)), d / "dpo" / ".done")

    def stage_eval(self, arm: str, seed: int) -> None:
        b, d = self.budget, self.arm_dir(arm, seed)
        for stage in ("sft", "dpo"):
            if not (d / stage).exists():
                continue
            out = self.run_dir / "eval" / f"{arm}_seed{seed}_{stage}.json"
            self.run(f"{arm}_seed{seed}_eval_{stage}", [
                sys.executable, "-m", "evaluation.evaluate", "--checkpoint", d / stage, "--split", "test",
                "--data_dir", self.embedded, "--pretrain_file", self.data_dir / "pretrain" / "pretrain_test.bin"
                if (self.data_dir / "pretrain" / "pretrain_test.bin").exists() else self.embedded / "pretrain_test.jsonl",
                "--max_examples", b.eval_examples, "--max_items", b.eval_items, "--batch_size", 16,
                "--max_new_tokens", b.eval_new_tokens, "--bpc_items", b.bpc_items, "--mc_items", b.mc_items,
                "--verse_examples", b.verse_examples,
                "--verse_new_tokens", b.verse_new_tokens, "--pairs_items", b.pairs_items,
                "--max_seq_len", b.max_seq_len, "--seed", seed, "--out", out], out.with_suffix(".done"))

    def stage_report(self) -> None:
        run_json = {"baseline_arm": self.arms[0], "max_seq_len": self.budget.max_seq_len,
                    "seeds": self.seeds, "arms": {a: ARMS[a] for a in self.arms},
                    "quick": bool(self.args.quick), "stage_seconds": self.timings,
                    "tokens_per_step": {"pretrain": self.budget.pretrain_batch * self.budget.max_seq_len,
                                        "sft": self.budget.sft_batch * self.budget.max_seq_len,
                                        "dpo": 2 * self.budget.dpo_batch * self.budget.max_seq_len}}
        (self.run_dir / "run.json").write_text(json.dumps(run_json, indent=2) + "\n", encoding="utf-8")
        self.run("report", [sys.executable, "-m", "evaluation.report", "--run_dir", self.run_dir], None)

    # -- driver ------------------------------------------------------------------------------------
    def main(self) -> int:
        a = self.args
        self.arms = [s.strip() for s in a.arms.split(",") if s.strip()]
        unknown = [x for x in self.arms if x not in ARMS]
        if unknown:
            raise SystemExit(f"pipeline: unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
        self.seeds = [a.seed + i for i in range(a.seeds)]
        stages = ALL_STAGES if a.stages == "all" else tuple(s.strip() for s in a.stages.split(","))
        bad = [s for s in stages if s not in ALL_STAGES]
        if bad:
            raise SystemExit(f"pipeline: unknown stage(s) {bad}; choose from {', '.join(ALL_STAGES)}")
        n_units = len(self.arms) * len(self.seeds)
        self.lanes, self.lane_threads = pick_lanes(a, n_units)
        self.budget = QUICK if a.quick else budget_for(a.minutes, n_units, self.lanes)
        self.progress = Progress(self.plan(stages, n_units), lanes=self.lanes)
        t0 = time.time()
        budget = "quick (step) budget" if a.quick else f"{a.minutes:g}-minute budget"
        log(f"run dir {self.run_dir}; arms {self.arms}; seeds {self.seeds}; stages {list(stages)}; {budget}; "
            f"{len(self.progress.planned)} stage commands; {self.lanes} lane(s)"
            + (f" of {self.lane_threads} thread(s)" if self.lane_threads else ""))
        if "data" in stages:
            self.stage_data()
        units = [(arm, seed) for seed in self.seeds for arm in self.arms]
        chain = [st for st in ("pretrain", "sft", "prefs", "dpo", "eval") if st in stages]
        if self.lanes == 1:
            for arm, seed in units:
                self.run_chain(arm, seed, chain)
        else:
            with ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="lane") as pool:
                futures = [pool.submit(self.run_chain, arm, seed, chain) for arm, seed in units]
                errors = []
                for f in futures:
                    try:
                        f.result()
                    except SystemExit as e:  # the first failure is the cause; later ones say "not started"
                        errors.append(e)
                if errors:
                    raise errors[0]
        if "report" in stages:
            self.stage_report()
        log(f"finished in {fmt_minutes(time.time() - t0)}")
        if "report" in stages:
            log(f"report: {self.run_dir / 'report.md'}")
        self.print_meet_the_model()
        return 0

    def run_chain(self, arm: str, seed: int, chain: list[str]) -> None:
        """One arm and seed through the training and evaluation stages, in this lane's environment."""
        self.local.env = dict(self.env)
        if self.lane_threads:
            self.local.env["OMP_NUM_THREADS"] = str(self.lane_threads)
        for stage in chain:
            getattr(self, f"stage_{stage}")(arm, seed)

    def plan(self, stages, n_units: int) -> dict[str, float]:
        """Planned seconds of every stage command, in run order (for the ETA)."""
        rounds = -(-n_units // self.lanes)
        unit = (self.args.minutes * 60 / rounds) if not self.args.quick else 20.0
        per_stage = {"pretrain": ["pretrain"], "sft": ["sft"], "prefs": ["prefs_train", "prefs_validation"],
                     "dpo": ["dpo"], "eval": ["eval_sft", "eval_dpo"]}
        planned = {"data": 10.0} if "data" in stages else {}
        for seed in self.seeds:
            for arm in self.arms:
                for stage, names in per_stage.items():
                    if stage in stages:
                        for name in names:
                            planned[f"{arm}_seed{seed}_{name}"] = unit * PLANNED_SHARES[stage] / len(names)
        if "report" in stages:
            planned["report"] = 15.0
        return planned

    def best_checkpoint(self) -> tuple[Path | None, dict]:
        """The SFT (or DPO) checkpoint with the lowest held-out bits per character on pretraining text (falling
        back to nats per token), and its evaluation record."""
        best, best_key, best_ev = None, None, {}
        for ev_file in sorted((self.run_dir / "eval").glob("*_seed*_*.json")):
            try:
                ev = json.loads(ev_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            pre = ev.get("pretrain") or {}
            key = pre.get("bpc", pre.get("loss"))
            ckpt = ev.get("checkpoint")
            if key is None or not ckpt:
                continue
            if best_key is None or key < best_key:
                best, best_key, best_ev = Path(ckpt), key, ev | {"_file": str(ev_file)}
        return best, best_ev

    def print_meet_the_model(self) -> None:
        """The last lines: the chat command for the best checkpoint and three of its held-out samples."""
        best, ev = self.best_checkpoint()
        if best is None:
            return
        try:
            best = best.relative_to(ROOT)
        except ValueError:
            pass
        log(f"talk to the best model: python chat.py --model {shlex.quote(str(best))}")
        stem = Path(ev["_file"])
        rows = []  # the sampled verse answers first (write_poem, continue_line), then the greedy answers of other tasks
        for suffix in ("_verse.jsonl", "_generations.jsonl"):
            f = stem.with_name(stem.stem + suffix)
            if f.is_file():
                rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        by_task: dict[str, dict] = {}
        for row in rows:  # one sample per task kind, the first three kinds
            by_task.setdefault(str(row.get("task", "")), row)
        for row in list(by_task.values())[:3]:
            prompt = str(row.get("prompt", "")).split("user\n")[-1].split("</s>")[0].replace("\n", " ")[:60]
            answer = str(row.get("prediction", "")).replace("\n", " / ")[:80]
            log(f"sample [{row.get('task', '?')}] {prompt} -> {answer}")


def pick_lanes(args, n_units: int) -> tuple[int, int]:
    """-> (lanes, torch threads per stage; 0 = the stage picks). ``--lanes`` when > 0; else on CPU one lane per
    core (of ``--num_threads`` or this process's CPU affinity), at most ``n_units``; on a GPU one lane."""
    cores = args.num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else os.cpu_count() or 1)
    lanes = args.lanes
    if lanes <= 0:
        from model.loading import default_device

        on_gpu = not args.cpu and default_device() == "cuda"
        lanes = 1 if on_gpu else max(1, min(n_units, cores))
    lanes = max(1, min(lanes, n_units))
    if lanes == 1:
        return 1, args.num_threads
    return lanes, max(1, cores // lanes)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny step budgets (CI smoke run, about 2 minutes)")
    ap.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                    help="target wall time of the whole job, split over arms and seeds; within an arm most "
                         f"goes to pretraining, then SFT [{DEFAULT_MINUTES:g}]")
    ap.add_argument("--num_threads", type=int, default=0,
                    help="torch threads of every stage (0: each stage picks from the free cores)")
    ap.add_argument("--lanes", type=int, default=0,
                    help="arm/seed chains run side by side, each stage with cores/lanes threads (0: one per core "
                         "on CPU, at most one per arm and seed; 1 on a GPU) [0]")
    ap.add_argument("--arms", default="dense,moe", help=f"comma list of {', '.join(ARMS)} (first = baseline)")
    ap.add_argument("--seeds", type=int, default=1, help="number of repeats (seeds seed, seed+1, ...)")
    ap.add_argument("--seed", type=int, default=1, help="first seed")
    ap.add_argument("--stages", default="all", help=f"'all' or a comma list of {', '.join(ALL_STAGES)}")
    ap.add_argument("--run_dir", default=None, help="[runs/main, or runs/quick with --quick]")
    ap.add_argument("--data_dir", default="data", help="embedded data and the pretraining .bin files")
    ap.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    ap.add_argument("--force", action="store_true", help="rerun stages that already finished")
    args = ap.parse_args(argv)
    if args.run_dir is None:
        args.run_dir = "runs/quick" if args.quick else "runs/main"
    return args


if __name__ == "__main__":
    sys.exit(Pipeline(parse_args()).main())
