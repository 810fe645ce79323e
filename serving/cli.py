"""``python -m serving``: serve one checkpoint over the OpenAI chat-completions API."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from .app import DEFAULT_MAX_BODY_MB
    from .batching import DEFAULT_MAX_BATCH_ROWS

    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    p.add_argument("--model", required=True,
                   help="a checkpoint directory (MateConv or any HF causal LM, e.g. an exported native one), a "
                        "trainer run directory (its latest checkpoint) or a pipeline run directory (model.load)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the checkpoint's own, else tokenizer/mateconv)")
    p.add_argument("--model_name", default=None, help="name shown in /v1/models (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: env MATECONV_API_KEY; none = open)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 / float16 (default: as saved)")
    p.add_argument("--max_context", type=int, default=None,
                   help="context window in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max_batch", type=int, default=DEFAULT_MAX_BATCH_ROWS,
                   help="most answers sampled together: concurrent requests are batched up to this many rows "
                        f"(a request with n answers counts n) [{DEFAULT_MAX_BATCH_ROWS}]")
    p.add_argument("--max_body_mb", type=float, default=DEFAULT_MAX_BODY_MB,
                   help=f"largest request body in MB; larger ones get 413 [{DEFAULT_MAX_BODY_MB:g}]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--log_level", default="info")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from .app import create_app
    from .engine import Engine

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("MATECONV_API_KEY") or None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        engine = Engine.from_dir(args.model, args.tokenizer, args.model_name, device=args.device, dtype=args.dtype,
                                 max_context=args.max_context)
    except (FileNotFoundError, ValueError) as e:  # a path that holds no model, a damaged file: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(engine, api_key=api_key, max_batch_rows=args.max_batch, max_body_mb=args.max_body_mb)
    print(f"serving {engine.model_name!r} (context {engine.max_context}) on http://{args.host}:{args.port}/v1"
          f" (auth: {'bearer key' if api_key else 'none'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
