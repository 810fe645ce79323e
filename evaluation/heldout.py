"""Held-out loss / perplexity of a checkpoint and MoE routing statistics collected in the same pass.

Data (never a training split: :func:`check_heldout_path` refuses it; records that also occur in the
sibling ``*_train.jsonl`` are left out and counted, :func:`train_overlap`):
    * held-out pretraining text: a packed ``.bin`` (windows of ``max_seq_len + 1`` tokens, the
      ``PretrainDataset`` contract) or a ``{"text": ...}`` JSONL (one item per document, encoded
      ``bos text eos``, documents longer than ``max_seq_len + 1`` tokens split into chunks);
    * held-out SFT answers: ``{"conversations": [...]}`` JSONL through the chat template, loss only on
      assistant answer tokens and their end token (the ``SFTDataset`` contract).

Loss is the token-weighted mean negative log-likelihood (nats/token); perplexity = exp(loss).
Per-item NLL sums and token counts are kept so that the report can bootstrap over items and pair
two checkpoints on the same items (the change in held-out loss from SFT to DPO).

Routing (MoE): :class:`evaluation.routing.RoutingCollector` (forward hooks) in the same pass; the
statistics (load fractions, max-violation, near-dead experts, ``expert_load_entropy`` vs
``router_entropy``) are defined in :mod:`evaluation.routing`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from dataset.collate import pad_collate
from model.losses import sequence_nll_of

from .metrics import ratio_bootstrap
from .routing import RoutingCollector, routing_stats  # noqa: F401  (re-exported: the one routing module)

TRAIN_NAME = re.compile(r"(^|[_\-.])train($|[_\-.])", re.IGNORECASE)


class TrainingDataError(ValueError):
    """Raised when an evaluation is pointed at training data."""


def check_heldout_path(path, split: str | None = None) -> Path:
    """Refuse a ``train`` split or a file whose name has ``train`` as a word (``sft_train.jsonl``,
    ``train.bin``); ``pretrain_validation.jsonl`` is fine (``pretrain`` is not ``train``)."""
    path = Path(path)
    if split is not None and split.lower() == "train":
        raise TrainingDataError(f"refusing to evaluate on the training split (split={split!r}, file={path}); "
                                "use split 'validation' or 'test'")
    if TRAIN_NAME.search(path.stem):
        raise TrainingDataError(f"refusing to evaluate on training data: {path} is named as a train split; "
                                "evaluation must use held-out (validation/test) files")
    return path


def sibling_train_file(path) -> Path | None:
    """``.../sft_validation.jsonl`` -> ``.../sft_train.jsonl`` when that file exists."""
    path = Path(path)
    for split in ("validation", "test", "valid", "val"):
        name = re.sub(rf"(^|[_\-.]){split}($|[_\-.])", r"\1train\2", path.name, count=1)
        if name != path.name and (path.parent / name).is_file():
            return path.parent / name
    return None


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _record_key(rec: dict) -> str:
    if "text" in rec:
        return "text:" + rec["text"]
    return "conv:" + json.dumps(rec.get("conversations", []), ensure_ascii=False, sort_keys=True)


_TRAIN_KEYS: dict[tuple, tuple[set, set]] = {}


def _train_keys(train_path: Path) -> tuple[set, set]:
    st = train_path.stat()
    key = (str(train_path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _TRAIN_KEYS:
        train = _jsonl(train_path)
        _TRAIN_KEYS.clear()
        _TRAIN_KEYS[key] = ({r["id"] for r in train if "id" in r}, {_record_key(r) for r in train})
    return _TRAIN_KEYS[key]


def train_overlap(heldout_path, train_path=None, max_train_bytes: int = 512 * 2**20) -> dict:
    """Held-out records that also occur in the train file (same ``id``, or identical text / conversation).

    ``train_path`` defaults to the sibling ``*_train.jsonl``. Returns ``{"checked", "train_file",
    "n_heldout", "n_overlap", "overlap_keys" (set), "overlap_ids"}``."""
    heldout_path = Path(heldout_path)
    train_path = Path(train_path) if train_path is not None else sibling_train_file(heldout_path)
    if train_path is None or heldout_path.suffix != ".jsonl":
        return {"checked": False, "train_file": None, "reason": "no sibling *_train.jsonl", "n_overlap": 0,
                "overlap_keys": set(), "overlap_ids": []}
    if train_path.stat().st_size > max_train_bytes:
        return {"checked": False, "train_file": str(train_path), "reason": f"train file over {max_train_bytes} bytes",
                "n_overlap": 0, "overlap_keys": set(), "overlap_ids": []}
    held = _jsonl(heldout_path)
    train_ids, train_keys = _train_keys(train_path)
    bad = [r for r in held if ("id" in r and r["id"] in train_ids) or _record_key(r) in train_keys]
    return {"checked": True, "train_file": str(train_path), "n_heldout": len(held), "n_overlap": len(bad),
            "overlap_keys": {_record_key(r) for r in bad}, "overlap_ids": [r.get("id") for r in bad]}


def overlap_summary(ov: dict) -> dict:
    """The JSON-serialisable part of :func:`train_overlap` (what the metrics files record)."""
    out = {k: v for k, v in ov.items() if k != "overlap_keys"}
    out["excluded"] = ov.get("n_overlap", 0)
    out["overlap_ids"] = list(ov.get("overlap_ids", []))[:50]
    return out


def assert_disjoint_from_train(heldout_path, train_path=None, max_train_bytes: int = 512 * 2**20) -> dict:
    """Raise :class:`TrainingDataError` when a held-out record also occurs in the train file."""
    ov = train_overlap(heldout_path, train_path, max_train_bytes)
    if ov["n_overlap"]:
        raise TrainingDataError(f"{ov['n_overlap']} record(s) of {heldout_path} also occur in {ov['train_file']} "
                                f"(first: {ov['overlap_ids'][:5]}); evaluation must not touch training data")
    return overlap_summary(ov)


def _heldout_records(path, exclude: set) -> list[dict]:
    return [r for r in _jsonl(path) if _record_key(r) not in exclude]


# --------------------------------------------------------------------------------------------- items


def _special_ids(tokenizer, model_config=None) -> tuple[int, int, int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(model_config, "bos_token_id", 1)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model_config, "eos_token_id", 2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


def pretrain_items(path, tokenizer, max_seq_len: int, max_items: int | None = None, seed: int = 0,
                   exclude: set | None = None) -> list[dict]:
    """Items (``input_ids``/``targets`` long tensors) of held-out pretraining text (``.bin`` or JSONL).

    ``.bin``: the first ``max_items`` windows. JSONL: a seeded random subset of ``max_items`` documents
    (records in ``exclude`` — keys of :func:`train_overlap` — left out), in file order, one item per
    ``max_seq_len + 1`` tokens of ``bos text eos``."""
    path = check_heldout_path(path)
    items: list[dict] = []
    if path.suffix == ".bin":
        from dataset.datasets import PretrainDataset  # the contract's windows

        ds = PretrainDataset(str(path), max_seq_len)
        for i in range(len(ds)):
            if max_items is not None and len(items) >= max_items:
                break
            it = ds[i]
            items.append({"input_ids": it["input_ids"], "targets": it["targets"]})
        return items
    bos, eos, _ = _special_ids(tokenizer)
    recs = _heldout_records(path, exclude or set())
    if max_items is not None and max_items < len(recs):
        keep = np.sort(np.random.default_rng(seed).choice(len(recs), size=max_items, replace=False))
        recs = [recs[i] for i in keep]
    for rec in recs:
        ids = [bos] + tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
        for start in range(0, max(len(ids) - 1, 1), max_seq_len):
            w = ids[start:start + max_seq_len + 1]
            if len(w) < 2:
                continue
            items.append({"input_ids": torch.tensor(w[:-1], dtype=torch.long),
                          "targets": torch.tensor(w[1:], dtype=torch.long)})
            if max_items is not None and len(items) >= max_items:
                return items
    return items


def sft_items(path, tokenizer, max_seq_len: int, max_items: int | None = None, seed: int = 0,
              exclude: set | None = None) -> list[dict]:
    """Items of held-out SFT conversations: targets only on assistant answers (``SFTDataset``, which skips
    conversations whose answer does not fit); a seeded subset of ``max_items`` records (the same subset as
    :func:`evaluation.generate_eval.load_heldout_examples` with the same seed); ``exclude`` left out."""
    path = check_heldout_path(path)
    from dataset.datasets import SFTDataset

    recs = _heldout_records(path, exclude or set())
    if max_items is not None and max_items < len(recs):  # subset before tokenizing (large held-out files)
        keep = np.sort(np.random.default_rng(seed).choice(len(recs), size=max_items, replace=False))
        recs = [recs[i] for i in keep]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / path.name
        with open(subset, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        ds = SFTDataset(str(subset), tokenizer, max_seq_len, on_error="skip")
        out = []
        for i in range(len(ds)):  # read while the subset (and its token cache) still exists
            it = ds[i]
            out.append({"input_ids": it["input_ids"].clone(), "targets": it["targets"].clone()})
    return out


def _fingerprint(items: list[dict]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it["input_ids"].numpy().astype(np.int64).tobytes())
        h.update(it["targets"].numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loss


@torch.no_grad()
def items_loss(model, items: list[dict], pad_id: int, batch_size: int = 8,
               routing: RoutingCollector | None = None, device=None) -> dict:
    """Token-weighted NLL of ``model`` on ``items``; per-item sums/counts for bootstraps."""
    model.eval()
    device = device or next(model.parameters()).device
    collate = pad_collate(pad_id)
    nll_sum, n_tok = [], []
    for start in range(0, len(items), batch_size):
        batch = collate([{"input_ids": it["input_ids"], "targets": it["targets"]}
                         for it in items[start:start + batch_size]])
        ids, tgt, mask = (batch[k].to(device) for k in ("input_ids", "targets", "attention_mask"))
        s, c = sequence_nll_of(model, ids, mask, tgt)
        nll_sum.extend(s.double().cpu().tolist())
        n_tok.extend(c.cpu().tolist())
    keep = [i for i, c in enumerate(n_tok) if c > 0]
    nll_sum, n_tok = [nll_sum[i] for i in keep], [n_tok[i] for i in keep]
    if not n_tok:
        raise ValueError("no target tokens in the held-out items")
    total, count = float(sum(nll_sum)), int(sum(n_tok))
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "n_items": len(n_tok), "n_tokens": count,
            "item_nll_sum": nll_sum, "item_tokens": n_tok}


def heldout_loss(model, tokenizer, path, kind: str, max_seq_len: int, split: str | None = None,
                 max_items: int | None = None, batch_size: int = 8, collect_routing: bool = True,
                 n_resamples: int = 2000, seed: int = 0) -> dict:
    """Loss / perplexity (with a bootstrap CI over items) on a held-out file; ``kind`` is
    ``"pretrain"`` or ``"sft"``. Includes routing statistics for MoE models when ``collect_routing``."""
    check_heldout_path(path, split)
    ov = train_overlap(path)  # records also in the train file are left out (and counted)
    if kind == "pretrain":
        items = pretrain_items(path, tokenizer, max_seq_len, max_items, seed, ov["overlap_keys"])
    elif kind == "sft":
        items = sft_items(path, tokenizer, max_seq_len, max_items, seed, ov["overlap_keys"])
    else:
        raise ValueError(f"kind must be 'pretrain' or 'sft', got {kind!r}")
    _, _, pad = _special_ids(tokenizer, model.config)
    routing = RoutingCollector(model) if collect_routing else None
    try:
        res = items_loss(model, items, pad, batch_size=batch_size, routing=routing)
    finally:
        if routing is not None:
            routing.close()
    ci = ratio_bootstrap(res["item_nll_sum"], res["item_tokens"], n_resamples=n_resamples, seed=seed)
    res.update({
        "loss_ci_low": ci["ci_low"], "loss_ci_high": ci["ci_high"],
        "perplexity_ci_low": math.exp(ci["ci_low"]), "perplexity_ci_high": math.exp(ci["ci_high"]),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "unit": "item"},
        "data_file": str(path), "split": split, "kind": kind, "max_seq_len": max_seq_len,
        "items_fingerprint": _fingerprint(items), "train_overlap_check": overlap_summary(ov),
        "routing": routing.stats() if routing is not None else None,
    })
    return res
