"""Stage 3 throughput (tokens/s): ``build_bin`` (batched fast-tokenizer encoding, worker processes)
against a per-line ``tokenizer.encode`` loop on the same input, measured in one run.

    python benchmarks/bench_build_bin.py --docs 20000 --workers 2 --batch_size 1000

Both paths get the loaded tokenizer; stage 3's time includes starting the worker processes and,
in its first run, analysing the tokenizer for the exact tiktoken path (``tokenizer/fast_encode.py``).
Both paths read and parse the same JSONL file and produce ``bos ids eos`` per document; the
benchmark checks that they produce identical token streams, then prints both speeds and the ratio.
Input: the embedded pretraining split when available, else documents assembled (fixed seed) from
the Chinese sentences of tests/data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "original_tokenizer"


def sentences() -> list[str]:
    out = []
    for name in ("seqmonkey.jsonl", "deepctrl.jsonl", "original_pairs.jsonl"):
        for line in (ROOT / "tests" / "data" / name).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            for v in rec.values():
                if isinstance(v, str) and len(v) > 4:
                    out.extend(s + "。" for s in v.replace("\n", "。").split("。") if s.strip())
    return out


def make_docs(n: int, seed: int) -> list[str]:
    try:
        from dataset.embedded import ensure_embedded

        path = Path(ensure_embedded(str(ROOT / "data" / "embedded"))["pretrain_train"])
        docs = [json.loads(x)["text"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if docs:
            return [docs[i % len(docs)] for i in range(n)]
    except Exception:  # embedded corpus not available: synthetic documents
        pass
    rng = random.Random(seed)
    pool = sentences()
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) + f"（{rng.randint(1, 99999)}）"
            for _ in range(n)]


def per_line(src: Path, tok) -> np.ndarray:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    out = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            out.append(bos)
            out.extend(tok.encode(json.loads(line)["text"], add_special_tokens=False))
            out.append(eos)
    return np.asarray(out, dtype=np.uint16)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--tokenizer", default=None, help="default: tokenizer/mateconv, else the original fixture")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="alternate the two paths; report the best time of each")
    ap.add_argument("--batch_size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from dataset.build_bin import build_bin
    from tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer

    tok_dir = args.tokenizer or (DEFAULT_TOKENIZER_DIR if DEFAULT_TOKENIZER_DIR.is_dir() else FIXTURE)
    tok = load_tokenizer(tok_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs.jsonl"
        docs = make_docs(args.docs, args.seed)
        src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        print(f"input: {len(docs):,} documents, {sum(map(len, docs)):,} characters, {src.stat().st_size:,} bytes; "
              f"tokenizer {tok_dir}; cpus {os.cpu_count()}")
        fast_times, slow_times, fast_cpu, slow_cpu = [], [], [], []
        notes: list[str] = []
        for _ in range(args.repeats):  # alternate so both see the same machine load
            t0, c0 = time.perf_counter(), cpu_seconds()
            meta = build_bin(src, Path(tmp) / "fast.bin", tok, workers=args.workers,
                             batch_size=args.batch_size, progress=False, log=notes.append)
            fast_times.append(time.perf_counter() - t0)
            fast_cpu.append(cpu_seconds() - c0)
            t0, c0 = time.perf_counter(), cpu_seconds()
            slow = per_line(src, tok)
            slow_times.append(time.perf_counter() - t0)
            slow_cpu.append(cpu_seconds() - c0)
        t_fast, t_slow = min(fast_times), min(slow_times)
        print(next((n for n in notes if n.startswith("stage 3 encoder")), "stage 3 encoder: ?"))
        print("build_bin times (s): " + " ".join(f"{x:.2f}" for x in fast_times)
              + "  (the first includes the one-time tokenizer analysis)")
        print("per-line times (s):  " + " ".join(f"{x:.2f}" for x in slow_times))
        fast = np.fromfile(Path(tmp) / "fast.bin", dtype=meta["dtype"])
        assert np.array_equal(fast, slow.astype(fast.dtype)), "stage 3 and the per-line loop disagree"
    n = meta["num_tokens"]
    print(f"tokens: {n:,}")
    print(f"per-line tokenizer.encode loop: {t_slow:7.2f} s  {n / t_slow:12,.0f} tokens/s")
    print(f"stage 3 build_bin (workers={args.workers}, batch={args.batch_size}): {t_fast:7.2f} s  "
          f"{n / t_fast:12,.0f} tokens/s")
    print(f"speed-up: {t_slow / t_fast:.1f}x")
    c_fast, c_slow = min(fast_cpu), min(slow_cpu)
    print(f"CPU seconds (all processes): per-line {c_slow:.2f}, stage 3 {c_fast:.2f} -> {c_slow / c_fast:.1f}x less CPU "
          f"per token; the wall-clock speed-up approaches this times the number of free cores (up to --workers)")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs: the machine is busy, wall times are noisy")


if __name__ == "__main__":
    main()
