"""Decoding speed, batch 1: our KV-cached loop vs transformers' ``generate`` on the exported
``LlamaForCausalLM`` (same weights), and vs our own uncached decoding (recompute the whole sequence).

    python benchmarks/bench_decode.py --threads 2 --new-tokens 256 --repeats 3

Greedy decoding, fp32, no early stop (every run produces exactly ``--new-tokens`` tokens). Runs of the
contenders alternate so they see the same machine load; the median time per run is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mateconv-0.02b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uncached-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from model import MateConvForCausalLM, get_config
    from model.export import to_native
    from model.generation import generate

    ours = MateConvForCausalLM(get_config(args.preset)).eval()
    llama = to_native(ours).eval()
    x = torch.randint(4, ours.config.vocab_size, (1, args.prompt))
    n = args.new_tokens

    def run_ours():
        return generate(ours, x, max_new_tokens=n, do_sample=False, eos_token_id=[])

    def run_hf():
        with torch.inference_mode():
            return llama.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=3)

    def run_uncached():
        return generate(ours, x, max_new_tokens=n, do_sample=False, eos_token_id=[], use_cache=False)

    a, b = run_ours(), run_hf()  # warm-up + same-output check
    same = torch.equal(a, b)
    times = {"mateconv_cached": [], "hf_generate_llama": [], "mateconv_uncached": []}
    for r in range(args.repeats):
        for name, fn in (("mateconv_cached", run_ours), ("hf_generate_llama", run_hf)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            assert out.shape[1] == args.prompt + n
        if r < args.uncached_repeats:
            t0 = time.perf_counter()
            run_uncached()
            times["mateconv_uncached"].append(time.perf_counter() - t0)
    tps = {k: n / statistics.median(v) for k, v in times.items() if v}
    print(f"preset={args.preset} batch=1 prompt={args.prompt} new_tokens={n} fp32 threads={args.threads}")
    print(f"  identical greedy tokens (ours cached vs transformers generate): {same}")
    for k, v in tps.items():
        print(f"  {k:20s} {v:8.1f} tokens/s")
    print(f"RATIO cached/hf_generate = {tps['mateconv_cached'] / tps['hf_generate_llama']:.2f}x  (floor 2x)")
    if "mateconv_uncached" in tps:
        print(f"RATIO cached/uncached    = {tps['mateconv_cached'] / tps['mateconv_uncached']:.2f}x  (floor 5x)")


if __name__ == "__main__":
    main()
