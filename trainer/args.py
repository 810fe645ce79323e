"""One argument parser for every stage (pretraining, SFT, DPO), and the one table of defaults.

Precedence for a flag: the command line, else the stage's CPU default (``Task.cpu_defaults``, only
when the run is on CPU), else the stage default (``Task.defaults``), else ``COMMON_DEFAULTS``. The same
rule fills a stage's own flags (their argparse default is None and their default is in the stage's tables),
and ``Task.resolve_args(args, on_cpu)`` derives what depends on other flags. :func:`fill_defaults` is the
one place where defaults are resolved; nothing rewrites them later (a DeepSpeed config file's explicit
values win over the flags, see ``trainer/trainer.py``).
The original MateConv defaults are kept where they existed (``batch_size 32``, ``learning_rate``
2e-4 pretraining / 2e-5 SFT, ``accumulation_steps`` 8 pretraining / 1 SFT, ``grad_clip 1.0``,
``dtype bfloat16``, ``num_workers 1``, ``out_dir out``, ``log_interval 100``, ``save_interval 1000``,
``warmup_iters 0``). The CPU column makes ``python 4.pretrain.py`` with no flags a short demo run on a
laptop (tiny preset, short sequences, a few hundred steps); any flag given overrides it.
"""

from __future__ import annotations

import argparse
import json
import re

COMMON_DEFAULTS: dict = {
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 2e-4,
    "accumulation_steps": 1,
    "grad_clip": 1.0,
    "warmup_iters": 0,
    "warmup_ratio": 0.0,
    "min_lr_ratio": 0.1,
    "lr_schedule": "cosine",
    "decay_ratio": 0.3,
    "weight_decay": 0.1,
    "dtype": "bfloat16",
    "num_workers": 1,
    "out_dir": "out",
    "log_interval": 100,
    "save_interval": 1000,
    "eval_interval": 1000,
    "eval_batches": 50,
    "keep_checkpoints": 3,
    "max_seq_len": 512,
    "max_steps": 0,
    "seed": 1337,
    "model": "auto",
    "wandb_project": "MateConv",
    "optimizer": "adamw",
    "muon_lr": 0.02,
    "embedding_lr": None,  # None: --learning_rate
    "max_minutes": 0.0,
}

#: flags whose default comes from the table above (argparse default None = "not given")
TABLE_FLAGS = tuple(COMMON_DEFAULTS)

#: argument names that hold secrets: ``*api_key``, ``*_token`` (``hub_token``, ``hf_token``, ...), ``*password``,
#: ``*passwd``, ``*secret``, ``*secret_key``, ``*access_key``, ``*private_key``. Matched on the whole name's
#: ending, so ``tokenizer`` and ``max_tokens`` / ``max_new_tokens`` are kept.
SECRET_RE = re.compile(r"(^|[_-])(api[_-]?key|token|password|passwd|secret|secret[_-]?key|access[_-]?key|"
                       r"private[_-]?key)$", re.I)


def build_parser(task) -> argparse.ArgumentParser:
    name = getattr(task, "name", "train")
    p = argparse.ArgumentParser(
        description=f"MateConv {name} (shared trainer: plain process, torchrun or deepspeed)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def d(flag):  # shown default
        cpu = getattr(task, "cpu_defaults", {}).get(flag)
        base = getattr(task, "defaults", {}).get(flag, COMMON_DEFAULTS.get(flag))
        return f"{base}" + (f"; CPU: {cpu}" if cpu is not None and cpu != base else "")

    g = p.add_argument_group("original flags")
    g.add_argument("--epochs", type=int, default=None, help=f"passes over the training set [{d('epochs')}]")
    g.add_argument("--batch_size", type=int, default=None,
                   help=f"micro-batch per process (global batch = batch_size x processes x accumulation) "
                        f"[{d('batch_size')}]")
    g.add_argument("--learning_rate", type=float, default=None, help=f"peak learning rate [{d('learning_rate')}]")
    g.add_argument("--accumulation_steps", type=int, default=None,
                   help=f"micro-batches per optimizer step [{d('accumulation_steps')}]")
    g.add_argument("--grad_clip", type=float, default=None, help=f"clip the global grad norm (0: off) [{d('grad_clip')}]")
    g.add_argument("--warmup_iters", type=int, default=None,
                   help=f"linear warmup optimizer steps (0: use --warmup_ratio) [{d('warmup_iters')}]")
    g.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help=f"autocast dtype; bfloat16 falls back to float32 where it is not fast (CPU without AMX or AVX512-BF16), "
                        f"float16 uses loss scaling [{d('dtype')}]")
    g.add_argument("--num_workers", type=int, default=None, help=f"DataLoader workers [{d('num_workers')}]")
    g.add_argument("--out_dir", default=None, help=f"root of run directories [{d('out_dir')}]")
    g.add_argument("--data_path", default=None, help="training data (stage default when omitted)")
    g.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (offline without an API key)")
    g.add_argument("--wandb_project", default=None, help=f"[{d('wandb_project')}]")
    g.add_argument("--wandb_name", default=None, help="run name in wandb [the run directory name]")
    g.add_argument("--log_interval", type=int, default=None, help=f"optimizer steps between log lines [{d('log_interval')}]")
    g.add_argument("--save_interval", type=int, default=None, help=f"optimizer steps between checkpoints [{d('save_interval')}]")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    g.add_argument("--deepspeed", nargs="?", const="ds_config.json", default=None,
                   help="DeepSpeed config (the default under the deepspeed launcher: ds_config.json; "
                        "'none': DDP instead)")
    g.add_argument("--ddp", action="store_true", help="accepted for compatibility (multi-process runs always use DDP "
                                                        "or DeepSpeed)")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="preset name, config JSON or checkpoint dir; auto = mateconv-0.02b on GPU, mateconv-tiny on "
                        "CPU (MoE twins with --use_moe)")
    g.add_argument("--use_moe", action="store_true",
                   help="MoE variant of --model (mateconv-0.02b -> mateconv-moe-0.1b, mateconv-tiny -> mateconv-moe-tiny; "
                        "for a config file: use_moe=True)")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir [tokenizer/mateconv, or the one saved in --init_from]")
    g.add_argument("--max_seq_len", type=int, default=None, help=f"training context [{d('max_seq_len')}]")
    g.add_argument("--init_from", default=None,
                   help="weights to start from: a checkpoint dir or a run dir (its latest checkpoint)")

    g = p.add_argument_group("schedule and optimisation")
    g.add_argument("--max_steps", type=int, default=None,
                   help=f"stop after this many optimizer steps (0: epochs decide) [{d('max_steps')}]")
    g.add_argument("--warmup_ratio", type=float, default=None,
                   help=f"warmup as a fraction of the run when --warmup_iters is 0 [{d('warmup_ratio')}]")
    g.add_argument("--min_lr_ratio", type=float, default=None,
                   help=f"final learning rate / peak [{d('min_lr_ratio')}]")
    g.add_argument("--lr_schedule", default=None, choices=["cosine", "wsd"],
                   help="after warmup: cosine decay, or wsd (warmup-stable-decay: the peak, then linear decay over "
                        f"the last --decay_ratio of the run) [{d('lr_schedule')}]")
    g.add_argument("--decay_ratio", type=float, default=None,
                   help=f"wsd: fraction of the run spent decaying [{d('decay_ratio')}]")
    g.add_argument("--weight_decay", type=float, default=None, help=f"AdamW weight decay (matrices only) [{d('weight_decay')}]")
    g.add_argument("--seed", type=int, default=None, help=f"[{d('seed')}]")
    g.add_argument("--zero_stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="override the ZeRO stage of the DeepSpeed config")
    g.add_argument("--optimizer", default=None, choices=["adamw", "muon"],
                   help="adamw; or muon: torch.optim.Muon (--muon_lr) on the hidden weight matrices incl. experts, "
                        f"AdamW (--learning_rate) on embeddings/head, norms and router [{d('optimizer')}]")
    g.add_argument("--muon_lr", type=float, default=None, help=f"peak Muon learning rate [{d('muon_lr')}]")
    g.add_argument("--embedding_lr", type=float, default=None,
                   help="with --optimizer muon: peak AdamW rate of the token embeddings / LM head (the other AdamW "
                        f"parameters keep --learning_rate) [{d('embedding_lr') or 'the --learning_rate'}]")
    g.add_argument("--max_minutes", type=float, default=None,
                   help="wall-clock budget: a few probe steps measure the step time, then the number of optimizer "
                        "steps is fixed so the run ends at about this many minutes (the schedule spans them; "
                        "saved for --resume); an explicit --max_steps caps it (0: off) "
                        f"[{d('max_minutes')}]")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (opt-in; its compile time counts in the run's time)")

    g = p.add_argument_group("run, checkpoints, evaluation")
    g.add_argument("--run_name", default=None, help=f"run directory under --out_dir [{name}_<model tag>]")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint of the run dir (or from the checkpoint dir given)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run dir that already has checkpoints (deletes them, metrics.jsonl and "
                        "train.log); without it (or --resume) such a run dir is refused")
    g.add_argument("--keep_checkpoints", type=int, default=None, help=f"keep the last K checkpoints [{d('keep_checkpoints')}]")
    g.add_argument("--eval_interval", type=int, default=None,
                   help=f"optimizer steps between validations (0: only at the end) [{d('eval_interval')}]")
    g.add_argument("--eval_batches", type=int, default=None,
                   help=f"max validation batches per process (0: all) [{d('eval_batches')}]")
    g.add_argument("--wandb_log_model", action="store_true",
                   help="also upload checkpoints as wandb artifacts (off: the wandb cache stays small)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--num_threads", type=int, default=0,
                   help="CPU threads per process (0: $OMP_NUM_THREADS, else the cores that are free now / local "
                        "processes)")

    g = p.add_argument_group(f"{name} options")
    task.add_args(g)
    return p


def fill_defaults(args: argparse.Namespace, task, on_cpu: bool) -> argparse.Namespace:
    """Resolve every flag left unset (see the module docstring); records ``args.defaulted``."""
    defaulted = []
    stage = getattr(task, "defaults", {})
    cpu = getattr(task, "cpu_defaults", {}) if on_cpu else {}
    for flag in dict.fromkeys([*TABLE_FLAGS, *stage, *cpu]):
        if getattr(args, flag, None) is not None:
            continue
        if flag not in TABLE_FLAGS and not hasattr(args, flag):
            raise AttributeError(f"{type(task).__name__} has a default for --{flag}, which it does not define")
        val = cpu.get(flag, stage.get(flag, COMMON_DEFAULTS.get(flag)))
        setattr(args, flag, val)
        defaulted.append(flag)
    args.defaulted = defaulted
    if "embedding_lr" in defaulted and args.optimizer != "muon":
        args.embedding_lr = None  # a stage's Muon-recipe default; with AdamW every matrix has --learning_rate
    if hasattr(task, "resolve_args"):
        task.resolve_args(args, on_cpu)
    return args


def parse_args(task, argv=None) -> argparse.Namespace:
    args = build_parser(task).parse_args(argv)
    return args


def public_args(args: argparse.Namespace) -> dict:
    """The arguments as JSON-safe values, without anything that looks like a secret."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if SECRET_RE.search(k):
            continue
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[k] = v
    return out
