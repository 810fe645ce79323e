"""Tokenizer training, the shipped default tokenizer, loading and fingerprinting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "mateconv"
# The original MateConv tokenizer (MIT, from the original project, itself from MiniMind): a test fixture and
# the default comparison of tokenizer training; provenance in tests/fixtures/original_tokenizer/PROVENANCE.md.
ORIGINAL_TOKENIZER_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original_tokenizer"


def load_tokenizer(path: str | Path | None = None):
    """Load a Hugging Face tokenizer directory (ours by default) with a clear error when it is missing."""
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else DEFAULT_TOKENIZER_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any((path / name).exists() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path} holds no tokenizer files (tokenizer.json / vocab.json / tokenizer.model)")
    return AutoTokenizer.from_pretrained(str(path))


_FINGERPRINTS: dict[str, str] = {}  # the last tokenizer's serialisation -> its fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides token ids: the vocabulary, merges, normaliser and special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        raw = backend.to_str()
        if raw not in _FINGERPRINTS:  # stage 3 builds several files with one tokenizer: hash it once
            spec = json.loads(raw)
            spec.pop("truncation", None)
            spec.pop("padding", None)
            payload = json.dumps(spec, sort_keys=True, ensure_ascii=False)
            _FINGERPRINTS.clear()
            _FINGERPRINTS[raw] = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
        return _FINGERPRINTS[raw]
    else:  # slow tokenizer: fall back to the vocabulary
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
