"""Small real models for tests: a MateConv preset with weights wider than the init (greedy paths vary instead of
repeating one token), saved with our tokenizer as a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch


def varied_model(preset: str, seed: int = 0, vocab_size: int | None = None):
    """``MateConvForCausalLM`` of ``preset`` with N(0, 0.2) matrices (norms left at 1), in eval mode."""
    from model import MateConvForCausalLM, get_config

    torch.manual_seed(seed)
    overrides = {"vocab_size": vocab_size} if vocab_size is not None else {}
    model = MateConvForCausalLM(get_config(preset, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_tiny_checkpoint(path: Path, preset: str = "mateconv-tiny", seed: int = 0) -> Path:
    """A checkpoint directory (``save_pretrained`` layout + our tokenizer) of ``varied_model(preset, seed)``."""
    from tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    varied_model(preset, seed, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
