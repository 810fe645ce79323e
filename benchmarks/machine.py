"""The machine a benchmark ran on, for its first output line: CPU model, ``amx_bf16`` when present, cores."""

from __future__ import annotations

import os
import subprocess


def describe_cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return f"? ({os.cpu_count()} cores)"
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return name + (" (amx_bf16)" if "amx_bf16" in out else " (no amx_bf16)") + f", {os.cpu_count()} cores"
