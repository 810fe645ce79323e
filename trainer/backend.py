"""What differs between a DeepSpeed engine and plain PyTorch (one process / DDP, fp16 loss scaling),
behind one small object: ``train_model``, ``micro_context``, ``backward``, ``step``, ``save``, ``load``.

The training loop calls, per optimizer step of ``accum`` micro-batches::

    for i, batch in enumerate(micro):
        with backend.micro_context(last=i == accum - 1):   # DDP: no gradient all-reduce before the last
            loss = ...                                     # normalised by the global unit count
            backend.backward(loss, last)
    grad_norm = backend.step()                             # clip, optimizer step, zero the gradients

``save(tmp_dir, is_main)`` writes the optimizer state (``optimizer.pt`` | ``deepspeed/``) and returns the model
state dict to write as the HF directory (None: ``model.state_dict()``); ``load(ckpt)`` restores weights and
optimizer state.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import checkpoint as ckpt_lib


class PlainBackend:
    """One process or DDP: autograd backward (float16: ``GradScaler``), global-norm clipping, optimizer step."""

    def __init__(self, model, optimizer, *, dist, amp_dtype, grad_clip: float, find_unused: bool):
        self.model, self.optimizer = model, optimizer
        self.grad_clip = grad_clip if grad_clip and grad_clip > 0 else float("inf")
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.ddp = dist.world_size > 1
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = dist.device
            self.train_model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=find_unused)
        else:
            self.train_model = model
        self.name = "DDP" if self.ddp else "single process"

    def micro_context(self, last: bool):
        return self.train_model.no_sync() if self.ddp and not last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(gn)

    def save(self, tmp: Path, is_main: bool):
        if is_main:
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler is not None else None},
                       Path(tmp) / "optimizer.pt")
        return None

    def load(self, ckpt: Path) -> None:
        ckpt_lib.load_model_weights(self.model, ckpt)
        opt = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        if self.scaler is not None and opt.get("scaler"):
            self.scaler.load_state_dict(opt["scaler"])


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO, its precision and clipping from the config); the engine scales the loss by
    ``1 / gradient_accumulation_steps`` itself and steps at the accumulation boundary."""

    def __init__(self, model, groups, cfg: dict, *, accum: int, optimizer=None):
        import deepspeed

        self.model, self.accum = model, accum
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                                 optimizer=optimizer, config=cfg)
        self.train_model = self.engine
        self.name = f"DeepSpeed ZeRO-{self.engine.zero_optimization_stage()}"

    def micro_context(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss * self.accum)
        if not last:
            self.engine.step()  # not a boundary: the engine only counts the micro-step

    def step(self) -> float:
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def save(self, tmp: Path, is_main: bool):
        self.engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag="state", save_latest=False)
        if self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.model.state_dict()

    def load(self, ckpt: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(Path(ckpt) / "deepspeed"), tag="state",
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {Path(ckpt) / 'deepspeed'}")
