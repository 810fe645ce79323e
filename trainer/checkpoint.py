"""Checkpoints: a Hugging Face model directory plus the trainer state, written atomically.

Layout of a run directory (``<out_dir>/<run_name>/``)::

    args.json  metrics.jsonl  train.log
    checkpoints/
        latest                      # text file: name of the newest complete checkpoint
        step_0000200/
            config.json  model.safetensors  (+ MateConv code files, tokenizer files)
            trainer_state.json      # step, epoch, world size, batch geometry, seed, tokenizer fingerprint, ...
            optimizer.pt            # optimizer (+ fp16 grad scaler) state (plain / DDP runs)
            rng_rank{r}.pt          # RNG states of every rank
            deepspeed/              # DeepSpeed runs: the engine's own checkpoint (ZeRO partitions, optimizer)

A checkpoint is written into ``checkpoints/.tmp-step_XXXXXXX`` and renamed when every file is in
place (``trainer_state.json`` is the last file written); ``latest`` is replaced atomically after the
rename. A process killed at any moment therefore leaves the previous complete checkpoint, and the
``latest`` pointer, intact; stale ``.tmp-*`` directories are removed at the next start. The last
``--keep_checkpoints`` checkpoints are kept. Multi-node runs need ``--out_dir`` on a filesystem that
all nodes share.

``resolve_checkpoint(path)`` accepts a checkpoint directory, a run directory or its ``checkpoints/``
directory (-> the latest complete checkpoint). The HF directory loads with
``MateConvForCausalLM.from_pretrained(ckpt)`` and ``AutoModelForCausalLM.from_pretrained(ckpt,
trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")
# fault injection for tests: seconds to sleep inside the temporary directory, before the rename
_PAUSE_ENV = "MATECONV_DEBUG_SAVE_PAUSE"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(ckpt: Path) -> bool:
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        return False
    try:
        return bool(json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) or \
        (path / "pytorch_model.bin").is_file()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        cand = ckpt_root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(cand):
            return cand
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path) -> Path | None:
    """A checkpoint dir, a run dir or a ``checkpoints/`` dir -> the checkpoint directory (or None)."""
    path = Path(path)
    if not path.exists():
        return None
    if is_complete(path) or (is_model_dir(path) and not (path / "checkpoints").is_dir()):
        return path
    for root in (path / "checkpoints", path):
        c = latest_checkpoint(root)
        if c is not None:
            return c
    return None


def read_state(ckpt: Path) -> dict:
    p = Path(ckpt) / STATE_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def clean_stale(ckpt_root: Path) -> None:
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def tmp_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f".tmp-{step_name(step)}"


def finalize(ckpt_root: Path, step: int, state: dict, keep: int) -> Path:
    """(rank 0) Write the state last, rename the temporary directory, move ``latest``, prune."""
    ckpt_root = Path(ckpt_root)
    tmp = tmp_dir(ckpt_root, step)
    state = dict(state, complete=True, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_atomic(tmp / STATE_FILE, json.dumps(state, indent=2, ensure_ascii=False))
    _fsync_dir(tmp)
    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)
    final = ckpt_root / step_name(step)
    if final.exists():  # the same step saved again (e.g. stop right after a periodic save, or a re-run)
        old = ckpt_root / f".old-{step_name(step)}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    write_atomic(ckpt_root / LATEST, final.name + "\n")
    if keep and keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def save_hf(model, out_dir: Path, tokenizer=None, state_dict=None) -> None:
    """HF directory: config + safetensors (+ tokenizer files)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        state_dict = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                      for k, v in state_dict.items()}
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def load_model_weights(model, ckpt: Path) -> None:
    """Load the checkpoint's weights into ``model`` strictly (shapes and names must match)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {ckpt}")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    own = model.state_dict()
    # tied embeddings: the saved file holds one of the two names
    for k in own:
        if k not in sd:
            tied = getattr(model.config, "tie_word_embeddings", False)
            if tied and k.endswith("lm_head.weight"):
                src = [n for n in sd if n.endswith("embed_tokens.weight")]
                if src:
                    sd[k] = sd[src[0]]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"checkpoint {ckpt} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
