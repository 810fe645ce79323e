"""Loading a model: ``model.load(path) -> (model, tokenizer)`` and the path resolution behind it.

``path`` may be any of (tried in this order):

1. a **model directory**: ``config.json`` + weights, i.e. a trainer checkpoint
   (``<run>/checkpoints/step_XXXXXXX/``), a ``save_pretrained`` directory, or an **exported native**
   directory (``python -m model.export``: llama / granitemoeshared / glm4_moe, loaded with
   ``AutoModelForCausalLM``);
2. a **trainer run directory** (``<out_dir>/<run_name>/``) or its ``checkpoints/`` directory -> the
   checkpoint named by ``checkpoints/latest`` when complete, else the newest complete one;
3. a **pipeline run directory** (``run.json`` and/or ``arms/``, docs/ARCHITECTURE.md) -> the baseline
   arm (``run.json``'s ``baseline_arm``; else ``dense`` when present, else the first arm by name), its
   lowest seed, and the **latest stage present** of ``dpo``, ``sft``, ``pretrain`` (the model the
   pipeline ends with); a seed directory ``arms/<arm>/seed<k>/`` resolves the same way.

Anything else is a ``FileNotFoundError`` naming the path and what was expected. The trainer's
``trainer.checkpoint`` re-exports the checkpoint helpers defined here (one owner).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

STATE_FILE = "trainer_state.json"
LATEST = "latest"
STAGES_NEWEST_FIRST = ("dpo", "sft", "pretrain")
_STEP_RE = re.compile(r"^step_(\d+)$")
_SEED_RE = re.compile(r"^seed(\d+)$")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


# ----------------------------------------------------------------------------------- trainer checkpoints


def is_complete(ckpt) -> bool:
    """A trainer checkpoint whose ``trainer_state.json`` says it is complete."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        return False
    try:
        return bool(json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def is_model_dir(path) -> bool:
    """``config.json`` and weights (safetensors or ``pytorch_model.bin``)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) or \
        (path / "pytorch_model.bin").is_file()


def list_checkpoints(ckpt_root) -> list[Path]:
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


def latest_checkpoint(ckpt_root) -> Path | None:
    """The checkpoint ``latest`` names when it is complete, else the newest complete one (or None)."""
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


# ----------------------------------------------------------------------------------- pipeline run dirs


def _seed_dirs(arm_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in arm_dir.iterdir() if p.is_dir() and (m := _SEED_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _from_seed_dir(seed_dir: Path) -> Path | None:
    for stage in STAGES_NEWEST_FIRST:
        if (seed_dir / stage).is_dir():
            ck = resolve_checkpoint(seed_dir / stage)
            if ck is not None:
                return ck
    return None


def _from_pipeline_run(run_dir: Path) -> Path | None:
    arms_dir = run_dir / "arms"
    if not arms_dir.is_dir():
        return None
    arms = sorted(p.name for p in arms_dir.iterdir() if p.is_dir())
    baseline = None
    try:
        baseline = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("baseline_arm")
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    order = ([baseline] if baseline in arms else []) + (["dense"] if "dense" in arms else []) + arms
    for arm in dict.fromkeys(order):
        for seed_dir in _seed_dirs(arms_dir / arm):
            ck = _from_seed_dir(seed_dir)
            if ck is not None:
                return ck
    return None


def resolve_model_dir(path) -> Path:
    """Any accepted ``path`` (module doc) -> the model directory to load; FileNotFoundError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return path
    found = resolve_checkpoint(path)
    if found is None and path.is_dir():
        found = _from_seed_dir(path) if any((path / s).is_dir() for s in STAGES_NEWEST_FIRST) \
            else _from_pipeline_run(path)
    if found is None:
        raise FileNotFoundError(
            f"no model in {path}: expected a model directory (config.json + weights, e.g. a checkpoint or an "
            f"exported native directory), a trainer run directory with a complete checkpoint "
            f"(checkpoints/latest), or a pipeline run directory (arms/<arm>/seed<k>/{{dpo,sft,pretrain}})")
    return Path(found)


# ----------------------------------------------------------------------------------- loading


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_dir(model_dir, device: str | None = None, dtype=None):
    """Weights of a resolved model directory -> model in eval mode on ``device``.

    A MateConv checkpoint loads as ``MateConvForCausalLM``; any other ``model_type`` (our native
    exports, any HF causal LM) with ``AutoModelForCausalLM``. ``dtype``: a ``torch.dtype``, its name
    (``"float32"``, ``"bfloat16"``) or None (the checkpoint's own). This is the one place weights are
    read for inference: checks of the files belong here, before ``from_pretrained``.
    """
    import torch

    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in model directory {model_dir}")
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"unreadable {cfg_file}: {e}") from None
    from .integrity import verify_model_dir

    verify_model_dir(model_dir)  # a truncated / changed weight file is named (DamagedWeightsError)
    kwargs = {}
    if dtype is not None:
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
            dtype = getattr(torch, dtype)
        kwargs["dtype"] = dtype
    if model_type == "mateconv":
        from .modeling_mateconv import MateConvForCausalLM

        model = MateConvForCausalLM.from_pretrained(str(model_dir), **kwargs)
    else:
        from transformers import AutoModelForCausalLM

        from . import MateConvForCausalLM as _registered  # noqa: F401  (registers the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    return model.to(device or default_device()).eval()


def load_tokenizer_for(model_dir, tokenizer_path=None):
    """The tokenizer given explicitly, else the one saved in the model directory, else the project default."""
    from tokenizer import load_tokenizer

    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    if model_dir is not None and any((Path(model_dir) / f).exists() for f in _TOKENIZER_FILES):
        return load_tokenizer(model_dir)
    return load_tokenizer(None)


def load(path, device: str | None = None, dtype=None, *, tokenizer=None):
    """``(model, tokenizer)`` from any accepted path (module doc); the model is in eval mode.

    ``device``: default CUDA when available, else CPU. ``tokenizer``: a tokenizer directory to use
    instead of the model directory's own (default: the directory's, else the project's default).
    """
    model_dir = resolve_model_dir(path)
    model = load_model_dir(model_dir, device=device, dtype=dtype)
    return model, load_tokenizer_for(model_dir, tokenizer)
