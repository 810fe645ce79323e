"""Checkpoints: a Hugging Face model directory plus the trainer state, written atomically.

Layout of a run directory (``<out_dir>/<run_name>/``)::

    args.json  metrics.jsonl  train.log
    checkpoints/
        latest                      # text file: name of the newest complete checkpoint
        step_0000200/
            config.json  model.safetensors  (+ MateConv code files, tokenizer files)
            weights_checksums.json  # size + sha256 of model.safetensors, optimizer.pt, rng_rank*.pt
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

Damaged checkpoints: every weight file's size and sha256 are recorded in ``weights_checksums.json``
(``model.integrity``) before ``trainer_state.json``; :func:`load_model_weights` checks them (and the
safetensors structure) first and names a damaged file. ``--resume`` takes the newest checkpoint that
passes the check (:func:`resume_checkpoint`), with a warning for each damaged one it passes over.

``resolve_checkpoint(path)`` accepts a checkpoint directory, a run directory or its ``checkpoints/``
directory (-> the latest complete checkpoint). The HF directory loads with
``MateConvForCausalLM.from_pretrained(ckpt)`` and ``AutoModelForCausalLM.from_pretrained(ckpt,
trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from model.integrity import CHECKSUM_FILE, DamagedWeightsError, checksum_files, verify_model_dir

# checkpoint discovery lives in model/loading.py (model.load resolves run directories too): re-exported here
from model.loading import (  # noqa: F401
    LATEST,
    STATE_FILE,
    is_complete,
    is_model_dir,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)

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
    write_atomic(tmp / CHECKSUM_FILE, json.dumps(checksum_files(tmp), indent=2))
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
    verify_model_dir(ckpt)
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - SafetensorError and OSError: name the file
            raise DamagedWeightsError(f, f"{type(e).__name__}: {e}") from None
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


class ResumeError(SystemExit):
    """``--resume`` cannot continue; the message is printed without a traceback (exit status 1)."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"error: {message}")

    def __str__(self) -> str:
        return self.message


def verify_checkpoint(ckpt: Path) -> None:
    """Raise ``DamagedWeightsError`` naming the file when a file of ``ckpt`` is damaged (all recorded
    files: weights, optimizer state, RNG states)."""
    verify_model_dir(ckpt, only_weights=False)


def resume_checkpoint(ckpt_root: Path, requested: str = "latest", warn=print) -> Path:
    """The checkpoint ``--resume`` continues from.

    ``requested="latest"``: the newest complete checkpoint of ``ckpt_root`` that passes
    :func:`verify_checkpoint`; each damaged one passed over is reported with ``warn``. Another value
    is a checkpoint or run directory: it must be complete and intact. Raises :class:`ResumeError`
    (a clear message, no traceback) when there is nothing to resume from.
    """
    ckpt_root = Path(ckpt_root)
    if requested != "latest":
        ck = resolve_checkpoint(requested)
        if ck is None or not is_complete(ck):
            raise ResumeError(f"--resume {requested}: not a complete trainer checkpoint (no {STATE_FILE} marked "
                              f"complete there)")
        try:
            verify_checkpoint(ck)
        except DamagedWeightsError as e:
            raise ResumeError(f"--resume {requested}: {e}") from None
        return ck
    cands = list_checkpoints(ckpt_root)[::-1]
    latest = latest_checkpoint(ckpt_root)
    if latest is not None and latest in cands:
        cands.remove(latest)
        cands.insert(0, latest)
    if not cands:
        raise ResumeError(f"--resume: no complete checkpoint in {ckpt_root}: nothing to resume (run without "
                          f"--resume to start this run, or pass --resume PATH)")
    damaged = []
    for ck in cands:
        try:
            verify_checkpoint(ck)
        except DamagedWeightsError as e:
            damaged.append(str(e))
            warn(f"warning: {e}; falling back to an older checkpoint")
            continue
        if damaged:
            warn(f"warning: resuming from {ck.name}, the newest checkpoint that passes the check "
                 f"({len(damaged)} newer one(s) damaged)")
        return ck
    raise ResumeError(f"--resume: every checkpoint in {ckpt_root} is damaged: " + "; ".join(damaged))


def check_run_dir(run_dir: Path) -> None:
    """The run directory can be written (checked before any work): else exit with one clear message."""
    from dataset.paths import OutputPathError, check_output_dir

    try:
        check_output_dir(run_dir, "run directory")
        check_output_dir(Path(run_dir) / "checkpoints", "checkpoint directory")
    except OutputPathError as e:
        raise SystemExit(f"error: {e} (choose another --out_dir / --run_name)") from None
