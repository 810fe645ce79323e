"""The shared training loop (pretraining, SFT, DPO).

``run(task, argv)`` parses the flags (``trainer.args``) and trains; ``Trainer(args, task).train()``
does the same with parsed arguments. Returns the process exit status (0: finished or stopped by a
signal after saving; 1: stopped by a non-finite loss). A run directory that already has checkpoints is
refused (exit 2) unless ``--resume`` continues it or ``--overwrite`` deletes its checkpoints and logs.

What a task can use from the trainer (``on_train_start`` / ``extra_eval`` hooks):
``trainer.args``, ``trainer.dist`` (rank, world size, device), ``trainer.device``, ``trainer.tokenizer``,
``trainer.model`` (the bare model), ``trainer.train_model`` (what ``compute_loss`` gets: the model, a
DDP wrapper or a DeepSpeed engine), ``trainer.autocast()``, ``trainer.to_device(batch)``,
``trainer.log(msg)``, ``trainer.step``, ``trainer.total_steps`` (known after ``on_train_start``),
``trainer.run_dir``, ``trainer.train_dataset``, ``trainer.eval_datasets``, ``trainer.collate``,
``trainer.init_from`` (resolved checkpoint dir or None), ``trainer.eval_loader(dataset)`` (this rank's
shard of the fixed validation sample), ``trainer.config`` (the model config), ``trainer.record(values)``
(a ``metrics.jsonl`` / wandb record with step, epoch, cumulative ``tokens`` and ``flops``; rank 0 writes),
``trainer.evaluate()`` (every eval set, ``val/bpc`` and ``extra_eval``).

Every ``metrics.jsonl`` record carries ``tokens`` (training tokens so far, all ranks: the non-padding
inputs of the trained model's forward passes) and ``flops`` (``tokens`` x the model's training FLOPs per
token, ``model.presets.parameter_report`` at ``--max_seq_len``); both continue across ``--resume``.
Evaluations score a fixed seeded sample of each eval set (``--eval_batches``) and, for pretraining and SFT,
held-out bits per character (``val/bpc``, ``evaluation.bpc.HeldoutBPC``; sizes in the first log lines).

Resume (``--resume``) needs the same global micro-batch (``batch_size`` x processes), accumulation, seed,
optimizer and training set: the data position and the schedule are functions of the step. So a DDP / plain
run may resume on another number of processes when ``batch_size`` x processes stays the same (e.g. 1 x 32 ->
2 x 16); anything else is refused with a message. DeepSpeed checkpoints resume on the same world size;
plain/DDP and DeepSpeed checkpoints do not resume into each other (``--init_from`` takes the weights).
``--max_steps`` (optimizer steps) overrides ``--epochs`` and may cycle the data several times;
``--max_minutes`` fixes the number of steps from a timed probe, and again from the steps it has run (at the points
of ``replan_points``: step ``min(REPLAN_STEP, planned / 2)``, a quarter and half of the plan); the count is saved in
the trainer state, so a resumed run keeps it (one resumed from a checkpoint before a re-plan keeps the plan it had).

Per optimizer step (``accumulation_steps`` micro-batches on each of ``world_size`` processes):

1. the step's micro-batches are read from a deterministic stream (seeded permutation per epoch; global
   micro-batch ``k`` is split over the ranks), so the data position is a function of the step;
2. their units (target tokens, pairs) and tokens are counted and summed over ranks: ``N``;
3. each micro-batch backpropagates ``Loss.sum * world_size / N + Loss.aux / accumulation`` (the task's loss and
   the MoE balance loss the task returns; ``trainer/tasks.py``); DDP / ZeRO average over ranks, so the
   update equals one process with the whole global batch;
4. non-finite loss / stop signal are agreed on by all ranks (one MAX all-reduce), then the backend
   (``trainer/backend.py``: plain / DDP / DeepSpeed) clips and steps with the scheduled learning rates (every
   parameter group's rate is set before every step, ``trainer/optim.py``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from . import checkpoint as ckpt_lib
from . import distributed as dist_utils
from .args import fill_defaults, parse_args, public_args
from .backend import DeepSpeedBackend, PlainBackend
from .logging import RunLogger, fmt_duration
from .optim import build_optimizer, param_groups, set_lrs
from .schedule import lr_at, warmup_steps
from .signals import LauncherWatch, StopSignal, ignore_in_worker
from .tasks import Task

MOE_TWINS = {"mateconv-0.02b": "mateconv-moe-0.1b", "mateconv-tiny": "mateconv-moe-tiny"}
_CONFIG_IGNORE = {"torch_dtype", "dtype", "transformers_version", "architectures", "auto_map", "_name_or_path",
                  "max_position_embeddings", "use_cache", "output_attentions", "output_hidden_states",
                  "return_dict", "bias_update_rate", "aux_loss_alpha", "aux_free_balancing"}


# --------------------------------------------------------------------------------------------- data


class StreamSampler(Sampler):
    """Batches of indices for global micro-batches ``start .. stop-1`` of an endless epoch stream.

    Epoch ``e`` is ``randperm(n, seed + e)`` cut into ``n // (batch_size * world)`` global micro-batches
    (the remainder is dropped); rank ``r`` takes its slice of each. Resuming at micro-batch ``k``
    replays exactly the batches an uninterrupted run would have seen.

    With ``lengths`` (``--group_by_length``) each run of ``GROUP_BATCHES`` global micro-batches of the permutation
    is sorted by item length, cut into micro-batches again and those are put in a seeded random order: a batch
    holds items of similar length, so right-padding costs little (SFT answers of ~76 tokens beside 128-token
    replay windows were ~28% padding). Still a function of the seed and the epoch.
    """

    GROUP_BATCHES = 16

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int, stop: int,
                 lengths=None):
        self.n, self.bs, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.start, self.stop = seed, start, stop
        self.per_epoch = n // (batch_size * world)
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        if self.lengths is not None and len(self.lengths) != n:
            raise ValueError(f"{len(self.lengths)} lengths for {n} samples")
        if self.per_epoch < 1:
            raise ValueError(f"the training set has {n} samples, fewer than one global micro-batch "
                             f"({batch_size} x {world} processes): lower --batch_size")

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return perm
        gb = self.bs * self.world
        used, chunk = self.per_epoch * gb, gb * self.GROUP_BATCHES
        parts = []
        for lo in range(0, used, chunk):
            idx = perm[lo:min(lo + chunk, used)]
            idx = idx[torch.argsort(self.lengths[idx], stable=True)].view(-1, gb)
            parts.append(idx[torch.randperm(len(idx), generator=g)].reshape(-1))
        return torch.cat(parts)

    def __iter__(self):
        epoch, perm = None, None
        gb = self.bs * self.world
        for k in range(self.start, self.stop):
            e, j = divmod(k, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            lo = j * gb + self.rank * self.bs
            yield perm[lo:lo + self.bs].tolist()

    def __len__(self):
        return max(0, self.stop - self.start)


# --------------------------------------------------------------------------------------------- helpers


def cpu_bf16_hardware() -> str | None:
    """The CPU's bfloat16 matmul hardware: ``"AMX"``, ``"AVX512-BF16"`` or None (AVX2 only).

    Where either is present bf16 matmuls are 2.5-6x faster than fp32 (AMD EPYC Zen 4 with AVX512-BF16, 2 cores:
    ~380 vs ~110 GFLOP/s, a training step 1.6x faster); without them bf16 is emulated and ~10x slower.
    """
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        try:
            if getattr(torch.cpu, probe)():
                return name
        except Exception:  # noqa: BLE001 - private API may move
            continue
    return None


#: environment variable that replaces the automatic precision choice (``--dtype auto|bfloat16``):
#: ``bf16`` / ``bfloat16`` or ``fp32`` / ``float32``. An explicit ``--dtype float32|float16`` is kept.
DTYPE_ENV = "MATECONV_DTYPE"
_FORCED = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def forced_dtype() -> str | None:
    """``$MATECONV_DTYPE`` as ``"bfloat16"`` / ``"float32"``, or None when unset."""
    raw = os.environ.get(DTYPE_ENV, "").strip().lower()
    if not raw:
        return None
    if raw not in _FORCED:
        raise ValueError(f"${DTYPE_ENV}={raw!r}: expected one of bf16, bfloat16, fp32, float32")
    return _FORCED[raw]


def resolve_dtype(requested: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """-> (autocast dtype or None for float32, explanation).

    ``auto`` and ``bfloat16`` are the automatic choice: bfloat16 where it is fast (CUDA with bf16, CPU with
    AMX or AVX512-BF16), else float16 with loss scaling (older GPUs) or float32 (CPU without either). ``$MATECONV_DTYPE``
    replaces that choice (to run every path on any machine, e.g. the test suite with bf16 and fp32 forced).
    """
    req = requested or "bfloat16"
    forced = forced_dtype() if req in ("auto", "bfloat16") else None
    if forced == "bfloat16":
        return torch.bfloat16, f"bfloat16 autocast (forced by ${DTYPE_ENV})"
    if forced == "float32":
        return None, f"float32 (forced by ${DTYPE_ENV})"
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if req in ("auto", "bfloat16"):
            if bf16_ok:
                return torch.bfloat16, "bfloat16 autocast"
            return torch.float16, "float16 autocast with loss scaling (this GPU has no bfloat16)"
        if req == "float16":
            return torch.float16, "float16 autocast with loss scaling"
        return None, "float32"
    if req in ("auto", "bfloat16"):
        hardware = cpu_bf16_hardware()
        if hardware:
            return torch.bfloat16, f"bfloat16 autocast (CPU with {hardware})"
        return None, "float32 (this CPU has neither AMX nor AVX512-BF16: bfloat16 would be slower than float32)"
    if req == "float16":
        return None, "float32 (float16 is not supported on CPU)"
    return None, "float32"


def resolve_model_spec(args, on_gpu: bool) -> tuple[str, str]:
    """-> (spec for ``model.get_config``, tag for run names)."""
    spec = args.model
    if spec in (None, "auto"):
        spec = "mateconv-0.02b" if on_gpu else "mateconv-tiny"
    if args.use_moe and spec in MOE_TWINS:
        spec = MOE_TWINS[spec]
    p = Path(spec)
    if p.exists():
        tag = p.stem if p.is_file() else (p.name if not p.name.startswith("step_") else p.parent.parent.name)
        state = ckpt_lib.read_state(p) if p.is_dir() else {}
        tag = state.get("model_tag", tag)
    else:
        tag = spec
    return spec, tag


def config_diff(a, b) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    keys = sorted((set(da) | set(db)) - _CONFIG_IGNORE)
    return [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in keys if da.get(k) != db.get(k)]


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------------------------- trainer


class RunDirInUse(SystemExit):
    """A run directory that already has checkpoints, started without ``--resume`` / ``--overwrite``
    (printed without a traceback, exit status 2)."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"error: {message}")

    def __str__(self) -> str:
        return self.message


EVAL_SAMPLE_SEED = 1234  # the fixed validation sample (--eval_batches) of every run
PROBE_STEPS = 3  # --max_minutes: optimizer steps timed before the run (the first one is a warm-up)
REPLAN_STEP = 20  # --max_minutes: the step count is fitted again from the real steps at this step (or half the plan)


def replan_points(planned: int) -> list[int]:
    """``--max_minutes``: the steps at which the step count is fitted again from the steps run since the previous
    point: ``min(REPLAN_STEP, planned / 2)`` (a 3-step probe misjudges when another process is starting beside
    it), then a quarter and half of the plan (the steady step can still differ from the first 20: measured 8%
    faster for a lane of the pipeline); points less than ``REPLAN_STEP`` apart are dropped."""
    points = [min(REPLAN_STEP, planned // 2)]
    for p in (planned // 4, planned // 2):
        if p - points[-1] >= REPLAN_STEP:
            points.append(p)
    return points


class Window:
    """Sums of one logging window (device tensors: no sync until its log line), and its wall time."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = {"loss": z(), "count": z(), "aux": z(), "n_aux": z()}
        self.metrics: dict[str, torch.Tensor] = {}
        self.load = None
        self.tokens = 0
        self.t0 = time.time()

    def add(self, loss, load) -> None:
        self.sums["loss"] += loss.sum.detach().double()
        self.sums["count"] += torch.as_tensor(loss.count, dtype=torch.float64, device=self.device)
        if loss.aux is not None:
            self.sums["aux"] += loss.aux.detach().double()
            self.sums["n_aux"] += 1
        for k, v in loss.metrics.items():
            v = torch.as_tensor(v, dtype=torch.float64, device=self.device).detach()
            self.metrics[k] = self.metrics[k] + v if k in self.metrics else v.clone()
        if load is not None and load.numel():
            self.load = load.double() if self.load is None else self.load + load.double()


#: a process older than this when the trainer starts is a long-lived host (pytest, a notebook, a pipeline in one
#: process), whose earlier work is not this run's: its --max_minutes counts from the trainer's start instead
FRESH_PROCESS_S = 120.0


def budget_clock_start() -> float:
    """Where ``--max_minutes`` counts from: the start of the process when the trainer runs from its own command
    (interpreter start and imports are part of the run), else now."""
    now = time.time()
    try:
        import psutil

        started = psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return now
    return started if now - started < FRESH_PROCESS_S else now


class Trainer:
    def __init__(self, args, task):
        self.args = args
        self.task = task
        self.step = 0
        self.total_steps = 0
        self.tokens = 0  # cumulative training tokens (all ranks; non-padding inputs of the trained model)
        self.model = None
        self.backend = None
        self.logger = RunLogger(None, enabled=False)
        self.init_from = None
        self.resume_from = None
        self.bpc = None
        self.plan_note = ""
        self.replan: dict | None = None  # --max_minutes: the pending re-plan from the real step time
        self._lengths = None  # --group_by_length: the training items' lengths, read once
        self.log_pending: list[str] = []
        self.t_launch = budget_clock_start()

    # ---------------------------------------------------------------- small API for tasks
    @property
    def train_model(self):
        return self.backend.train_model if self.backend is not None else self.model

    @property
    def optimizer(self):
        return self.backend.optimizer if self.backend is not None else None

    @property
    def engine(self):
        return getattr(self.backend, "engine", None)

    def log(self, msg: str) -> None:
        self.logger.info(msg)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=nb) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def eval_indices(self, n: int, batch_size: int | None = None) -> list[int]:
        """The validation sample (all ranks together): ``--eval_batches`` x batch x processes items drawn once
        with a fixed seed from the whole eval set (in file order), or all of it (``--eval_batches 0``)."""
        limit, bs = self.args.eval_batches, batch_size or self.args.batch_size
        want = limit * bs * self.dist.world_size if limit and limit > 0 else n
        if want >= n:
            return list(range(n))
        g = torch.Generator().manual_seed(EVAL_SAMPLE_SEED)
        return torch.randperm(n, generator=g)[:want].sort().values.tolist()

    def eval_loader(self, dataset, batch_size: int | None = None) -> DataLoader:
        """This rank's shard of the validation sample of ``dataset`` (see :meth:`eval_indices`)."""
        idx = self.eval_indices(len(dataset), batch_size)[self.dist.rank::self.dist.world_size]
        return DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size or self.args.batch_size,
                          shuffle=False, collate_fn=self.collate, num_workers=0)

    def record(self, values: dict) -> dict:
        """One ``metrics.jsonl`` / wandb record: step, epoch, the values, cumulative tokens and FLOPs."""
        rec = {"step": self.step, "epoch": round(self.step * self.args.accumulation_steps / self.micro_per_epoch, 4),
               **values, "tokens": int(self.tokens), "flops": float(self.tokens) * self.flops_per_token}
        self.logger.metrics(rec)
        return rec

    # ---------------------------------------------------------------- setup
    def _setup_env(self):
        a = self.args
        self.dist = dist_utils.detect(a.local_rank, a.deepspeed)
        if a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available()):
            self.dist.device, self.dist.backend = torch.device("cpu"), "gloo"
        self.device = self.dist.device
        on_cpu = self.device.type == "cpu"
        fill_defaults(a, self.task, on_cpu)
        if a.resume and a.overwrite:
            raise SystemExit("error: --resume and --overwrite exclude each other")
        self.threads_note = ""
        if on_cpu:
            n, why = dist_utils.pick_num_threads(a.num_threads, self.dist.local_world_size)
            torch.set_num_threads(n)
            self.threads_note = f"{n} threads: {why}"
            dist_utils.keep_freed_memory()
        dist_utils.init(self.dist)
        self.amp_dtype, self.precision_note = resolve_dtype(a.dtype, self.device)
        random.seed(a.seed)
        np.random.seed(a.seed)
        torch.manual_seed(a.seed)

    def _setup_model_and_tokenizer(self):
        from model import MateConvForCausalLM, get_config
        from tokenizer import load_tokenizer, tokenizer_fingerprint

        a = self.args
        model_explicit = a.model not in (None, "auto")
        spec, tag = resolve_model_spec(a, self.device.type == "cuda")

        # weights to start from
        init = a.init_from
        if init is None and model_explicit and Path(spec).is_dir() and ckpt_lib.resolve_checkpoint(spec):
            init = spec
        stage = getattr(self.task, "init_from_stage", None)
        if init is None and stage:
            # <out_dir>/<stage>_<tag>, else the stage's own default root (Task.init_from_root, e.g. "out")
            roots = [a.out_dir, *([self.task.init_from_root] if getattr(self.task, "init_from_root", None) else [])]
            cands = [str(Path(r) / f"{stage}_{tag}") for r in roots]
            init = next((c for c in cands if ckpt_lib.resolve_checkpoint(c)), cands[0])
            auto = True
        else:
            auto = False
        if init is not None and str(init).lower() != "none":
            ck = ckpt_lib.resolve_checkpoint(init)
            if ck is None:
                hint = (f" (the default for {self.task.name}: the latest {stage} checkpoint of {tag}; run the "
                        f"{stage} stage first, or pass --init_from PATH)") if auto else ""
                raise FileNotFoundError(f"--init_from: no checkpoint found at {init}{hint}")
            self.init_from = ck
        self.model_tag = tag

        # config
        if self.init_from is not None and not model_explicit:
            config = get_config(str(self.init_from))
            if a.use_moe and not config.use_moe:
                raise ValueError(f"--use_moe, but the checkpoint {self.init_from} is a dense model")
            self.model_tag = ckpt_lib.read_state(self.init_from).get("model_tag", tag)
        else:
            config = get_config(spec)
            if a.use_moe and not config.use_moe:
                config = get_config(spec, use_moe=True)
            if self.init_from is not None:
                diff = config_diff(config, get_config(str(self.init_from)))
                if diff:
                    raise ValueError(f"--init_from {self.init_from} has another architecture than --model {spec}: "
                                     + "; ".join(diff[:8]))
        self.config = config

        # tokenizer: flag, else the one saved with the starting checkpoint, else the default
        tok_path = a.tokenizer
        if tok_path is None and self.init_from is not None and (Path(self.init_from) / "tokenizer_config.json").is_file():
            tok_path = str(self.init_from)
        self.tokenizer = load_tokenizer(tok_path)
        self.tokenizer_fp = tokenizer_fingerprint(self.tokenizer)
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                             f"{config.vocab_size}: use the tokenizer the model was built for, or a config with "
                             f"vocab_size >= {len(self.tokenizer)}")
        if self.init_from is not None:
            want = ckpt_lib.read_state(self.init_from).get("tokenizer_fingerprint")
            if want and want != self.tokenizer_fp:
                raise ValueError(f"the tokenizer ({tok_path or 'default'}, fingerprint {self.tokenizer_fp}) is not "
                                 f"the one {self.init_from} was trained with ({want})")
        if a.max_seq_len > config.max_position_embeddings:
            self.log_pending.append(f"note: --max_seq_len {a.max_seq_len} > max_position_embeddings "
                                    f"{config.max_position_embeddings}")

        model = MateConvForCausalLM(config)
        if self.init_from is not None:
            ckpt_lib.load_model_weights(model, self.init_from)
        self.model = model
        self.is_moe = bool(getattr(config, "use_moe", False))

    def _setup_run_dir(self):
        a = self.args
        self.run_name = a.run_name or f"{self.task.name}_{self.model_tag}"
        self.run_dir = Path(a.out_dir) / self.run_name
        self.ckpt_root = self.run_dir / "checkpoints"
        ckpt_lib.check_run_dir(self.run_dir)  # before any work: one message, exit status 1
        self.resume_from = None
        if a.resume:  # the newest intact checkpoint (damaged ones are named and passed over), or exit 2
            self.resume_from = ckpt_lib.resume_checkpoint(self.ckpt_root, a.resume, warn=self.log_pending.append)
        else:
            existing = ckpt_lib.list_checkpoints(self.ckpt_root)
            if existing and not a.overwrite:
                raise RunDirInUse(f"{self.run_dir} already has checkpoints (latest {existing[-1].name}): continue "
                                  f"that run with --resume, or start afresh with --overwrite (deletes its checkpoints, "
                                  f"metrics.jsonl and train.log), or choose another --run_name / --out_dir")
            if existing and self.dist.is_main:
                shutil.rmtree(self.ckpt_root)
                for name in ("metrics.jsonl", "train.log", "args.json"):
                    (self.run_dir / name).unlink(missing_ok=True)
                self.log_pending.append(f"--overwrite: removed {len(existing)} checkpoint(s) and the logs of the "
                                        f"previous run in {self.run_dir}")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            ckpt_lib.clean_stale(self.ckpt_root)
        dist_utils.barrier()

    def _setup_data(self):
        a = self.args
        self.train_dataset, self.eval_datasets = self.task.build_datasets(a, self.tokenizer)
        self.collate = self.task.collate_fn(self.tokenizer)
        n = len(self.train_dataset)
        self.global_micro = a.batch_size * self.dist.world_size
        self.micro_per_epoch = n // self.global_micro
        if self.micro_per_epoch < 1:
            raise ValueError(f"{n} training samples: fewer than one global micro-batch of {self.global_micro}")
        from model import parameter_report

        self.flops_per_token = parameter_report(self.config, seq_len=a.max_seq_len)["flops_per_token"]
        path = getattr(a, "bpc_path", None)
        if path and getattr(a, "bpc_samples", 0) and Path(path).is_file():
            from evaluation.bpc import HeldoutBPC

            self.bpc = HeldoutBPC(self.tokenizer, path, n=a.bpc_samples, seed=0, max_seq_len=a.max_seq_len,
                                  batch_size=a.batch_size)
        elif path and getattr(a, "bpc_samples", 0):
            self.log_pending.append(f"note: no held-out bits/char ({path} not found)")

    def _setup_optim(self):
        a = self.args
        self.model.to(self.device)
        if a.compile:
            self.model.compile()  # in place: parameter names, state dicts and checkpoints are unchanged
        groups = param_groups(self.model, a.optimizer, lr=a.learning_rate, muon_lr=a.muon_lr,
                              embedding_lr=a.embedding_lr, weight_decay=a.weight_decay)
        self.groups_note = ", ".join(f"{g['name']} {sum(p.numel() for p in g['params']):,} params "
                                     f"(peak lr {g['peak_lr']:g})" for g in groups)
        if self.dist.use_deepspeed and a.optimizer == "muon":
            self.groups_note += ("; under DeepSpeed its own Muon (\"type\": \"Muon\") regroups them: every >= 2-D "
                                 "parameter but embeddings / LM head, the router included, on Muon"
                                 + (f"; its AdamW part uses --learning_rate {a.learning_rate:g} for the embeddings too "
                                    f"(--embedding_lr {a.embedding_lr:g} applies without DeepSpeed)"
                                    if a.embedding_lr not in (None, a.learning_rate) else ""))
        if self.dist.use_deepspeed:
            cfg = self._ds_config()
            self.ds_config = cfg
            optimizer = None
            if cfg.get("optimizer") is None:
                optimizer = build_optimizer(groups, self.device)
            ds_groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay", "peak_lr")} for g in groups]
            self.backend = DeepSpeedBackend(self.model, ds_groups, cfg, accum=a.accumulation_steps, optimizer=optimizer)
        else:
            self.backend = PlainBackend(self.model, build_optimizer(groups, self.device), dist=self.dist,
                                        amp_dtype=self.amp_dtype, grad_clip=a.grad_clip, find_unused=self.is_moe)

    def _ds_config(self) -> dict:
        a = self.args
        path = Path(a.deepspeed if a.deepspeed and a.deepspeed != "ds_config.json" else "ds_config.json")
        if not path.is_file():
            alt = Path(__file__).resolve().parents[1] / path.name
            path = alt if alt.is_file() else path
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} not found")
        cfg = json.loads(path.read_text(encoding="utf-8"))
        self.ds_config_path = path

        def fill(d, key, val):
            if d.get(key, "auto") == "auto":
                d[key] = val
            return d[key]

        # explicit values in the file win; "auto" (or absent) takes the command line
        a.batch_size = int(fill(cfg, "train_micro_batch_size_per_gpu", a.batch_size))
        a.accumulation_steps = int(fill(cfg, "gradient_accumulation_steps", a.accumulation_steps))
        fill(cfg, "train_batch_size", a.batch_size * a.accumulation_steps * self.dist.world_size)
        a.grad_clip = float(fill(cfg, "gradient_clipping", a.grad_clip))
        bf16 = cfg.setdefault("bf16", {})
        fp16 = cfg.setdefault("fp16", {})
        if bf16.get("enabled", "auto") == "auto":
            bf16["enabled"] = self.amp_dtype == torch.bfloat16
        if fp16.get("enabled", "auto") == "auto":
            fp16["enabled"] = self.amp_dtype == torch.float16
        if bf16["enabled"]:
            self.amp_dtype, self.precision_note = torch.bfloat16, "bfloat16 (DeepSpeed config)"
        elif fp16["enabled"]:
            self.amp_dtype, self.precision_note = torch.float16, "float16 with loss scaling (DeepSpeed config)"
        zero = cfg.setdefault("zero_optimization", {})
        if a.zero_stage is not None:
            zero["stage"] = a.zero_stage
        if zero.get("stage", 0) == 3:
            zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        opt = cfg.get("optimizer")
        if a.optimizer == "muon":
            opt = cfg["optimizer"] = self._ds_muon_optimizer(opt)
        if opt is not None and opt.get("type", "").lower() == "muon":
            params = opt.setdefault("params", {})
            fill(params, "muon_lr", a.muon_lr)
            fill(params, "adam_lr", a.learning_rate)
            fill(params, "lr", a.learning_rate)
            fill(params, "weight_decay", a.weight_decay)
            fill(params, "momentum", 0.95)
            fill(params, "betas", [0.9, 0.95])
            fill(params, "eps", 1e-8)
        elif opt is not None:
            params = opt.setdefault("params", {})
            fill(params, "lr", a.learning_rate)
            fill(params, "weight_decay", a.weight_decay)
            fill(params, "betas", [0.9, 0.95])
            fill(params, "eps", 1e-8)
        cfg.pop("scheduler", None)  # the trainer sets the learning rate itself (resumable schedule)
        cfg.setdefault("steps_per_print", 10**9)
        return cfg

    def _ds_muon_optimizer(self, opt: dict | None) -> dict:
        """``--optimizer muon`` under DeepSpeed: DeepSpeed's own Muon (``"type": "Muon"``, ZeRO-aware), which
        takes every >= 2-D parameter except embeddings / LM head (so the MoE router too) and AdamW for the rest."""
        if opt is not None and opt.get("type", "").lower() not in ("adam", "adamw", "muon"):
            raise SystemExit(f"error: --optimizer muon, but {self.ds_config_path} sets optimizer {opt.get('type')!r}")
        try:
            from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"error: --optimizer muon: this DeepSpeed has no Muon optimizer ({e}); train with "
                             f"--deepspeed none (DDP, torch.optim.Muon) or --optimizer adamw") from None
        if opt is not None and opt.get("type", "").lower() == "muon":
            return opt
        return {"type": "Muon", "params": {k: v for k, v in (opt or {}).get("params", {}).items()
                                           if k in ("lr", "weight_decay", "betas", "eps")}}

    def _check_resume_state(self, st: dict):
        a = self.args
        problems = []
        saved_gm = st.get("global_micro_batch")
        if saved_gm is not None and saved_gm != self.global_micro:
            problems.append(f"global micro-batch {saved_gm} (batch_size {st.get('batch_size')} x "
                            f"{st.get('world_size')} processes) vs now {self.global_micro} "
                            f"({a.batch_size} x {self.dist.world_size})")
        if st.get("accumulation_steps") not in (None, a.accumulation_steps):
            problems.append(f"accumulation_steps {st.get('accumulation_steps')} vs {a.accumulation_steps}")
        if st.get("optimizer", "adamw") != a.optimizer:
            problems.append(f"optimizer {st.get('optimizer', 'adamw')} vs {a.optimizer}")
        if st.get("seed") not in (None, a.seed):
            problems.append(f"seed {st.get('seed')} vs {a.seed}")
        if bool(st.get("group_by_length", False)) != self.group_by_length:
            problems.append(f"--group_by_length {'on' if st.get('group_by_length') else 'off'} vs "
                            f"{'on' if self.group_by_length else 'off'} (another batch order)")
        if st.get("train_samples") not in (None, len(self.train_dataset)):
            problems.append(f"training set of {st.get('train_samples')} samples vs {len(self.train_dataset)}")
        if self.dist.use_deepspeed != bool(st.get("deepspeed", False)):
            problems.append("DeepSpeed and non-DeepSpeed checkpoints are not interchangeable for resume "
                            "(use --init_from to start from the weights)")
        elif self.dist.use_deepspeed and st.get("world_size") != self.dist.world_size:
            problems.append(f"DeepSpeed world size {st.get('world_size')} vs {self.dist.world_size}")
        if st.get("tokenizer_fingerprint") not in (None, self.tokenizer_fp):
            problems.append("another tokenizer")
        if problems:
            raise ValueError(f"cannot resume exactly from {self.resume_from}: " + "; ".join(problems)
                             + ". Resume with the same global batch (batch_size x processes), accumulation, "
                               "seed and data, or start a new run with --init_from.")

    def _resume(self):
        st = ckpt_lib.read_state(self.resume_from)
        self._check_resume_state(st)
        self.backend.load(self.resume_from)
        rng = self.resume_from / f"rng_rank{self.dist.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        self.step = int(st["step"])
        self.tokens = int(st.get("tokens", 0))

    # ---------------------------------------------------------------- how many steps
    def _plan_steps(self) -> None:
        """``total_steps`` and the warmup: from the checkpoint (resume of a ``--max_minutes`` run), from the wall
        budget (``--max_minutes``; an explicit ``--max_steps`` caps it), ``--max_steps`` or ``--epochs``."""
        a = self.args
        st = ckpt_lib.read_state(self.resume_from) if self.resume_from is not None else {}
        explicit_steps = a.max_steps if a.max_steps and "max_steps" not in a.defaulted else 0
        if a.max_minutes and a.max_minutes > 0:
            if st.get("max_minutes"):
                self.total_steps = int(st["total_steps"])
                self.plan_note = (f"--max_minutes {st['max_minutes']:g}: {self.total_steps} optimizer steps, as fixed "
                                  f"when the run started ({self.resume_from.name})")
            else:
                self.total_steps = self._steps_for_budget(a.max_minutes * 60.0, explicit_steps)
        elif a.max_steps and a.max_steps > 0:
            self.total_steps = int(a.max_steps)
        else:
            self.total_steps = (a.epochs * self.micro_per_epoch) // a.accumulation_steps
        if self.total_steps < 1:
            raise ValueError("no optimizer step to take: more data, more --epochs, or a smaller batch")
        self.warmup = warmup_steps(self.total_steps, a.warmup_iters, a.warmup_ratio)
        if st.get("max_minutes") and st.get("warmup") is not None:
            self.warmup = int(st["warmup"])  # as the run fixed it (a re-plan keeps the first plan's warmup)
        if self.step >= self.total_steps:
            self.log(f"checkpoint is at step {self.step} >= total {self.total_steps}: nothing to do")

    def _steps_for_budget(self, budget_s: float, cap: int) -> int:
        """Time ``PROBE_STEPS`` real optimizer steps (weights, optimizer and RNG restored afterwards; the slowest
        rank counts), then fit the steps and their evaluations into what is left of ``budget_s``."""
        a = self.args
        t_step = self._probe_step_time()
        steps, t_eval, left = self._steps_that_fit(budget_s, t_step)
        if cap:
            steps = min(steps, cap)
        self.plan_note = (f"--max_minutes {a.max_minutes:g}: {t_step * 1e3:.0f} ms per optimizer step ({PROBE_STEPS} "
                          f"probe steps), ~{t_eval:.1f} s per evaluation, {left:.0f} s left after setup -> {steps} "
                          f"optimizer steps" + (f" (capped by --max_steps {cap})" if cap and steps == cap else ""))
        points = [p for p in replan_points(steps) if p >= 5]  # too short a run to time its own steps: none
        self.replan = {"cap": cap, "points": points} if points else None
        return steps

    def _steps_that_fit(self, budget_s: float, t_step: float) -> tuple[int, float, float]:
        """-> (optimizer steps of ``t_step`` seconds, with their evaluations and the final one, that fit into what is
        left of ``budget_s``, at least 1; seconds per evaluation; seconds left)."""
        a = self.args
        left = budget_s - (time.time() - self.t_launch)
        # an evaluation batch is a forward pass: about half a training micro-batch of the same size on CPU
        n_eval = sum(len(self.eval_loader(ds)) for ds in self.eval_datasets.values())
        if self.bpc is not None:
            n_eval += -(-len(self.bpc.items) // max(1, self.dist.world_size * self.bpc.batch_size))
        t_eval = n_eval * t_step / a.accumulation_steps / 2
        per_step = t_step + (t_eval / a.eval_interval if a.eval_interval else 0.0)
        return max(1, int((left - t_eval) / per_step)), t_eval, left

    def _maybe_replan(self, it):
        """``--max_minutes``: at each re-plan point (``replan_points``, fixed with the first plan) time the real steps
        since the last point (since step 2 at the first) and fit the step count into what is left of the budget
        once more (``--max_steps`` still caps it; the warmup stays). Returns a new batch iterator when the count
        changed."""
        r, a = self.replan, self.args
        if self.step == 2:
            r["t0"], r["from"] = time.time(), 2
        if self.step < r["points"][0]:  # every point is >= 5, after the clock starts at step 2
            return None
        r["points"].pop(0)
        t_step = float(dist_utils.all_reduce_max(torch.tensor([(time.time() - r["t0"]) / (self.step - r["from"])],
                                                              dtype=torch.float64))[0])
        steps_timed = f"{r['from'] + 1}-{self.step}"
        r["t0"], r["from"] = time.time(), self.step
        if not r["points"]:
            self.replan = None
        total = self.step + self._steps_that_fit(a.max_minutes * 60.0, t_step)[0]
        if r["cap"]:
            total = min(total, r["cap"])
        if total == self.total_steps:
            return None
        self.log(f"--max_minutes {a.max_minutes:g}: steps {steps_timed} took {t_step * 1e3:.0f} ms each: "
                 f"{self.total_steps} -> {total} optimizer steps (warmup {self.warmup} kept)")
        self.total_steps = total
        self.logger.set_total(self.total_steps, self.step)
        return iter(self._train_loader(self.step))

    def _probe_step_time(self) -> float:
        a, accum = self.args, self.args.accumulation_steps
        rng = _rng_state()
        if isinstance(self.backend, DeepSpeedBackend):  # the engine's state cannot be rolled back: a plain copy
            model = copy.deepcopy(self.model)
            groups = param_groups(model, a.optimizer, lr=a.learning_rate, muon_lr=a.muon_lr,
                                  embedding_lr=a.embedding_lr, weight_decay=a.weight_decay)
            backend = PlainBackend(model, build_optimizer(groups, self.device), dist=dist_utils.DistEnv("plain"),
                                   amp_dtype=None, grad_clip=a.grad_clip, find_unused=False)
            saved = None
        else:
            backend, model = self.backend, self.model
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(backend.optimizer.state_dict()),
                     copy.deepcopy(backend.scaler.state_dict()) if backend.scaler is not None else None)
        sampler = StreamSampler(len(self.train_dataset), a.batch_size, self.dist.world_size, self.dist.rank, a.seed,
                                0, PROBE_STEPS * accum, self._item_lengths())
        it = iter(DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=0))
        times = []
        model.train()
        for _ in range(PROBE_STEPS):
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(accum)]
            units = sum(float(self.task.count_units(b)) for b in micro)
            for i, b in enumerate(micro):
                with backend.micro_context(last=i == accum - 1):
                    with self.autocast():
                        loss = self.task.compute_loss(backend.train_model, self.to_device(b))
                    obj = loss.sum.float() / max(units, 1.0)
                    backend.backward(obj + loss.aux.float() / accum if loss.aux is not None else obj, i == accum - 1)
            backend.step()
            times.append(time.perf_counter() - t0)
        if saved is not None:
            model.load_state_dict(saved[0])
            backend.optimizer.load_state_dict(saved[1])
            if saved[2] is not None:
                backend.scaler.load_state_dict(saved[2])
        if self.is_moe:
            self.model.reset_routing_counts()
        _set_rng_state(rng)
        t = float(np.median(times[1:])) if len(times) > 1 else times[0]
        return float(dist_utils.all_reduce_max(torch.tensor([t], dtype=torch.float64))[0])

    # ---------------------------------------------------------------- checkpoint
    def _state(self) -> dict:
        a = self.args
        return {
            "task": self.task.name, "step": self.step, "total_steps": self.total_steps,
            "epoch": self.step * a.accumulation_steps / self.micro_per_epoch,
            "micro_batch": self.step * a.accumulation_steps,
            "world_size": self.dist.world_size, "batch_size": a.batch_size,
            "global_micro_batch": self.global_micro, "accumulation_steps": a.accumulation_steps,
            "seed": a.seed, "train_samples": len(self.train_dataset), "deepspeed": self.dist.use_deepspeed,
            "optimizer": a.optimizer, "max_minutes": a.max_minutes or None, "tokens": int(self.tokens),
            "warmup": self.warmup, "group_by_length": self.group_by_length,
            "model_tag": self.model_tag, "tokenizer_fingerprint": self.tokenizer_fp,
            "init_from": str(self.init_from) if self.init_from else None,
            "lr": lr_at(max(self.step - 1, 0), self.total_steps, a.learning_rate, self.warmup, a.min_lr_ratio,
                         a.lr_schedule, a.decay_ratio),
            "args": public_args(a),
        }

    def save(self, reason: str = "") -> Path | None:
        t0 = time.time()
        tmp = ckpt_lib.tmp_dir(self.ckpt_root, self.step)
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        torch.save(_rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        state_dict = self.backend.save(tmp, self.dist.is_main)
        if self.dist.is_main:
            ckpt_lib.save_hf(self.model, tmp, self.tokenizer, state_dict=state_dict)
        dist_utils.barrier()
        final = None
        if self.dist.is_main:
            final = ckpt_lib.finalize(self.ckpt_root, self.step, self._state(), self.args.keep_checkpoints)
            self.log(f"saved {final} ({reason}, {time.time() - t0:.1f}s)")
            if self.args.wandb_log_model:
                self.logger.log_artifact(final, f"{self.run_name}-model".replace("/", "-"))
        dist_utils.barrier()
        return final

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Every eval set (``<name>/<key>``), held-out bits/char (``val/bpc``) and the task's ``extra_eval``."""
        res = {}
        self.model.eval()
        try:
            with torch.no_grad():
                for name, ds in self.eval_datasets.items():
                    batches = (self.to_device(b) for b in self.eval_loader(ds))
                    with self.autocast():
                        out = self.task.evaluate(self.train_model, batches)
                    res.update({f"{name}/{k}": float(v) for k, v in out.items()})
                if self.bpc is not None:
                    out = self.bpc.evaluate(self.train_model, self.device, autocast=self.autocast, rank=self.dist.rank,
                                            world_size=self.dist.world_size, all_reduce=dist_utils.all_reduce_sum)
                    res["val/bpc"] = float(out["bpc"])
                extra = self.task.extra_eval(self)
            res.update({k: float(v) for k, v in (extra or {}).items()})
        finally:
            self.model.train()
        return res

    def _has_eval(self) -> bool:
        return bool(self.eval_datasets) or self.bpc is not None or type(self.task).extra_eval is not Task.extra_eval

    def _eval_and_record(self) -> None:
        t0 = time.time()
        res = self.evaluate()
        if res:
            self.record(res)
            self.log(f"eval step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in res.items())
                     + f" ({time.time() - t0:.1f}s)")

    # ---------------------------------------------------------------- the run
    def train(self) -> int:
        a = self.args
        self._setup_env()
        self._setup_model_and_tokenizer()
        self._setup_run_dir()
        self._setup_data()
        self._setup_optim()
        if self.resume_from is not None:
            self._resume()
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main, resume_step=self.step)
        if self.dist.is_main:
            ckpt_lib.write_atomic(self.run_dir / "args.json", json.dumps(public_args(a), indent=2))
        if a.use_wandb:
            self.logger.init_wandb(a.wandb_project, a.wandb_name or self.run_name, public_args(a),
                                   resume_step=self.step)
        self._log_setup()
        stopper = StopSignal(forward_window=5.0 if self.dist.launcher != "plain" else 0.0, log=self._stop_log)
        stopper.install()
        try:
            self.task.on_train_start(self)
            self._plan_steps()
            self._log_plan()
            return self._loop(stopper)
        finally:
            stopper.uninstall()
            self.logger.close()
            dist_utils.destroy()

    def _stop_log(self, msg: str) -> None:
        if self.dist.is_main:
            self.logger.info(msg)
        else:
            print(f"[rank {self.dist.rank}] {msg}", file=sys.stderr, flush=True)

    def _log_setup(self):
        a, d = self.args, self.dist
        nparams = sum(p.numel() for p in self.model.parameters())
        self.log(f"{self.task.name}: model {self.model_tag} ({nparams / 1e6:.2f}M params"
                 f"{', MoE' if self.is_moe else ''}), {self.backend.name}, launcher {d.launcher}, world {d.world_size}, "
                 f"device {self.device}{f' ({self.threads_note})' if self.threads_note else ''}, "
                 f"backend {d.backend if d.distributed else '-'}, precision {self.precision_note}"
                 + (", torch.compile" if a.compile else ""))
        evals = ", ".join(f"{k} ({len(self.eval_indices(len(ds)))} of {len(ds)}, fixed seeded sample)"
                          for k, ds in self.eval_datasets.items()) or "none"
        self.log(f"data: {len(self.train_dataset)} train samples, eval sets: {evals}; global batch "
                 f"{self.global_micro} x {a.accumulation_steps} accumulation, seq len {a.max_seq_len}")
        if self.bpc is not None:
            self.log(f"held-out bits/char (val/bpc): {self.bpc.describe()}")
        self.log(f"optimizer {a.optimizer}: {self.groups_note}")
        if self.init_from is not None:
            self.log(f"initialised from {self.init_from}")
        if self.resume_from is not None:
            self.log(f"resumed from {self.resume_from} at step {self.step}")
        if a.defaulted:
            self.log("defaults used: " + ", ".join(f"{k}={getattr(a, k)}" for k in a.defaulted))
        self.log(f"run dir {self.run_dir}")
        for m in self.log_pending:
            self.log(m)

    def _log_plan(self):
        a = self.args
        if self.plan_note:
            self.log(self.plan_note)
        lrs = f"lr {a.learning_rate:g}" + (f", muon lr {a.muon_lr:g}" if a.optimizer == "muon" else "")
        self.log(f"{self.total_steps} optimizer steps ({self.total_steps * a.accumulation_steps / self.micro_per_epoch:.2f}"
                 f" epochs), {lrs}, warmup {self.warmup}, "
                 + (f"stable, then linear decay over the last {a.decay_ratio:g} of the run" if a.lr_schedule == "wsd"
                    else "cosine") + f" -> {a.min_lr_ratio:g}x")
        self.logger.set_total(self.total_steps, self.step)

    @property
    def group_by_length(self) -> bool:
        return bool(getattr(self.args, "group_by_length", False))  # an SFT flag: other tasks have none

    def _item_lengths(self):
        """``--group_by_length``: the training items' lengths for the sampler (read once), else None."""
        if not self.group_by_length:
            return None
        if self._lengths is None:
            if not hasattr(self.train_dataset, "lengths"):
                raise SystemExit(f"error: --group_by_length: {type(self.train_dataset).__name__} has no item lengths")
            self._lengths = self.train_dataset.lengths()
        return self._lengths

    def _train_loader(self, start_step: int) -> DataLoader:
        a = self.args
        sampler = StreamSampler(len(self.train_dataset), a.batch_size, self.dist.world_size, self.dist.rank,
                                a.seed, start_step * a.accumulation_steps, self.total_steps * a.accumulation_steps,
                                self._item_lengths())
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=a.num_workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=ignore_in_worker if a.num_workers > 0 else None,
                          persistent_workers=False)

    def _check_ids(self, batch: dict):
        V = self.config.vocab_size
        for k, v in batch.items():
            if k.endswith("input_ids") and isinstance(v, torch.Tensor) and v.numel():
                lo, hi = int(v.min()), int(v.max())
                if lo < 0 or hi >= V:
                    raise ValueError(f"batch field {k} holds token id {hi if hi >= V else lo} outside the model "
                                     f"vocabulary [0, {V}): data built with another tokenizer?")

    def _loop(self, stopper: StopSignal) -> int:
        a, d = self.args, self.dist
        it = iter(self._train_loader(self.step))
        win, t_start, steps_at_start = Window(self.device), time.time(), self.step
        last_saved = self.step if self.resume_from is not None else -1
        watch = LauncherWatch(d.launcher)
        self.model.train()
        while self.step < self.total_steps:
            lrs = set_lrs(self.optimizer, self.step, self.total_steps, self.warmup, a.min_lr_ratio,
                          a.learning_rate, a.muon_lr, a.lr_schedule, a.decay_ratio)
            step_loss = self._forward_backward([next(it) for _ in range(a.accumulation_steps)], win)
            if not stopper.requested and watch.gone():
                stopper.request("the deepspeed launcher exited (signal to its PID only)")
            # one small collective: every rank agrees on a stop signal and on a non-finite loss
            stop, bad = dist_utils.all_reduce_max(torch.tensor([float(stopper.requested),
                                                                float(not torch.isfinite(step_loss).item())])) > 0
            if bad:
                self.log(f"non-finite loss at step {self.step + 1} (rank-local sum {float(step_loss)}): stopping "
                         f"without an update; the last good checkpoint is kept"
                         + (f" ({ckpt_lib.latest_checkpoint(self.ckpt_root)})" if d.is_main else "")
                         + ". Lower --learning_rate, use float32/bfloat16 or check the data.")
                return 1
            grad_norm = self.backend.step()
            if self.is_moe:
                self.model.update_router_bias()  # every rank; the model all-reduces the load itself
            self.step += 1
            self.logger.progress(1)
            if self.replan is not None:
                it = self._maybe_replan(it) or it
            final = self.step >= self.total_steps
            if self.step % a.log_interval == 0 or final or stop:
                self._log_window(win, grad_norm, lrs, t_start, steps_at_start)
            if ((a.eval_interval and self.step % a.eval_interval == 0) or final) and self._has_eval():
                t0 = time.time()
                self._eval_and_record()
                win.t0 += time.time() - t0  # evaluation time is not training throughput
            if ((a.save_interval and self.step % a.save_interval == 0) or final or stop) and last_saved != self.step:
                self.save("final" if final else ("stop signal" if stop else "periodic"))
                last_saved = self.step
            if stop and not final:
                self.log(f"stopped by signal at step {self.step}/{self.total_steps}; resume with --resume")
                return 0
        self.log(f"done: {self.step} steps in {fmt_duration(time.time() - t_start)}; "
                 f"checkpoint {ckpt_lib.latest_checkpoint(self.ckpt_root) if d.is_main else ''}")
        return 0

    def _forward_backward(self, micro: list[dict], win: Window) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches; -> this rank's summed loss."""
        accum, ws = len(micro), self.dist.world_size
        for b in micro:
            self._check_ids(b)
        local = [sum(float(self.task.count_units(b)) for b in micro),
                 sum(float(b["attention_mask"].sum()) if "attention_mask" in b else float(b["input_ids"].numel())
                     for b in micro)]
        units, tokens = dist_utils.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        self.tokens += int(tokens)
        win.tokens += int(tokens)
        scale = ws / units if units > 0 else 0.0
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, b in enumerate(micro):
            last = i == accum - 1
            with self.backend.micro_context(last):
                with self.autocast():
                    loss = self.task.compute_loss(self.train_model, self.to_device(b))
                objective = loss.sum.float() * scale  # token (pair) mean over the global batch
                if loss.aux is not None:
                    objective = objective + loss.aux.float() / accum  # MoE balance loss, mean over micro-batches
                self.backend.backward(objective, last)
            win.add(loss, self.model.expert_load() if self.is_moe else None)
            step_loss += loss.sum.detach().double()
        return step_loss

    def _log_window(self, win: Window, grad_norm: float, lrs: dict, t_start: float, steps_at_start: int) -> dict:
        from evaluation.routing import flat_routing_metrics, near_dead_line, routing_stats

        keys, mkeys = list(win.sums), sorted(win.metrics)
        vec = dist_utils.all_reduce_sum(torch.stack([win.sums[k] for k in keys] + [win.metrics[k] for k in mkeys]))
        vals = dict(zip(keys + mkeys, vec.double().cpu().tolist()))
        now, count = time.time(), vals["count"]
        rate = (self.step - steps_at_start) / max(now - t_start, 1e-9)
        rec = {"loss": vals["loss"] / count if count > 0 else float("nan"), **lrs,
               "tokens_per_s": win.tokens / max(now - win.t0, 1e-9), "elapsed_s": round(now - t_start, 3),
               "eta_s": round((self.total_steps - self.step) / rate, 1) if rate > 0 else None,
               "grad_norm": float(grad_norm)}
        rec.update({k: vals[k] / count if count > 0 else float("nan") for k in mkeys})
        stats = None
        if self.is_moe:
            rec["moe/balance_loss"] = vals["aux"] / max(vals["n_aux"], 1.0)
            if win.load is not None:
                stats = routing_stats(dist_utils.all_reduce_sum(win.load.to(self.device)).cpu(),
                                      top_k=self.config.num_experts_per_tok)
                rec.update(flat_routing_metrics(stats))
        rec = self.record(rec)
        line = (f"{self.task.name} step {self.step}/{self.total_steps} epoch {rec['epoch']:.2f} "
                f"loss {rec['loss']:.4f} lr {rec.get('lr', rec.get('lr_embeddings', float('nan'))):.3e}"
                + (f" lr_muon {rec['lr_muon']:.3e}" if "lr_muon" in rec else "")
                + (f" lr_emb {rec['lr_embeddings']:.3e}" if "lr_embeddings" in rec else "")
                + f" tok/s {rec['tokens_per_s']:,.0f} grad_norm {rec['grad_norm']:.3f} "
                f"elapsed {fmt_duration(rec['elapsed_s'])} "
                f"eta {fmt_duration(rec['eta_s'] if rec['eta_s'] is not None else float('nan'))}")
        if self.is_moe:
            line += f" aux {rec['moe/balance_loss']:.4f}"
            if "moe/max_violation" in rec:
                line += f" max_violation {rec['moe/max_violation']:.3f}"
            line += near_dead_line(stats)
        line += "".join(f" {k} {rec[k]:.4f}" for k in mkeys)
        self.log(line)
        win.reset()
        return rec


def run(task, argv=None) -> int:
    """Parse the flags (``argv`` or ``sys.argv``) and train ``task``; returns the exit status."""
    args = parse_args(task, argv)
    return Trainer(args, task).train()
