"""Batch collation: right padding, ``-100`` targets on padding, attention masks.

Keys ending in ``input_ids`` are padded with ``pad_id`` and get a matching ``attention_mask``
(``input_ids`` -> ``attention_mask``, ``chosen_input_ids`` -> ``chosen_attention_mask``); keys ending
in ``targets`` (or ``labels``) are padded with ``-100``; other tensors with 0; non-tensors are
gathered into lists. Use ``dataset.datasets.pad_token_id(tokenizer)`` for ``pad_id`` (pad token when
the tokenizer has one, else eos: padding is masked either way). :func:`pad_sequences` is the one
padding primitive (the collate functions and any caller that pads token ids use it).
"""

from __future__ import annotations

import torch

from model.losses import IGNORE_INDEX


def _fill(key: str, pad_id: int) -> int:
    if key.endswith("input_ids"):
        return pad_id
    if key.endswith("targets") or key.endswith("labels"):
        return IGNORE_INDEX
    return 0


def pad_sequences(seqs: list[torch.Tensor], length: int | None = None, value: int = 0) -> torch.Tensor:
    """1-D tensors right-padded with ``value`` to ``length`` (default: the longest) -> ``[len(seqs), length]``."""
    length = max(len(s) for s in seqs) if length is None else length
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def _collate(batch: list[dict], pad_id: int, groups: dict[str, str] | None = None) -> dict:
    if not batch:
        raise ValueError("empty batch")
    out: dict = {}
    keys = list(batch[0].keys())
    lengths: dict[str, int] = {}
    for k in keys:
        v = batch[0][k]
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            g = groups.get(k, k) if groups else k
            lengths[g] = max(lengths.get(g, 0), max(len(b[k]) for b in batch))
    for k in keys:
        vals = [b[k] for b in batch]
        if isinstance(vals[0], torch.Tensor) and vals[0].dim() == 1:
            g = groups.get(k, k) if groups else k
            length = lengths[g]
            out[k] = pad_sequences(vals, length, _fill(k, pad_id))
            if k.endswith("input_ids"):
                mk = k[: -len("input_ids")] + "attention_mask"
                if mk not in batch[0]:
                    mask = torch.zeros((len(vals), length), dtype=torch.long)
                    for i, s in enumerate(vals):
                        mask[i, : len(s)] = 1
                    out[mk] = mask
        elif isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


def pad_collate(pad_id: int):
    """Collate function: right-pads each key to the longest item of the batch (see module doc)."""
    pad_id = int(pad_id)

    def collate(batch: list[dict]) -> dict:
        return _collate(batch, pad_id)

    return collate


def preference_collate(pad_id: int):
    """Like :func:`pad_collate`, but chosen and rejected are padded to one common length, so that
    ``torch.cat([chosen_input_ids, rejected_input_ids])`` runs both in one forward pass."""
    pad_id = int(pad_id)

    def collate(batch: list[dict]) -> dict:
        groups = {k: "_seq" for k in batch[0] if k.endswith(("input_ids", "targets", "labels"))} if batch else {}
        return _collate(batch, pad_id, groups)

    return collate
