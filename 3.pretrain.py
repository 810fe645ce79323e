"""Stage 3: build the packed pretraining ``.bin`` files (+ JSON sidecars) from canonical JSONL.

    python 3.pretrain.py                       # embedded corpus -> data/pretrain/pretrain_{train,validation}.bin
    python 3.pretrain.py --input a.jsonl b.jsonl --out_dir data/pretrain --name my_corpus
    python 3.pretrain.py --tokenizer path/to/hf_tokenizer_dir --workers 4 --on_error skip

Without ``--input`` the embedded corpus is materialised (``dataset.embedded.ensure_embedded``) and
its train and validation splits are built separately. With ``--input`` all files go into one
``<out_dir>/<name>.bin``. See ``dataset/build_bin.py`` for the format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataset.build_bin import build_bin, default_workers
from dataset.errors import ON_ERROR_CHOICES, DataError
from dataset.paths import OutputPathError, check_output_dir, check_output_file


def embedded_inputs(embedded_dir: str) -> dict[str, list[Path]]:
    try:
        from dataset.embedded import ensure_embedded
    except ImportError as e:
        raise SystemExit(f"error: the embedded corpus is not available ({e}); pass --input FILE.jsonl") from None
    files = ensure_embedded(embedded_dir)
    out = {}
    for split in ("train", "validation"):
        key = f"pretrain_{split}"
        path = files.get(key) if isinstance(files, dict) else None
        out[key] = [Path(path) if path else Path(embedded_dir) / f"{key}.jsonl"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=None,
                    help="canonical pretraining JSONL file(s) ({\"text\": ...} per line); default: embedded corpus")
    ap.add_argument("--name", default="pretrain", help="output name with --input (<out_dir>/<name>.bin)")
    ap.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory (default: tokenizer/mateconv)")
    ap.add_argument("--out_dir", default="data/pretrain")
    ap.add_argument("--embedded_dir", default="data/embedded")
    ap.add_argument("--workers", type=int, default=default_workers(), help="encoding processes (default: one per core, up to 8)")
    ap.add_argument("--batch_size", type=int, default=1000, help="lines per tokenizer batch call")
    ap.add_argument("--on_error", default="raise", choices=ON_ERROR_CHOICES)
    ap.add_argument("--limit", type=int, default=None, help="at most this many documents per output")
    args = ap.parse_args(argv)

    try:
        # every output path is checked before any work starts
        names = [args.name] if args.input else ["pretrain_train", "pretrain_validation"]
        check_output_dir(args.out_dir)
        for name in names:
            check_output_file(Path(args.out_dir) / f"{name}.bin")
            check_output_file(Path(args.out_dir) / f"{name}.json", "sidecar path")
        if not args.input:
            check_output_dir(args.embedded_dir, "embedded data directory")
        jobs = {args.name: args.input} if args.input else embedded_inputs(args.embedded_dir)
        for name, inputs in jobs.items():
            build_bin(inputs, Path(args.out_dir) / f"{name}.bin", args.tokenizer, workers=args.workers,
                      batch_size=args.batch_size, on_error=args.on_error, limit=args.limit)
    except (DataError, FileNotFoundError, OutputPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
