"""Launch detection and the few collectives the trainer needs.

One code path for every launch mode:

- plain ``python 4.pretrain.py`` (CPU or one GPU): world size 1, no process group;
- ``torchrun --nproc_per_node N [--nnodes M ...]``: ``RANK/LOCAL_RANK/WORLD_SIZE`` from the environment,
  DistributedDataParallel;
- ``deepspeed [--num_gpus N | --hostfile H] 4.pretrain.py [--deepspeed ds_config.json]``: the launcher
  sets the same variables and passes ``--local_rank``; the trainer builds a real DeepSpeed engine
  (``--deepspeed`` defaults to ``ds_config.json`` under this launcher; ``--deepspeed none`` uses DDP).
- ``python 4.pretrain.py --deepspeed ds_config.json``: a one-process DeepSpeed engine.

The backend is ``nccl`` when CUDA is available, else ``gloo``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    launcher: str  # "plain" | "torchrun" | "deepspeed"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")
    use_deepspeed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.use_deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(local_rank_flag: int = -1, deepspeed_flag: str | None = None) -> DistEnv:
    """Read the launch mode from the environment (no initialisation)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif local_rank_flag >= 0 or "CROSS_RANK" in env:  # the deepspeed launcher passes --local_rank
        launcher = "deepspeed"
    elif "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"  # any env:// launcher (e.g. a scheduler exporting the variables)
    else:
        launcher = "plain"
    rank = int(env.get("RANK", 0))
    world = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    if deepspeed_flag is None:
        use_ds = launcher == "deepspeed"
    else:
        use_ds = str(deepspeed_flag).lower() not in ("", "none", "off", "false", "0")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(launcher=launcher, rank=rank, local_rank=local_rank, world_size=world,
                   local_world_size=max(1, local_world), backend="nccl" if cuda else "gloo",
                   device=device, use_deepspeed=use_ds)


def init(d: DistEnv) -> None:
    """Create the process group (every multi-process run, and any DeepSpeed run)."""
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    if not d.distributed or dist.is_initialized():
        return
    if d.world_size == 1:  # one-process DeepSpeed engine: a private rendezvous
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    kwargs = {"backend": d.backend, "rank": d.rank, "world_size": d.world_size}
    if d.backend == "nccl":
        kwargs["device_id"] = d.device
    dist.init_process_group(**kwargs)
    if d.use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=d.backend, verbose=False)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor on the input's device; identity in one process)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return t.clone()
    dev = t.device
    x = t.detach().to(_comm_device()).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(dev)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not is_initialized() or dist.get_world_size() == 1:
        return t.clone()
    dev = t.device
    x = t.detach().to(_comm_device()).clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.to(dev)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; CPU tensors inside are fine)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse instead of handing them back to the OS.

    A CPU training step frees and allocates the same large activation buffers at every step. By default glibc
    serves blocks over its mmap threshold with fresh ``mmap`` pages and trims its heap after frees, so every
    step pays page faults again (3-5% of a ``mateconv-tiny`` step on 1 core, measured). With a 1 GiB mmap
    threshold and no trimming the process's resident memory stays at its peak and is reused. No-op (False)
    where libc is not glibc. ``MATECONV_KEEP_FREED_MEMORY=0`` turns it off.
    """
    if os.environ.get("MATECONV_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def pick_num_threads(requested: int, local_procs: int, sample_s: float = 0.3) -> tuple[int, str]:
    """Torch threads for this process, and why: ``--num_threads`` when > 0, else ``$OMP_NUM_THREADS``, else
    the cores that are free now (this process's CPU affinity minus the load measured over ``sample_s``
    seconds with psutil, else the 1-minute load average) shared by the ``local_procs`` processes of this node.

    Two threads on two cores where another process is busy are slower than one (OpenMP barriers wait for the
    preempted thread), so a busy core is not counted.
    """
    if requested and requested > 0:
        return int(requested), "--num_threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "$OMP_NUM_THREADS"
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    cores = len(cpus)
    try:
        import psutil

        per_cpu = psutil.cpu_percent(interval=sample_s, percpu=True)
        busy = sum(per_cpu[c] for c in cpus if c < len(per_cpu)) / 100.0
        how = f"psutil over {sample_s:g} s"
    except Exception:  # noqa: BLE001 - no psutil / no /proc: the load average
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        how = "1-min load average"
    free = max(1, min(cores, int(cores - busy + 0.5)))
    n = max(1, free // max(1, local_procs))
    return n, (f"{free} of {cores} cores free (busy {busy:.1f}, {how})"
               + (f" / {local_procs} local processes" if local_procs > 1 else ""))
