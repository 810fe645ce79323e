"""OpenAI-compatible HTTP server for MateConv checkpoints (FastAPI + uvicorn).

``python -m serving --model DIR [--port 8000] [--host 127.0.0.1] [--api_key KEY]``;
``create_app(model_dir_or_model, tokenizer, api_key=None, model_name=...)`` builds the app.
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """Lazy re-export of :func:`serving.app.create_app` (keeps ``import serving`` light)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
