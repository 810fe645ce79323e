"""The shared training loop (pretraining, SFT, DPO).

``run(task, argv)`` parses the flags (``trainer.args``) and trains; ``Trainer(args, task).train()``
does the same with parsed arguments. Returns the process exit status (0: finished or stopped by a
signal after saving; 1: stopped by a non-finite loss).

What a task can use from the trainer (``on_train_start`` / ``extra_eval`` hooks):
``trainer.args``, ``trainer.dist`` (rank, world size, device), ``trainer.device``, ``trainer.tokenizer``,
``trainer.model`` (the bare model), ``trainer.train_model`` (what ``compute_loss`` gets: the model, a
DDP wrapper or a DeepSpeed engine), ``trainer.autocast()``, ``trainer.to_device(batch)``,
``trainer.log(msg)``, ``trainer.step``, ``trainer.total_steps``, ``trainer.run_dir``,
``trainer.train_dataset``, ``trainer.eval_datasets``, ``trainer.collate``, ``trainer.init_from``
(resolved checkpoint dir or None), ``trainer.eval_loader(dataset)`` (this rank's shard), ``trainer.config``
(the model config), ``trainer.logger.metrics(record)`` (a ``metrics.jsonl`` / wandb record, rank 0),
``trainer.evaluate()`` (every eval set + ``extra_eval``).

Resume (``--resume``) needs the same global micro-batch (``batch_size`` x processes), accumulation, seed
and training set: the data position and the schedule are functions of the step. So a DDP / plain run
may resume on another number of processes when ``batch_size`` x processes stays the same (e.g. 1 x 32 ->
2 x 16); anything else is refused with a message. DeepSpeed checkpoints resume on the same world size;
plain/DDP and DeepSpeed checkpoints do not resume into each other (``--init_from`` takes the weights).
``--max_steps`` (optimizer steps) overrides ``--epochs`` and may cycle the data several times.

Per optimizer step (``accumulation_steps`` micro-batches on each of ``world_size`` processes):

1. the step's micro-batches are read from a deterministic stream (seeded permutation per epoch; global
   micro-batch ``k`` is split over the ranks), so the data position is a function of the step;
2. their units (target tokens, pairs) are counted and summed over ranks: ``N``;
3. each micro-batch backpropagates ``loss_sum * world_size / N`` (+ the MoE balance loss / accumulation);
   DDP / ZeRO average over ranks, so the update equals one process with the whole global batch;
4. non-finite loss / stop signal are agreed on by all ranks (one MAX all-reduce), then the
   optimizer steps with the scheduled learning rate (set before every step; clipping before it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from . import checkpoint as ckpt_lib
from . import distributed as dist_utils
from .args import fill_defaults, parse_args, public_args
from .logging import RunLogger, fmt_duration
from .schedule import lr_at, warmup_steps
from .signals import LauncherWatch, StopSignal, ignore_in_worker

MOE_TWINS = {"mateconv-0.02b": "mateconv-moe-0.1b", "mateconv-tiny": "mateconv-moe-tiny"}
_CONFIG_IGNORE = {"torch_dtype", "dtype", "transformers_version", "architectures", "auto_map", "_name_or_path",
                  "max_position_embeddings", "use_cache", "output_attentions", "output_hidden_states",
                  "return_dict", "bias_update_rate", "aux_loss_alpha", "aux_free_balancing"}


class StopTraining(Exception):
    pass


# --------------------------------------------------------------------------------------------- data


class StreamSampler(Sampler):
    """Batches of indices for global micro-batches ``start .. stop-1`` of an endless epoch stream.

    Epoch ``e`` is ``randperm(n, seed + e)`` cut into ``n // (batch_size * world)`` global micro-batches
    (the remainder is dropped); rank ``r`` takes its slice of each. Resuming at micro-batch ``k``
    replays exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int, stop: int):
        self.n, self.bs, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.start, self.stop = seed, start, stop
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch < 1:
            raise ValueError(f"the training set has {n} samples, fewer than one global micro-batch "
                             f"({batch_size} x {world} processes): lower --batch_size")

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

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


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - private API may move
        return False


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
    AMX), else float16 with loss scaling (older GPUs) or float32 (CPU without AMX). ``$MATECONV_DTYPE``
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
        if _cpu_has_fast_bf16():
            return torch.bfloat16, "bfloat16 autocast (CPU with AMX)"
        return None, "float32 (this CPU has no AMX: bfloat16 would be slower than float32)"
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


class Trainer:
    def __init__(self, args, task):
        self.args = args
        self.task = task
        self.step = 0
        self.total_steps = 0
        self.model = None
        self.train_model = None
        self.engine = None
        self.optimizer = None
        self.scaler = None
        self.logger = RunLogger(None, enabled=False)
        self._aux: list[torch.Tensor] = []
        self._load_acc = None
        self.init_from = None

    # ---------------------------------------------------------------- small API for tasks
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

    def eval_loader(self, dataset, batch_size: int | None = None) -> DataLoader:
        idx = list(range(self.dist.rank, len(dataset), self.dist.world_size))
        limit = self.args.eval_batches
        bs = batch_size or self.args.batch_size
        if limit and limit > 0:
            idx = idx[: limit * bs]
        return DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=bs, shuffle=False,
                          collate_fn=self.collate, num_workers=0)

    # ---------------------------------------------------------------- setup
    def _setup_env(self):
        a = self.args
        self.dist = dist_utils.detect(a.local_rank, a.deepspeed)
        if a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available()):
            self.dist.device, self.dist.backend = torch.device("cpu"), "gloo"
        self.device = self.dist.device
        on_cpu = self.device.type == "cpu"
        fill_defaults(a, self.task, on_cpu)
        if on_cpu:
            n = a.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
            if not n:
                try:
                    cores = len(os.sched_getaffinity(0))
                except AttributeError:
                    cores = os.cpu_count() or 1
                n = max(1, cores // max(1, self.dist.local_world_size))
            torch.set_num_threads(n)
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
        model.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module, inputs, output):
        if not (module.training and torch.is_grad_enabled()):
            return
        aux = getattr(output, "aux_loss", None)
        if aux is not None:
            self._aux.append(aux)
        if self.is_moe:
            load = module.expert_load().float()
            self._load_acc = load if self._load_acc is None else self._load_acc + load

    def _setup_run_dir(self):
        a = self.args
        self.run_name = a.run_name or f"{self.task.name}_{self.model_tag}"
        self.run_dir = Path(a.out_dir) / self.run_name
        self.ckpt_root = self.run_dir / "checkpoints"
        ckpt_lib.check_run_dir(self.run_dir)  # before any work: one message, exit 2
        self.resume_from = None
        if a.resume:  # the newest intact checkpoint (damaged ones are named and passed over), or exit 2
            self.resume_from = ckpt_lib.resume_checkpoint(self.ckpt_root, a.resume, warn=self.log_pending.append)
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
        if a.max_steps and a.max_steps > 0:
            self.total_steps = int(a.max_steps)
        else:
            self.total_steps = (a.epochs * self.micro_per_epoch) // a.accumulation_steps
        if self.total_steps < 1:
            raise ValueError("no optimizer step to take: more data, more --epochs, or a smaller batch")
        self.warmup = warmup_steps(self.total_steps, a.warmup_iters, a.warmup_ratio)

    def _param_groups(self):
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

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
        if opt is not None:
            params = opt.setdefault("params", {})
            fill(params, "lr", a.learning_rate)
            fill(params, "weight_decay", a.weight_decay)
            fill(params, "betas", [0.9, 0.95])
            fill(params, "eps", 1e-8)
        cfg.pop("scheduler", None)  # the trainer sets the learning rate itself (resumable schedule)
        cfg.setdefault("steps_per_print", 10**9)
        return cfg

    def _setup_optim(self):
        a = self.args
        groups = self._param_groups()
        if self.dist.use_deepspeed:
            import deepspeed

            cfg = self._ds_config()
            self.ds_config = cfg
            self.model.to(self.device)
            optimizer = None
            if cfg.get("optimizer") is None:
                optimizer = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(0.9, 0.95), eps=1e-8)
            engine, opt, _, _ = deepspeed.initialize(model=self.model, model_parameters=groups,
                                                     optimizer=optimizer, config=cfg)
            self.engine = engine
            self.optimizer = opt
            self.train_model = engine
        else:
            self.model.to(self.device)
            fused = self.device.type == "cuda"
            self.optimizer = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                               **({"fused": True} if fused else {}))
            if self.amp_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")
            if self.dist.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=self.is_moe)
            else:
                self.train_model = self.model

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
        if st.get("seed") not in (None, a.seed):
            problems.append(f"seed {st.get('seed')} vs {a.seed}")
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
        if self.engine is not None:
            load_path, _ = self.engine.load_checkpoint(str(self.resume_from / "deepspeed"), tag="state",
                                                       load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {self.resume_from / 'deepspeed'}")
        else:
            ckpt_lib.load_model_weights(self.model, self.resume_from)
            opt = torch.load(self.resume_from / "optimizer.pt", map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(opt["optimizer"])
            if self.scaler is not None and opt.get("scaler"):
                self.scaler.load_state_dict(opt["scaler"])
        rng = self.resume_from / f"rng_rank{self.dist.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        self.step = int(st["step"])
        if self.step >= self.total_steps:
            self.log_pending.append(f"checkpoint is at step {self.step} >= total {self.total_steps}: nothing to do")

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
            "model_tag": self.model_tag, "tokenizer_fingerprint": self.tokenizer_fp,
            "init_from": str(self.init_from) if self.init_from else None,
            "lr": lr_at(max(self.step - 1, 0), self.total_steps, a.learning_rate, self.warmup, a.min_lr_ratio),
            "args": public_args(a),
        }

    def save(self, reason: str = "") -> Path | None:
        t0 = time.time()
        tmp = ckpt_lib.tmp_dir(self.ckpt_root, self.step)
        if self.dist.is_main:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        torch.save(_rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        state_dict = None
        if self.engine is not None:
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
            if self.engine.zero_optimization_stage() == 3:
                state_dict = self.engine._zero3_consolidated_16bit_state_dict()
            else:
                state_dict = self.model.state_dict()
        if self.dist.is_main:
            ckpt_lib.save_hf(self.model, tmp, self.tokenizer, state_dict=state_dict)
            if self.engine is None:
                torch.save({"optimizer": self.optimizer.state_dict(),
                            "scaler": self.scaler.state_dict() if self.scaler is not None else None},
                           tmp / "optimizer.pt")
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
        res = {}
        self.model.eval()
        try:
            with torch.no_grad():
                for name, ds in self.eval_datasets.items():
                    batches = (self.to_device(b) for b in self.eval_loader(ds))
                    with self.autocast():
                        out = self.task.evaluate(self.train_model, batches)
                    for k, v in out.items():
                        res[f"{name}/{k}"] = float(v)
                extra = self.task.extra_eval(self)
            res.update({k: float(v) for k, v in (extra or {}).items()})
        finally:
            self.model.train()
        return res

    # ---------------------------------------------------------------- the loop
    def _moe_stats(self, load: torch.Tensor) -> dict:
        out = {}
        if load is None or load.numel() == 0:
            return out
        L, E = load.shape
        frac = load / load.sum(-1, keepdim=True).clamp_min(1e-12)
        mean = load.mean(-1).clamp_min(1e-12)
        viol = load.max(-1).values / mean - 1
        ent = -(frac.clamp_min(1e-12).log() * frac).sum(-1) / math.log(E) if E > 1 else torch.ones(L)
        for i in range(L):
            out[f"moe/layer{i}/max_violation"] = float(viol[i])
            out[f"moe/layer{i}/routing_entropy"] = float(ent[i])
            for e in range(E):
                out[f"moe/layer{i}/expert{e}_load"] = float(frac[i, e])
        out["moe/max_violation"] = float(viol.max())
        out["moe/routing_entropy"] = float(ent.mean())
        return out

    def train(self) -> int:
        a = self.args
        self.log_pending: list[str] = []
        self._setup_env()
        self._setup_model_and_tokenizer()
        self._setup_run_dir()
        self._setup_data()
        self._setup_optim()
        if self.resume_from is not None:
            self._resume()
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main, total_steps=self.total_steps,
                                resume_step=self.step)
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
        mode = "DeepSpeed" + (f" ZeRO-{self.engine.zero_optimization_stage()}" if self.engine else "") \
            if d.use_deepspeed else ("DDP" if d.world_size > 1 else "single process")
        self.log(f"{self.task.name}: model {self.model_tag} ({nparams / 1e6:.2f}M params"
                 f"{', MoE' if self.is_moe else ''}), {mode}, launcher {d.launcher}, world {d.world_size}, "
                 f"device {self.device}{f' ({torch.get_num_threads()} threads)' if self.device.type == 'cpu' else ''}, "
                 f"backend {d.backend if d.distributed else '-'}, precision {self.precision_note}")
        self.log(f"data: {len(self.train_dataset)} train samples, eval sets {list(self.eval_datasets)}; "
                 f"global batch {self.global_micro} x {a.accumulation_steps} accumulation, seq len {a.max_seq_len}; "
                 f"{self.total_steps} optimizer steps ({self.total_steps * a.accumulation_steps / self.micro_per_epoch:.2f} "
                 f"epochs), lr {a.learning_rate:g} warmup {self.warmup} cosine -> {a.min_lr_ratio:g}x")
        if self.init_from is not None:
            self.log(f"initialised from {self.init_from}")
        if self.resume_from is not None:
            self.log(f"resumed from {self.resume_from} at step {self.step}")
        if a.defaulted:
            self.log("defaults used: " + ", ".join(f"{k}={getattr(a, k)}" for k in a.defaulted))
        self.log(f"run dir {self.run_dir}")
        for m in self.log_pending:
            self.log(m)

    def _train_loader(self, start_step: int) -> DataLoader:
        a = self.args
        sampler = StreamSampler(len(self.train_dataset), a.batch_size, self.dist.world_size, self.dist.rank,
                                a.seed, start_step * a.accumulation_steps, self.total_steps * a.accumulation_steps)
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

    def _set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def _loop(self, stopper: StopSignal) -> int:
        a, d = self.args, self.dist
        accum = a.accumulation_steps
        model = self.train_model
        self.model.train()
        it = iter(self._train_loader(self.step))
        ws = d.world_size
        dev = self.device
        # logging window (device tensors: no sync until a log line)
        win = {"loss": torch.zeros((), dtype=torch.float64, device=dev),
               "count": torch.zeros((), dtype=torch.float64, device=dev),
               "aux": torch.zeros((), dtype=torch.float64, device=dev),
               "tokens": torch.zeros((), dtype=torch.float64, device=dev)}
        win_metrics: dict[str, torch.Tensor] = {}
        win_steps, gnorm_last = 0, float("nan")
        self._load_acc = None
        t_start = time.time()
        t_win = t_start
        steps_at_start = self.step
        exit_code = 0
        last_saved = self.step if self.resume_from is not None else -1
        watch = LauncherWatch(d.launcher)
        while self.step < self.total_steps:
            lr = lr_at(self.step, self.total_steps, a.learning_rate, self.warmup, a.min_lr_ratio)
            self._set_lr(lr)
            micro = [next(it) for _ in range(accum)]
            for b in micro:
                self._check_ids(b)
            local_units = float(sum(float(self.task.count_units(b)) for b in micro))
            units = dist_utils.all_reduce_sum(torch.tensor([local_units], dtype=torch.float64))[0].item()
            step_loss = torch.zeros((), dtype=torch.float64, device=dev)
            for i, b in enumerate(micro):
                b = self.to_device(b)
                last = i == accum - 1
                sync_ctx = model.no_sync() if (not last and hasattr(model, "no_sync") and self.engine is None) \
                    else contextlib.nullcontext()
                with sync_ctx:
                    self._aux = []
                    with self.autocast():
                        loss_sum, count, metrics = self.task.compute_loss(model, b)
                    aux = torch.stack([x.float() for x in self._aux]).mean() if self._aux else None
                    scale = ws / units if units > 0 else 0.0
                    loss = loss_sum.float() * scale
                    if aux is not None:
                        loss = loss + aux / accum
                    if self.engine is not None:
                        self.engine.backward(loss * accum)
                        if not last:
                            self.engine.step()
                    elif self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                self._aux = []
                ls = loss_sum.detach().double()
                step_loss += ls
                win["loss"] += ls
                win["count"] += torch.as_tensor(count, dtype=torch.float64, device=dev)
                if aux is not None:
                    win["aux"] += aux.detach().double()
                am = b.get("attention_mask")
                win["tokens"] += am.sum().double() if am is not None else float(b["input_ids"].numel())
                for k, v in (metrics or {}).items():
                    v = torch.as_tensor(v, dtype=torch.float64, device=dev).detach()
                    win_metrics[k] = win_metrics[k] + v if k in win_metrics else v.clone()
            # agree on stop / non-finite loss (one small collective per step)
            finite = bool(torch.isfinite(step_loss).item())
            if not stopper.requested and watch.gone():
                stopper.request("the deepspeed launcher exited (signal to its PID only)")
            flags = dist_utils.all_reduce_max(torch.tensor([float(stopper.requested), float(not finite)]))
            if flags[1] > 0:
                self.log(f"non-finite loss at step {self.step + 1} (rank-local sum {float(step_loss)}): stopping "
                         f"without an update; the last good checkpoint is kept"
                         + (f" ({ckpt_lib.latest_checkpoint(self.ckpt_root)})" if d.is_main else "")
                         + ". Lower --learning_rate, use float32/bfloat16 or check the data.")
                return 1
            # optimizer step
            if self.engine is not None:
                self.engine.step()
                gn = self.engine.get_global_grad_norm()
                gnorm_last = float(gn) if gn is not None else float("nan")
            else:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                clip = a.grad_clip if a.grad_clip and a.grad_clip > 0 else float("inf")
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                gnorm_last = gn
            if self.is_moe:
                self.model.update_router_bias()  # every rank; the model all-reduces the load itself
            self.step += 1
            win_steps += 1
            self.logger.progress(1)

            final = self.step >= self.total_steps
            stop = flags[0] > 0
            if self.step % a.log_interval == 0 or final or stop:
                rec = self._log_window(win, win_metrics, win_steps, gnorm_last, lr, t_start, t_win, steps_at_start)
                for v in win.values():
                    v.zero_()
                win_metrics = {}
                win_steps = 0
                self._load_acc = None
                t_win = time.time()
                if not math.isfinite(rec["loss"]):
                    pass
            if (a.eval_interval and self.step % a.eval_interval == 0) or final:
                if self.eval_datasets or type(self.task).extra_eval is not _base_extra_eval():
                    t0 = time.time()
                    res = self.evaluate()
                    if res:
                        rec = {"step": self.step, "epoch": round(self.step * accum / self.micro_per_epoch, 4), **res}
                        self.logger.metrics(rec)
                        self.log(f"eval step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in res.items())
                                 + f" ({time.time() - t0:.1f}s)")
                    t_win += time.time() - t0
            if (a.save_interval and self.step % a.save_interval == 0) or final or stop:
                if last_saved != self.step:
                    self.save("final" if final else ("stop signal" if stop else "periodic"))
                    last_saved = self.step
            if stop and not final:
                self.log(f"stopped by signal at step {self.step}/{self.total_steps}; resume with --resume")
                return 0
        if self.step >= self.total_steps and exit_code == 0:
            self.log(f"done: {self.step} steps in {fmt_duration(time.time() - t_start)}; "
                     f"checkpoint {ckpt_lib.latest_checkpoint(self.ckpt_root) if d.is_main else ''}")
        return exit_code

    def _log_window(self, win, win_metrics, win_steps, gnorm, lr, t_start, t_win, steps_at_start) -> dict:
        a = self.args
        keys = list(win)
        mkeys = sorted(win_metrics)
        vec = torch.stack([win[k] for k in keys] + [win_metrics[k] for k in mkeys]).double()
        vec = dist_utils.all_reduce_sum(vec).cpu()
        vals = dict(zip(keys + mkeys, vec.tolist()))
        ws = self.dist.world_size
        now = time.time()
        count = vals["count"]
        done = self.step - steps_at_start
        rate = done / max(now - t_start, 1e-9)
        rec = {
            "step": self.step,
            "epoch": round(self.step * a.accumulation_steps / self.micro_per_epoch, 4),
            "loss": vals["loss"] / count if count > 0 else float("nan"),
            "lr": lr,
            "tokens_per_s": vals["tokens"] / max(now - t_win, 1e-9),
            "elapsed_s": round(now - t_start, 3),
            "eta_s": round((self.total_steps - self.step) / rate, 1) if rate > 0 else None,
            "grad_norm": float(gnorm),
        }
        for k in mkeys:
            rec[k] = vals[k] / count if count > 0 else float("nan")
        if self.is_moe:
            rec["moe/balance_loss"] = vals["aux"] / (win_steps * a.accumulation_steps * ws)
            load = self._load_acc
            if load is not None:
                load = dist_utils.all_reduce_sum(load.to(self.device).double()).cpu()
            rec.update(self._moe_stats(load))
        self.logger.metrics(rec)
        line = (f"{self.task.name} step {self.step}/{self.total_steps} epoch {rec['epoch']:.2f} "
                f"loss {rec['loss']:.4f} lr {lr:.3e} tok/s {rec['tokens_per_s']:,.0f} "
                f"grad_norm {rec['grad_norm']:.3f} elapsed {fmt_duration(rec['elapsed_s'])} "
                f"eta {fmt_duration(rec['eta_s'] if rec['eta_s'] is not None else float('nan'))}")
        if self.is_moe:
            line += f" aux {rec['moe/balance_loss']:.4f}"
            if "moe/max_violation" in rec:
                line += f" max_violation {rec['moe/max_violation']:.3f}"
        for k in mkeys:
            line += f" {k} {rec[k]:.4f}"
        self.log(line)
        return rec


def _base_extra_eval():
    from .tasks import Task

    return Task.extra_eval


def run(task, argv=None) -> int:
    """Parse the flags (``argv`` or ``sys.argv``) and train ``task``; returns the exit status."""
    args = parse_args(task, argv)
    return Trainer(args, task).train()
