"""Server throughput under concurrent requests: batched (``--max_batch 32``, the default) against the
same server generating one request at a time (``--max_batch 1``), in one run.

    python benchmarks/bench_serving.py --threads 2 --clients 16 --requests 64 --max-tokens 64

A real uvicorn server on a loopback port, the real ``openai`` client in ``--clients`` threads, each
request seeded and sampled at temperature 0.8 with no stop token reached (``min``-length answers are
not forced: the random-weight model rarely emits its end token, so answers run to ``--max-tokens``).
Both servers answer the same requests; the script checks that every answer is identical, then
prints completion tokens per second and the ratio. Model: random weights of ``--preset``, or
``--model DIR`` for a trained checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_load(url: str, requests: list[dict], clients: int) -> tuple[float, dict[int, str], int]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    answers: dict[int, str] = {}
    tokens = [0]
    lock = threading.Lock()
    todo = list(enumerate(requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, kw = todo.pop(0)
            r = client.chat.completions.create(model="bench", **kw)
            with lock:
                answers[i] = r.choices[0].message.content
                tokens[0] += r.usage.completion_tokens

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, answers, tokens[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mateconv-tiny")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of random weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args(argv)
    import torch

    from serving.app import create_app
    from serving.background import BackgroundServer
    from serving.engine import Engine

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from model import MateConvForCausalLM, get_config
            from tokenizer import load_tokenizer

            torch.manual_seed(0)
            model_dir = str(Path(tmp) / "ckpt")
            MateConvForCausalLM(get_config(args.preset)).save_pretrained(model_dir)
            load_tokenizer().save_pretrained(model_dir)
        engine = Engine.from_dir(model_dir)
        questions = ["请写一首关于春天的诗。", "“床前明月光”的下一句是什么？", "解释一下“举头望明月”。", "你好"]
        requests = [dict(messages=[{"role": "user", "content": questions[i % len(questions)] + f"（{i}）"}],
                         max_tokens=args.max_tokens, temperature=0.8, seed=i) for i in range(args.requests)]
        results = {}
        for name, rows in (("one at a time (--max_batch 1)", 1), (f"batched (--max_batch {args.max_batch})", args.max_batch)):
            app = create_app(engine, max_batch_rows=rows)
            with BackgroundServer(app) as srv:
                run_load(srv.url, requests[: args.clients], args.clients)  # warm-up
                secs, answers, tokens = run_load(srv.url, requests, args.clients)
                b = app.state.batcher
            results[name] = (secs, answers, tokens)
            print(f"{name:32s} {secs:7.2f} s  {tokens:6d} tokens  {tokens / secs:8.1f} tokens/s  "
                  f"({b.batches} batches, largest {b.largest_batch} rows)")
    (s1, a1, t1), (s2, a2, t2) = results.values()
    same = a1 == a2
    print(f"identical answers: {same}")
    print(f"RATIO batched/unbatched throughput: {(t2 / s2) / (t1 / s1):.2f}x "
          f"({args.clients} concurrent clients, {args.requests} requests, preset {args.preset if not args.model else args.model})")
    if not same:
        sys.exit("answers differ between batched and unbatched serving")


if __name__ == "__main__":
    main()
