"""Training step (forward + backward + AdamW) tokens/s: MateConv vs transformers' LlamaForCausalLM.

Ours is timed through the trainer's loss call (fused chunked LM head + cross-entropy, no [B, T, V] logits) and
through the HF ``labels=`` call (logits kept); Llama through ``labels=``.

Both models have the identical configuration (``mateconv-0.02b`` by default) and the same weights;
they are measured alternately in the same process, bf16 autocast, on CPU. ``--compile`` adds our model under
``torch.compile`` (its compile time is printed separately).

    python benchmarks/bench_train_step.py --threads 2 --batch 4 --seq 512 --steps 5 [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def make_step(model, opt, x, y, use_labels: bool, dtype):
    """One optimizer step. ``use_labels``: the HF call ``model(x, labels=y)``; else the trainer's call
    (``LMTask.compute_loss``): pre-shifted ``targets=``, the fused chunked LM head + cross-entropy."""
    from model.losses import shift_labels

    targets = shift_labels(y)

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if use_labels:
                loss = model(x, labels=y).loss
            else:
                out = model(x, targets=targets)
                loss = out.nll_sum / out.nll_count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


COMPUTE_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")


def profile_step(step) -> tuple[float, float]:
    """One profiled step -> (its wall ms, the self time in ms of its matmul and attention kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        total = (time.perf_counter() - t0) * 1e3
    compute = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith(COMPUTE_KERNELS)) / 1e3
    return total, compute


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mateconv-0.02b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (after 1 warm-up step)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--compile", action="store_true",
                    help="also time our model under torch.compile (compile time reported separately)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one step of each eager contender: the share of its time in matmul and attention "
                         "kernels, and the ratio to Llama that ours would reach if everything else took no time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.machine import describe_cpu
    from trainer.distributed import keep_freed_memory

    kept = keep_freed_memory()  # as our trainer runs (every contender in this process gets it)
    torch.manual_seed(0)
    from model import MateConvForCausalLM, get_config
    from model.export import to_native

    dtype = getattr(torch, args.dtype)
    ours = MateConvForCausalLM(get_config(args.preset)).train()
    llama = to_native(ours).train()
    x = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))
    # "mateconv": the trainer's loss path (fused head); "mateconv-labels": the HF labels= call of the same model
    steps, contenders = {}, [("mateconv", ours), ("mateconv-labels", ours), ("llama", llama)]
    if args.compile:
        import copy

        compiled = copy.deepcopy(ours)
        compiled.compile()
        contenders.append(("mateconv+compile", compiled))
    first = {}
    opts = {}
    for name, m in contenders:
        opt = opts.setdefault(id(m), torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True))
        steps[name] = make_step(m, opt, x, x, name != "mateconv", dtype)
        t0 = time.perf_counter()
        steps[name]()  # warm-up (compiles)
        first[name] = time.perf_counter() - t0
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():  # alternate so both see the same machine load
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tok = args.batch * args.seq
    res = {k: tok / statistics.median(v) for k, v in times.items()}
    print(f"cpu: {describe_cpu()}; freed memory kept (mallopt): {kept}")
    print(f"preset={args.preset} batch={args.batch}x{args.seq} dtype={args.dtype} threads={args.threads}")
    for k, v in res.items():
        print(f"  {k:16s} {v:10.0f} tokens/s  (median step {statistics.median(times[k]) * 1e3:.0f} ms)")
    print(f"RATIO mateconv/llama tokens/s = {res['mateconv'] / res['llama']:.2f}x  (floor 1.5x; the trainer's loss path)")
    print(f"      mateconv-labels/llama = {res['mateconv-labels'] / res['llama']:.2f}x  (HF labels= call, logits kept)")
    if args.profile:
        kernel = {k: profile_step(fn) for k, fn in steps.items() if k != "mateconv+compile"}
        for k, (total, compute) in kernel.items():
            print(f"  profile {k:16s} step {total:8.0f} ms, matmul + attention kernels {compute:8.0f} ms "
                  f"({compute / total:.0%})")
        llama_step = statistics.median(times["llama"]) * 1e3
        print(f"      ceiling: Llama's step / our matmul + attention kernels = "
              f"{llama_step / kernel['mateconv'][1]:.2f}x  (ours with everything else at zero time)")
    if args.compile:
        extra = first["mateconv+compile"] - statistics.median(times["mateconv+compile"])
        print(f"RATIO mateconv+compile/llama tokens/s = {res['mateconv+compile'] / res['llama']:.2f}x  "
              f"(compile time {extra:.1f} s, first step {first['mateconv+compile']:.1f} s, not in the ratio)")


if __name__ == "__main__":
    main()
