"""Run logs for ``nohup ... &`` + ``tail -f``: plain lines, ``metrics.jsonl``, a bar on a TTY, wandb.

Only rank 0 writes. Every ``--log_interval`` optimizer steps it prints one plain line (flushed) and
appends the same fields as one JSON object to ``<run_dir>/metrics.jsonl``; ``train.log`` in the run
directory gets the plain lines too. A tqdm progress bar is shown only when stdout is a terminal.

wandb (``--use_wandb``): online when an API key is available (``WANDB_API_KEY`` or ``wandb login``),
else offline (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later); ``WANDB_MODE`` wins when
set. The run config is the public arguments (nothing named like a key/token/secret); the API key is
never logged. Checkpoints are uploaded as artifacts only with ``--wandb_log_model``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def fmt_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _wandb_has_key() else "offline"


class RunLogger:
    def __init__(self, run_dir: Path | None, enabled: bool, total_steps: int = 0, resume_step: int = 0,
                 prefix: str = ""):
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir else None
        self.prefix = prefix
        self.wandb = None
        self.bar = None
        self._log_file = None
        self._metrics = None
        if not enabled:
            return
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            mpath = self.run_dir / "metrics.jsonl"
            kept = []
            if resume_step > 0 and mpath.is_file():  # drop what the resumed run will log again
                for line in mpath.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        continue
            with open(mpath, "w", encoding="utf-8") as f:
                f.write("".join(k + "\n" for k in kept))
            self._metrics = open(mpath, "a", encoding="utf-8", buffering=1)
            self._log_file = open(self.run_dir / "train.log", "a", encoding="utf-8", buffering=1)
        self.set_total(total_steps, resume_step)

    def set_total(self, total_steps: int, initial: int = 0) -> None:
        """The number of steps (known after the setup); shows the progress bar on a terminal."""
        if not self.enabled or total_steps <= 0 or not sys.stdout.isatty():
            return
        if self.bar is not None:
            self.bar.total, self.bar.n = total_steps, initial
            self.bar.refresh()
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, dynamic_ncols=True, leave=True)
        except ImportError:
            self.bar = None

    # ---- plain lines
    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {self.prefix}{msg}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self._log_file is not None:
            self._log_file.write(line + "\n")

    def progress(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    # ---- structured
    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._metrics is not None:
            self._metrics.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
        if self.wandb is not None:
            step = record.get("step")
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    # ---- wandb
    def init_wandb(self, project: str, name: str, config: dict, resume_step: int = 0) -> None:
        if not self.enabled:
            return
        import wandb

        mode = wandb_mode()
        id_file = self.run_dir / "wandb_id.txt" if self.run_dir else None
        run_id = None
        if id_file is not None and resume_step > 0 and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            import secrets
            import string

            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.wandb = wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                                dir=str(self.run_dir) if self.run_dir else None, config=config)
        if id_file is not None:
            id_file.write_text(run_id + "\n")
        self.info(f"wandb: {mode} run {run_id} (project {project})"
                  + ("; upload later with `wandb sync " + str(self.run_dir / "wandb") + "/offline-run-*`"
                     if mode == "offline" else ""))

    def log_artifact(self, path: Path, name: str, aliases=None) -> None:
        if self.wandb is None:
            return
        import wandb

        art = wandb.Artifact(name, type="model")
        art.add_dir(str(path))
        self.wandb.log_artifact(art, aliases=aliases or ["latest"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        for f in (self._metrics, self._log_file):
            if f is not None:
                f.close()
        self._metrics = self._log_file = None
