"""The machine a benchmark ran on, for its first output line: CPU model, its bf16 matmul flags (``amx_bf16``, ``avx512_bf16``), cores."""

from __future__ import annotations

import os
import subprocess


def describe_cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return f"? ({os.cpu_count()} cores)"
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in out.split()]
    return name + f" ({', '.join(flags) or 'no amx_bf16 / avx512_bf16'})" + f", {os.cpu_count()} cores"
