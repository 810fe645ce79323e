"""Starting the project's scripts as real subprocesses in tests: environment, free port, launch commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra) -> dict:
    """This environment for a child: the repo importable, one OpenMP thread, wandb offline, no API key."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mateconv-torch-extensions"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["WANDB_MODE"] = env.get("WANDB_MODE", "offline")
    env.pop("WANDB_API_KEY", None)
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(mode: str, script: str = "4.pretrain.py") -> list[str]:
    """``plain`` (one process), ``torchrun`` or ``deepspeed`` (two processes each) running ``script``."""
    if mode == "plain":
        return [sys.executable, script]
    if mode == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), script]
    if mode == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), script]
    raise ValueError(mode)


def run_ok(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo root with :func:`subprocess_env`; a non-zero exit fails with its output."""
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**kw.pop("env", {})), capture_output=True, text=True,
                       timeout=timeout, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p
