"""The main job: every MateConv stage on the embedded corpus, then the report.

    python pipeline.py                     # dense vs compute-matched MoE, 1 seed, ~15 min on 2 CPU cores
    python pipeline.py --quick             # the same chain with tiny budgets (CI, under 3 min)
    python pipeline.py --seeds 3           # repeats; the report gives mean ± spread across seeds
    python pipeline.py --arms dense,moe,moe-0.1b --stages pretrain,sft
    python pipeline.py --force             # rerun stages that already finished

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
import time
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
    """Step and sample budgets of one pipeline size (the only knobs that differ between sizes)."""

    max_seq_len: int
    pretrain_steps: int
    pretrain_batch: int
    sft_steps: int
    sft_batch: int
    pref_prompts: int
    pref_eval_prompts: int
    dpo_steps: int
    dpo_batch: int
    eval_examples: int
    eval_items: int
    eval_new_tokens: int
    eval_interval: int
    log_interval: int
    sft_train_limit: int = 0  # 0: the whole SFT train split; else its first N conversations (smoke runs)


FULL = Budget(max_seq_len=128, pretrain_steps=160, pretrain_batch=16, sft_steps=100, sft_batch=16,
              pref_prompts=240, pref_eval_prompts=120, dpo_steps=40, dpo_batch=8,
              eval_examples=120, eval_items=200, eval_new_tokens=32, eval_interval=40, log_interval=10)
QUICK = Budget(max_seq_len=64, pretrain_steps=20, pretrain_batch=8, sft_steps=10, sft_batch=8,
               pref_prompts=24, pref_eval_prompts=16, dpo_steps=6, dpo_batch=4,
               eval_examples=16, eval_items=24, eval_new_tokens=16, eval_interval=10, log_interval=2,
               sft_train_limit=2000)


def log(msg: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.budget = QUICK if args.quick else FULL
        self.run_dir = Path(args.run_dir).resolve()
        self.data_dir = Path(args.data_dir).resolve()
        self.embedded = self.data_dir / "embedded"
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.setdefault("WANDB_MODE", "offline")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.timings: dict[str, float] = {}

    # -- running a stage ---------------------------------------------------------------------------
    def run(self, name: str, cmd: list[str], stamp: Path | None, key: str = "") -> None:
        """Run one stage command unless its stamp file exists (with the same ``key``, when given);
        its output goes to logs/<name>.log."""
        cmd = [str(c) for c in cmd]
        if stamp is not None and stamp.exists() and not self.args.force and self._stamp_key(stamp) == key:
            log(f"skip {name} (finished earlier: {stamp})")
            return
        log_path = self.logs / f"{name}.log"
        log(f"run  {name}: {shlex.join(cmd)}  > {log_path}")
        t0 = time.time()
        with open(log_path, "w", encoding="utf-8") as out:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        dt = time.time() - t0
        self.timings[name] = round(dt, 1)
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
            print("\n".join("    " + line for line in tail), flush=True)
            raise SystemExit(f"pipeline: stage {name} failed (exit {proc.returncode}); full log: {log_path}")
        if stamp is not None:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps({"seconds": round(dt, 1), "command": cmd, "key": key}) + "\n",
                             encoding="utf-8")
        log(f"done {name} in {dt:.0f}s")

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
        return ["--max_seq_len", b.max_seq_len, "--seed", seed, "--log_interval", b.log_interval,
                "--eval_interval", b.eval_interval, "--save_interval", 10_000, "--device", "cpu"
                if self.args.cpu else "auto"]

    def arm_dir(self, arm: str, seed: int) -> Path:
        return self.run_dir / "arms" / arm / f"seed{seed}"

    def stage_pretrain(self, arm: str, seed: int) -> None:
        b, d = self.budget, self.arm_dir(arm, seed)
        self.run(f"{arm}_seed{seed}_pretrain", self.py(
            "4.pretrain.py", "--model", ARMS[arm], "--out_dir", d, "--run_name", "pretrain",
            "--data_path", self.data_dir / "pretrain" / "pretrain_train.bin",
            "--max_steps", b.pretrain_steps, "--batch_size", b.pretrain_batch, "--accumulation_steps", 1,
            "--learning_rate", 3e-3, "--warmup_ratio", 0.05,
            *self.common_train_flags(seed)), d / "pretrain" / ".done")

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
            "--max_steps", b.sft_steps, "--batch_size", b.sft_batch, "--accumulation_steps", 1,
            "--learning_rate", 1e-3, "--warmup_ratio", 0.05,
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
            "--max_steps", b.dpo_steps, "--batch_size", b.dpo_batch, "--accumulation_steps", 1,
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
                "--max_new_tokens", b.eval_new_tokens,
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
        t0 = time.time()
        log(f"run dir {self.run_dir}; arms {self.arms}; seeds {self.seeds}; stages {list(stages)}; "
            f"{'quick' if a.quick else 'full'} budget")
        if "data" in stages:
            self.stage_data()
        for seed in self.seeds:
            for arm in self.arms:
                for stage in ("pretrain", "sft", "prefs", "dpo", "eval"):
                    if stage in stages:
                        getattr(self, f"stage_{stage}")(arm, seed)
        if "report" in stages:
            self.stage_report()
        log(f"finished in {time.time() - t0:.0f}s")
        if "report" in stages:
            log(f"report: {self.run_dir / 'report.md'}")
        return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets (CI smoke run, under 3 minutes)")
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
