"""MateConv data: the embedded default corpus, derived datasets, converters, `.bin` builder and torch datasets.

The embedded corpus (``dataset/corpus/poems.jsonl.gz``) is rebuilt by ``python -m dataset.build_corpus``;
``dataset.embedded.ensure_embedded()`` derives the pretraining / SFT / preference-prompt files from it.
"""

from __future__ import annotations


def ensure_embedded(out_dir="data/embedded", **kwargs):
    """Lazy re-export of :func:`dataset.embedded.ensure_embedded`."""
    from .embedded import ensure_embedded as _ensure_embedded

    return _ensure_embedded(out_dir, **kwargs)
