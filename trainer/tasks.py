"""What a training stage is, for the shared trainer: the ``Task`` interface, and pretraining / SFT.

A stage script builds its arguments and calls ``trainer.run(task)``; the trainer does everything else
(launch, model, optimizer, schedule, precision, accumulation, checkpoints, logs, signals). A task only
says which data it trains on and how a micro-batch turns into a loss.

The interface (``trainer/dpo.py`` implements it too)::

    class Task:
        name: str          # "pretrain" | "sft" | "dpo"; run dir default <out_dir>/<name>_<model-tag>
        defaults, cpu_defaults: dict                           # this stage's defaults (see trainer/args.py)
        def resolve_args(self, args, on_cpu) -> None           # optional: derived defaults (trainer/args.py)
        def build_datasets(self, args, tokenizer) -> (train_ds, {eval_name: eval_ds})
        def collate_fn(self, tokenizer) -> callable             # list of items -> batch dict
        def compute_loss(self, model, batch) -> Loss
        def evaluate(self, model, eval_batches_iter) -> dict[str, float]   # optional
        def on_train_start(self, trainer) -> None                          # optional hook
        def extra_eval(self, trainer) -> dict[str, float]                  # optional hook
        def count_units(self, batch) -> int | Tensor                       # optional
        @staticmethod
        def add_args(parser) -> None                                       # stage-specific flags

``compute_loss`` contract (returns a :class:`Loss`):

- ``model`` is what the trainer trains: the bare model, a DDP wrapper or a DeepSpeed engine; call it as
  ``model(input_ids, attention_mask=...)`` and read ``.logits``, or (``LMTask``) pass ``targets=`` and read
  ``.nll_sum`` / ``.nll_count`` (the fused LM head + cross-entropy while training, no logits). The trainer runs
  the call under autocast and moves the batch to the device before.
- ``Loss.sum``: the loss *summed* over the units of this micro-batch (target tokens for pretraining /
  SFT, preference pairs for DPO); this is also the logged ``loss``. ``Loss.count``: the number of units.
  ``Loss.metrics``: extra scalars, also sums over units (e.g. ``{"rewards/accuracies": n_correct}``); the
  trainer divides them by the global unit count of the logging window.
- ``Loss.aux``: the MoE balance loss of this micro-batch's training forward (``out.aux_loss``, a mean,
  ``aux_loss_alpha`` already applied inside the model), or None. The task passes it explicitly; the
  objective is ``Loss.sum · world / N + Loss.aux / accumulation_steps`` (N below), i.e. the token-mean loss
  of the global batch plus the balance loss averaged over its micro-batches.
- The trainer normalises by the *global* unit count ``N`` of the optimizer step (all ranks, all accumulated
  micro-batches), which it gets before the backward passes from ``count_units(batch)`` (default:
  the number of ``targets != IGNORE_INDEX`` when the batch has ``targets``, else the batch size). A task
  whose ``count`` is something else must override ``count_units`` so that both agree. So one process with
  global batch B gives the same gradients as N processes with B/N each.

``evaluate(model, batches)`` is called once per eval set with this rank's shard of that set (model in
eval mode, under ``torch.no_grad`` and autocast, batches on the device); the default returns
``{"loss": mean loss per unit}``, reduced over all ranks with :func:`trainer.distributed.all_reduce_sum`.
The trainer logs it as ``<eval_name>/<key>`` (e.g. ``val/loss``). An override must reduce over ranks too.
Every rank calls ``evaluate``, ``on_train_start`` and ``extra_eval`` (they may use collectives).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from model.losses import IGNORE_INDEX

from . import distributed as dist_utils


@dataclass
class Loss:
    """One micro-batch's loss, as :meth:`Task.compute_loss` returns it (see the module docstring)."""

    sum: torch.Tensor
    count: torch.Tensor | int
    metrics: dict = field(default_factory=dict)
    aux: torch.Tensor | None = None


DEFAULT_PRETRAIN_BIN = "data/pretrain/pretrain_train.bin"


def build_default_pretrain_bin(tokenizer_path=None) -> None:
    """No ``--data_path`` and no default ``.bin`` yet: rank 0 runs ``python 3.pretrain.py`` (embedded corpus),
    the other ranks wait."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    if dist_utils.rank() == 0:
        cmd = [sys.executable, str(root / "3.pretrain.py")] + (["--tokenizer", str(tokenizer_path)]
                                                               if tokenizer_path else [])
        print(f"{DEFAULT_PRETRAIN_BIN} not found: building it from the embedded corpus: {' '.join(cmd)}",
              flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"`python 3.pretrain.py` failed ({rc}); build the pretraining data first", flush=True)
    dist_utils.barrier()


class Task:
    """Base class of a training stage (see the module docstring for the contract)."""

    name: str = "task"
    #: when set (e.g. "pretrain"), ``--init_from`` defaults to ``<out_dir>/<init_from_stage>_<model tag>``
    #: and a missing checkpoint is an error (``--init_from none`` starts from random weights on purpose)
    init_from_stage: str | None = None
    #: stage defaults on CPU (applied only when the run is on CPU and the flag is not given)
    cpu_defaults: dict = {}
    #: stage defaults for the shared flags (``trainer.args``): e.g. {"learning_rate": 2e-5}
    defaults: dict = {}

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        """Add stage-specific flags."""

    def build_datasets(self, args, tokenizer) -> tuple[Dataset, dict[str, Dataset]]:
        raise NotImplementedError

    def collate_fn(self, tokenizer) -> Callable:
        from dataset.collate import pad_collate
        from dataset.datasets import pad_token_id

        return pad_collate(pad_token_id(tokenizer))

    def resolve_args(self, args, on_cpu: bool) -> None:
        """Derived defaults of this stage's own flags (called by ``trainer.args.fill_defaults``)."""

    def compute_loss(self, model, batch) -> Loss:
        raise NotImplementedError

    def count_units(self, batch) -> torch.Tensor | int:
        """Units of a (CPU) batch, as ``compute_loss`` will count them; used to normalise before backward."""
        if "targets" in batch:
            return int((batch["targets"] != IGNORE_INDEX).sum())
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return int(first.size(0))

    def evaluate(self, model, eval_batches_iter: Iterable[dict]) -> dict[str, float]:
        total = torch.zeros(2, dtype=torch.float64)
        for batch in eval_batches_iter:
            loss = self.compute_loss(model, batch)
            total += torch.tensor([float(loss.sum), float(loss.count)], dtype=torch.float64)
        total = dist_utils.all_reduce_sum(total)
        return {"loss": float(total[0] / total[1]) if total[1] > 0 else float("nan")}

    def on_train_start(self, trainer) -> None:
        """Called once on every rank after model, data and optimizer are ready, before step 1."""

    def extra_eval(self, trainer) -> dict[str, float]:
        """Called on every rank at each evaluation; returns extra metrics to log (rank 0's are logged)."""
        return {}


def add_bpc_args(parser, what: str) -> None:
    parser.add_argument("--bpc_path", default=None,
                        help=f"held-out JSONL for bits per character at each evaluation (val/bpc), scored by "
                             f"evaluation.bpc.HeldoutBPC [{what}]")
    parser.add_argument("--bpc_samples", type=int, default=None,
                        help="records of --bpc_path in the fixed seeded sample, spread over the whole file "
                             "(0: no val/bpc) [200]")


class LMTask(Task):
    """Next-token cross-entropy over ``targets != IGNORE_INDEX`` (shared by pretraining and SFT)."""

    pass_attention_mask = True

    def compute_loss(self, model, batch) -> Loss:
        # targets=: the model returns the NLL sum itself (LM head + cross-entropy fused and chunked when training,
        # the plain logits path under no_grad / ZeRO-3; see MateConvForCausalLM.forward); DDP and DeepSpeed
        # engines pass the keyword through
        kw = {"targets": batch["targets"]}
        if self.pass_attention_mask and "attention_mask" in batch:
            kw["attention_mask"] = batch["attention_mask"]
        out = model(batch["input_ids"], **kw)
        return Loss(out.nll_sum, out.nll_count, aux=out.aux_loss if model.training else None)


class PretrainTask(LMTask):
    """Pretraining on a packed ``.bin`` (windows of ``max_seq_len + 1`` tokens; no padding)."""

    name = "pretrain"
    defaults = {"learning_rate": 2e-4, "accumulation_steps": 8, "epochs": 1, "bpc_samples": 200}
    # CPU recipe (benchmarks/README.md, "CPU pretraining recipe"): Muon on the hidden matrices + AdamW on the
    # rest beat AdamW alone at equal steps and time; the AdamW part (embeddings 3e-2, norms and router 1.5e-2) gains
    # from rates far above AdamW-alone's; batch 32 x 128 beat 16 by 0.13 bits/char at equal time (a fixed-time batch
    # sweep: larger batches run more tokens per second on CPU; 24-48 are a plateau); evaluations every 200 steps keep
    # their cost small
    cpu_defaults = {"batch_size": 32, "accumulation_steps": 1, "max_seq_len": 128, "max_steps": 200,
                    "optimizer": "muon", "muon_lr": 0.02, "learning_rate": 1.5e-2, "embedding_lr": 3e-2,
                    "warmup_ratio": 0.05,
                    "num_workers": 0, "log_interval": 20, "save_interval": 100, "eval_interval": 200,
                    "eval_batches": 5, "bpc_samples": 100}
    pass_attention_mask = False  # full windows: no padding, the causal mask is enough

    @staticmethod
    def add_args(parser):
        parser.add_argument("--eval_data_path", default=None,
                            help="validation .bin (default: pretrain_validation.bin beside --data_path)")
        add_bpc_args(parser, "the JSONL the validation .bin was built from (its sidecar's sources)")

    #: CPU --learning_rate when --optimizer adamw is chosen: AdamW alone is best at 2e-3 (the Muon recipe's 1.5e-2 is
    #: for the few parameters AdamW keeps beside Muon)
    cpu_adamw_learning_rate = 2e-3

    def resolve_args(self, args, on_cpu: bool) -> None:
        if on_cpu and args.optimizer == "adamw" and "learning_rate" in getattr(args, "defaulted", ()):
            args.learning_rate = self.cpu_adamw_learning_rate
        if args.bpc_path is None:
            path = Path(args.data_path or DEFAULT_PRETRAIN_BIN)
            val = Path(args.eval_data_path) if args.eval_data_path else \
                path.with_name(path.name.replace("_train", "_validation"))
            args.bpc_path = _bin_text_source(val) or (None if args.data_path else
                                                      "data/embedded/pretrain_validation.jsonl")

    def build_datasets(self, args, tokenizer):
        from dataset.datasets import PretrainDataset, or_exit

        path = Path(args.data_path or DEFAULT_PRETRAIN_BIN)
        if not path.is_file() and not args.data_path:
            build_default_pretrain_bin(args.tokenizer)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretraining data {path} not found: build it first with `python 3.pretrain.py` "
                f"(embedded corpus -> data/pretrain/pretrain_{{train,validation}}.bin), or pass --data_path")
        train = or_exit("pretraining data", PretrainDataset, path, args.max_seq_len, tokenizer)
        evals = {}
        eval_path = Path(args.eval_data_path) if args.eval_data_path else \
            path.with_name(path.name.replace("_train", "_validation"))
        if eval_path != path and eval_path.is_file():
            evals["val"] = or_exit("pretraining validation data", PretrainDataset, eval_path, args.max_seq_len, tokenizer)
        return train, evals


def _bin_text_source(bin_path: Path) -> str | None:
    """The ``{"text"}`` JSONL a ``.bin`` was built from (its sidecar's only source), if it is still there."""
    import json

    side = Path(bin_path).with_suffix(".json")
    try:
        sources = json.loads(side.read_text(encoding="utf-8")).get("sources") or []
    except (OSError, ValueError):
        return None
    return sources[0] if len(sources) == 1 and str(sources[0]).endswith(".jsonl") and Path(sources[0]).is_file() \
        else None


class SFTTask(LMTask):
    """Supervised fine-tuning on chat JSONL (loss on the assistant answers and their end token)."""

    name = "sft"
    defaults = {"learning_rate": 2e-5, "accumulation_steps": 1, "epochs": 1, "bpc_samples": 200}
    cpu_defaults = {"batch_size": 16, "max_seq_len": 192, "max_steps": 100, "learning_rate": 3e-4,
                    "warmup_ratio": 0.05, "num_workers": 0, "log_interval": 20, "save_interval": 100,
                    "eval_interval": 50, "eval_batches": 10, "bpc_samples": 100}
    #: ``--init_from`` default: the latest checkpoint of ``<out_dir>/pretrain_<model tag>``
    init_from_stage = "pretrain"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--eval_data_path", default=None,
                            help="validation JSONL (default: sft_validation.jsonl beside --data_path)")
        add_bpc_args(parser, "the validation JSONL (answers only)")
        parser.add_argument("--replay_path", default=None,
                            help="a pretraining .bin (3.pretrain.py) whose windows are mixed into the SFT data, "
                                 "so that the model keeps what pretraining taught it (rehearsal)")
        parser.add_argument("--replay_ratio", type=float, default=0.0,
                            help="with --replay_path: fraction of the training items that are pretraining "
                                 "windows (of --max_seq_len tokens each) [0.0]")
        parser.add_argument("--group_by_length", action="store_true",
                            help="batches of items of similar length (sorted within runs of 16 batches, in random "
                                 "order): less padding, more items per second (transformers' flag of that name)")
        from dataset.datasets import add_data_args

        add_data_args(parser)  # --on_error, --cache_dir, --data_workers

    def resolve_args(self, args, on_cpu: bool) -> None:
        if args.bpc_path is None:
            if args.eval_data_path:
                args.bpc_path = args.eval_data_path
            elif args.data_path:
                p = Path(args.data_path)
                args.bpc_path = str(p.with_name(p.name.replace("_train", "_validation"))) \
                    if "_train" in p.name else None
            else:
                args.bpc_path = "data/embedded/sft_validation.jsonl"

    def build_datasets(self, args, tokenizer):
        from dataset.datasets import SFTDataset, training_dataset

        if args.data_path:
            path = Path(args.data_path)
        else:
            from dataset.embedded import ensure_embedded

            path = Path(ensure_embedded("data/embedded")["sft_train"])
        if not path.is_file():
            raise FileNotFoundError(f"SFT data {path} not found (pass --data_path)")
        train = training_dataset(SFTDataset, path, tokenizer, args, what="SFT data")
        if args.replay_ratio or args.replay_path:  # one check: both flags or neither, the ratio a fraction
            if not args.replay_path:
                raise SystemExit("error: --replay_ratio needs --replay_path (a pretraining .bin from 3.pretrain.py)")
            if not 0.0 < args.replay_ratio < 1.0:
                raise SystemExit(f"error: --replay_ratio {args.replay_ratio}: expected a fraction in (0, 1) "
                                 "with --replay_path")
            from dataset.datasets import PretrainDataset, ReplayMix, or_exit

            replay = or_exit("replay data", PretrainDataset, args.replay_path, args.max_seq_len, tokenizer)
            train = ReplayMix(train, replay, args.replay_ratio)
            if dist_utils.rank() == 0:
                print(train.describe(), flush=True)
        evals = {}
        eval_path = Path(args.eval_data_path) if args.eval_data_path else \
            path.with_name(path.name.replace("_train", "_validation"))
        if eval_path != path and eval_path.is_file():
            evals["val"] = training_dataset(SFTDataset, eval_path, tokenizer, args, what="SFT validation data")
        return train, evals
