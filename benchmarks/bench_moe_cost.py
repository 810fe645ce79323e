"""MoE cost: one training step (forward + backward + AdamW, bf16 autocast, CPU) of

  1. the compute-matched MoE preset (``mateconv-moe-0.02b-matched``) vs the dense preset (``mateconv-0.02b``):
     time ratio MoE / dense (floor: at most 1.3x);
  2. our MoE vs transformers' implementation of the exported architecture (``GraniteMoeSharedForCausalLM``
     with the same weights): speed ratio ours / transformers (floor: > 1x).

    python benchmarks/bench_moe_cost.py --threads 2 --batch 4 --seq 512 --steps 5

All three models are measured alternately in the same process; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def make_step(model, x, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, labels=x)
        loss = out.loss
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            loss = loss + aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", default="mateconv-0.02b")
    ap.add_argument("--moe", default="mateconv-moe-0.02b-matched")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.machine import describe_cpu
    from trainer.distributed import keep_freed_memory

    kept = keep_freed_memory()  # as our trainer runs (every contender in this process gets it)
    torch.manual_seed(0)
    from model import MateConvForCausalLM, get_config, parameter_report
    from model.export import to_native

    dtype = getattr(torch, args.dtype)
    dense = MateConvForCausalLM(get_config(args.dense)).train()
    moe = MateConvForCausalLM(get_config(args.moe)).train()
    granite = to_native(moe).train()
    x = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq))
    steps = {"dense": make_step(dense, x, dtype), "moe": make_step(moe, x, dtype),
             "granite": make_step(granite, x, dtype)}
    for fn in steps.values():
        fn()  # warm-up
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rd, rm = parameter_report(dense.config), parameter_report(moe.config)
    print(f"cpu: {describe_cpu()}; freed memory kept (mallopt): {kept}")
    print(f"batch={args.batch}x{args.seq} dtype={args.dtype} threads={args.threads}")
    print(f"  dense {args.dense}: active {rd['active_params']:,} / total {rd['total_params']:,}")
    print(f"  moe   {args.moe}: active {rm['active_params']:,} / total {rm['total_params']:,}")
    for k, v in med.items():
        print(f"  {k:8s} median step {v * 1e3:8.0f} ms  ({args.batch * args.seq / v:8.0f} tokens/s)")
    print(f"RATIO moe/dense step time = {med['moe'] / med['dense']:.2f}x  (floor: at most 1.3x)")
    print(f"RATIO ours/transformers (GraniteMoeShared) speed = {med['granite'] / med['moe']:.2f}x  (floor: > 1x)")


if __name__ == "__main__":
    main()
