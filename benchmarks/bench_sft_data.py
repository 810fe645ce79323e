"""SFT data at scale: the cached memory-mapped token store (``dataset/chat_store.py``) against
the previous in-memory tokenisation at every start, on a synthetic deepctrl-format file.

    python benchmarks/bench_sft_data.py --rows 20000                 # quick check
    python benchmarks/bench_sft_data.py --rows 2000000 --workdir /tmp/bench_sft

Steps (each measurement in a fresh subprocess, so peak RSS is that of one start):

1. generate ``raw.jsonl``: N rows of the deepctrl ``sft_data_zh.jsonl`` format (``id``,
   ``instruction``, ``input``, ``output``, ``history``: 20% of the rows with one or two earlier
   turns), assembled with a fixed seed from the sentences of the embedded corpus;
2. convert it with the project's converter (``python -m dataset.prepare sft``) to canonical SFT JSONL;
3. ``old``: the previous path (``SFTDataset`` before the store: parse, render and tokenise the whole
   file into in-memory arrays at every start; kept below as ``_Legacy*``, one process as the trainer
   ran it, ``--old_workers`` to change that);
4. ``build``: the new ``SFTDataset`` with no store yet (first start: builds the store with
   ``--workers`` processes);
5. ``start``: the new ``SFTDataset`` again (later starts: opens and verifies the store).

(Run in the order 4, 5, 3; ``--reps N`` repeats that round N times and reports the medians.)
``--one_core REPS`` measures per-core rates instead (see :func:`one_core`).

Printed per step: seconds for the dataset construction, records/s, tokens/s, peak RSS of the
process (``ru_maxrss``) and of its worker processes. A check on the first ``--check_rows`` rows
compares items of the old and new paths (same ids; the new chat encoder keeps message content as
plain text, so they are equal for ordinary text). Results: ``<workdir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.machine import describe_cpu  # noqa: E402

# ============================================================================= synthetic deepctrl data


def _sentences() -> list[str]:
    from dataset.embedded import ensure_embedded

    path = Path(ensure_embedded(str(ROOT / "data" / "embedded"))["pretrain_train"])
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            out.extend(s.strip() + "。" for s in text.replace("\n", "。").replace("，", "。").split("。") if len(s.strip()) >= 4)
    return out


_QUESTIONS = ("请解释下面这句话的意思：", "这句诗出自哪里？", "请用现代汉语翻译：", "下面的句子表达了什么情感？",
              "请续写下文：", "请分析这段文字的修辞手法：", "这段话的主旨是什么？")


def generate_deepctrl(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` lines of ``{"id", "instruction", "input", "output", "history"}`` (deepctrl format).

    Texts are drawn from a pool of 20,000 passages (1-400 characters of embedded-corpus sentences);
    every question ends with its row number, so no two records are duplicates for the converter."""
    sents = _sentences()
    rng = random.Random(seed)

    def passage(lo, hi):
        out, n, total = [], rng.randint(lo, hi), 0
        while total < n:
            s = rng.choice(sents)
            out.append(s)
            total += len(s)
        return "".join(out)

    short = [passage(10, 120) for _ in range(10_000)]
    long = [passage(20, 400) for _ in range(10_000)]
    systems = ("", "", "你是一个熟悉古诗词的助手。")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(rows):
            history = []
            if rng.random() < 0.2:
                history = [[rng.choice(_QUESTIONS) + rng.choice(short), rng.choice(long)]
                           for _ in range(rng.randint(1, 2))]
            rec = {"id": i, "instruction": rng.choice(systems), "input": rng.choice(_QUESTIONS) + rng.choice(short)
                   + f"（第{i}题）", "output": rng.choice(long), "history": history}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ============================================================================= the previous path (kept to measure it)
# The SFTDataset of commit c88f174 (before the token store), reduced to what SFT uses: parse every line,
# render with the built-in MateConv template (our tokenizer's template renders exactly that), tokenise
# the pieces with the fast batch encoder, truncate, keep everything in memory.

IGNORE_INDEX = -100


class _LegacyPacked:
    def __init__(self, vocab_size: int):
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        self.parts_s, self.parts_m, self.lengths = [], [], []

    def add(self, seq, mask):
        self.parts_s.append(seq.astype(self.dtype))
        self.parts_m.append(mask)
        self.lengths.append(len(seq))

    def finish(self):
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.seq = np.concatenate(self.parts_s) if self.parts_s else np.zeros(0, self.dtype)
        self.mask = np.concatenate(self.parts_m) if self.parts_m else np.zeros(0, bool)
        del self.parts_s, self.parts_m, self.lengths

    def get(self, i):
        import torch

        a, b = self.offsets[i], self.offsets[i + 1]
        seq = self.seq[a:b].astype(np.int64)
        tgt = np.where(self.mask[a + 1:b], seq[1:], IGNORE_INDEX)
        return torch.from_numpy(seq[:-1].copy()), torch.from_numpy(tgt)


class _LegacyEncoder:
    def __init__(self, tok):
        from dataset.build_bin import batch_encoder

        self.bos, self.eos = tok.bos_token or "<s>", tok.eos_token or "</s>"
        self._encode_texts = batch_encoder(tok)

    def pieces(self, msgs):
        b, e = self.bos, self.eos
        out = []
        for m in msgs:
            if m["role"] == "assistant":
                out += [(f"{b}assistant\n", False), (m["content"] + e, True), ("\n", False)]
            else:
                out.append((f"{b}{m['role']}\n{m['content']}{e}\n", False))
        merged = []
        for text, tgt in out:
            if merged and not tgt and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + text, False)
            else:
                merged.append((text, tgt))
        return merged

    def encode_many(self, conversations):
        all_pieces = [self.pieces(c) for c in conversations]
        flat = [t for p in all_pieces for t, _ in p]
        enc = self._encode_texts(flat) if flat else []
        out, j = [], 0
        for p in all_pieces:
            ids = [np.asarray(enc[j + k], dtype=np.int64) for k in range(len(p))]
            j += len(p)
            mask = [np.full(len(e), tgt, dtype=bool) for e, (_, tgt) in zip(ids, p)]
            out.append((np.concatenate(ids), np.concatenate(mask)))
        return out


_LEGACY_ENC = None


def _legacy_set(enc):
    global _LEGACY_ENC
    _LEGACY_ENC = enc


def _legacy_task(convs):
    return _LEGACY_ENC.encode_many(convs)


class _LegacySFTDataset:
    def __init__(self, path, tok, max_seq_len: int, workers: int = 1):
        import collections

        from dataset.errors import DataError, Report
        from dataset.jsonl import iter_jsonl, ordered_map
        from dataset.prepare import check_conversations

        self.report = Report("skip")
        self.samples = _LegacyPacked(len(tok))
        self.lines = []
        enc = _LegacyEncoder(tok)
        pending = collections.deque()

        def batches():
            batch = []
            for line, obj in iter_jsonl(path, self.report):
                try:
                    batch.append((line, check_conversations(obj.get("conversations"), path, line)))
                except DataError as e:
                    self.report.error(e)
                if len(batch) >= 256:
                    pending.append(batch)
                    yield [m for _, m in batch]
                    batch = []
            if batch:
                pending.append(batch)
                yield [m for _, m in batch]

        for encoded in ordered_map(_legacy_task, batches(), workers, initializer=_legacy_set, initargs=(enc,)):
            for (line, _), (ids, mask) in zip(pending.popleft(), encoded):
                ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1].copy()
                mask[0] = False
                if not mask.any():
                    self.report.skipped["too_long"] += 1
                    continue
                self.report.keep()
                self.samples.add(ids, mask)
                self.lines.append(line)
        self.samples.finish()
        self.num_tokens = int(self.samples.seq.size)

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        inp, tgt = self.samples.get(i)
        return {"input_ids": inp, "targets": tgt}


# ============================================================================= measurements


def _measure(mode: str, data: Path, max_seq_len: int, workers: int, cache_dir: Path | None) -> dict:
    from dataset.datasets import SFTDataset
    from tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def cpu():  # user + system seconds of this process and its (finished) workers
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    cpu0 = cpu()
    t0 = time.perf_counter()
    if mode == "old":
        ds = _LegacySFTDataset(data, tok, max_seq_len, workers=workers)
        tokens = ds.num_tokens
    else:
        ds = SFTDataset(data, tok, max_seq_len, on_error="skip", too_long="drop", workers=workers, cache_dir=cache_dir)
        tokens = int(ds.store.header["num_tokens"])
    seconds = time.perf_counter() - t0
    cpu_seconds = cpu() - cpu0
    ds[len(ds) // 2]  # one item, as a training start would read
    return {"mode": mode, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "samples": len(ds), "tokens": tokens,
            "records": int(ds.report.seen), "workers": workers,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_imports_mb": round(rss_before, 1),
            "workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def _check(data: Path, rows: int, max_seq_len: int, workdir: Path) -> dict:
    from dataset.datasets import SFTDataset
    from tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    head = workdir / "check_head.jsonl"
    with open(data, "rb") as src, open(head, "wb") as dst:
        for k, line in enumerate(src):
            if k >= rows:
                break
            dst.write(line)
    old = _LegacySFTDataset(head, tok, max_seq_len)
    new = SFTDataset(head, tok, max_seq_len, on_error="skip", too_long="drop", cache_dir=workdir / "check_cache")
    same = old.lines == new.lines and all(
        old[i]["input_ids"].tolist() == new[i]["input_ids"].tolist()
        and old[i]["targets"].tolist() == new[i]["targets"].tolist() for i in range(len(old)))
    return {"check_rows": rows, "samples": len(old), "identical_items": bool(same)}


def one_core(data: Path, max_seq_len: int, reps: int, workdir: Path) -> dict:
    """Per-core rates, in this one process, alternating (load on the machine hits all alike; run it
    pinned: ``taskset -c 1``): the old path; the new first build with 1 worker (no pool: the worker's
    code in this process), also with the lookahead-free split pattern off (the GPT-2 pattern's
    backtracking regex on every text); and the tiktoken calls alone of
    each (the BPE bound): the old path's one call per text piece, and the new path's one call per batch
    on the rendered batch."""
    import statistics

    from dataset.datasets import SFTDataset
    from dataset.jsonl import iter_jsonl
    from tokenizer import load_tokenizer
    from tokenizer.chat import _M_CUT, _MARKERS, ChatEncoder
    from tokenizer.fast_encode import cut_whitespace_runs, fast_encoder

    tok = load_tokenizer(None)
    convs = [obj["conversations"] for _, obj in iter_jsonl(data)]
    # the old path's tiktoken calls: its texts cut at the special tokens, one call per piece
    fe, _ = fast_encoder(tok)
    legacy = _LegacyEncoder(tok)
    pieces = []
    for c in convs:
        for text, _ in legacy.pieces(c):
            pieces += [p for p in fe.added_re.split(text) if p]
    to_numpy = fe.encoding.encode_to_numpy
    # the new path's: one call per batch of 512 conversations on the rendered batch
    enc = ChatEncoder(tok)
    st = enc._fast_state()
    batches = []
    for k in range(0, len(convs), 512):
        text = "".join(enc._render_fast(st, c, "all", False)[0] for c in convs[k:k + 512])
        cut = cut_whitespace_runs(text, _M_CUT, _MARKERS)
        batches.append((cut, cut != text))
    n_tokens = sum(int((st["encode"](t, False) < 0xFFFFFFF0).sum()) for t, _ in batches)  # less the pure markers

    def t_old():
        return _LegacySFTDataset(data, tok, max_seq_len).report.seen

    def t_new():
        cache = Path(tempfile.mkdtemp(prefix="one_core-", dir=workdir))
        try:
            return SFTDataset(data, tok, max_seq_len, on_error="skip", too_long="drop", workers=1,
                              cache_dir=cache).report.seen
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def t_new_gpt2_only():  # as on data where every conversation has a whitespace pair (paragraphs)
        import tokenizer.fast_encode as fast_encode

        fast_encode.LOOKAHEAD_FREE = False
        try:
            return t_new()
        finally:
            fast_encode.LOOKAHEAD_FREE = True

    def t_bpe_old():
        for p in pieces:
            to_numpy(p, disallowed_special=())

    def t_bpe_new():
        for t, _ in batches:
            st["encode"](t, False)

    steps = {"old": t_old, "new_1_worker": t_new, "new_1_worker_gpt2_pattern_only": t_new_gpt2_only,
             "bpe_old_calls": t_bpe_old, "bpe_new_calls": t_bpe_new}
    times: dict[str, list] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(reps):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(convs)
    res = {"records": n, "tokens": int(n_tokens), "tokens_per_record": round(n_tokens / n, 1), "reps": reps,
           "old_calls": len(pieces), "new_calls": len(batches),
           "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "records_per_s": {k: round(n / v) for k, v in med.items()},
           "us_per_token": {k: round(v / n_tokens * 1e6, 4) for k, v in med.items()},
           "batches_with_whitespace_runs_cut": sum(f for _, f in batches),
           "new_vs_old_rate": round(med["old"] / med["new_1_worker"], 3),
           "new_gpt2_only_vs_old_rate": round(med["old"] / med["new_1_worker_gpt2_pattern_only"], 3),
           "bound_new_vs_old_rate": round(med["old"] / med["bpe_new_calls"], 3)}
    return res


def _run_child(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    from dataset.build_bin import default_workers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--workdir", default=None, help="[a directory under /tmp, per row count]")
    ap.add_argument("--workers", type=int, default=default_workers(), help="store build processes [one per core]")
    ap.add_argument("--old_workers", type=int, default=1, help="processes of the old path [1, as the trainer ran it]")
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--check_rows", type=int, default=2000)
    ap.add_argument("--skip_old", action="store_true")
    ap.add_argument("--reps", type=int, default=1, help="alternating rounds of build / later start / old [1]; "
                    "the medians are reported")
    ap.add_argument("--one_core", type=int, default=0, metavar="REPS",
                    help="instead: per-core rates in one process, REPS alternating rounds of the old path, the new "
                         "build with 1 worker and the tiktoken calls alone (run it under taskset -c 1)")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_cache_dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._measure:
        print(json.dumps(_measure(a._measure, Path(a._data), a.max_seq_len, a.workers,
                                  Path(a._cache_dir) if a._cache_dir else None)))
        return 0
    if a._check:
        print(json.dumps(_check(Path(a._data), a.check_rows, a.max_seq_len, Path(a.workdir))))
        return 0

    work = Path(a.workdir or f"/tmp/mateconv_bench_sft_{a.rows}")
    work.mkdir(parents=True, exist_ok=True)
    raw, data, cache = work / "raw.jsonl", work / "sft.jsonl", work / "cache"
    t = time.perf_counter()
    if not raw.is_file() or sum(1 for _ in open(raw, "rb")) != a.rows:
        generate_deepctrl(raw, a.rows)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    if not data.is_file() or data.stat().st_mtime < raw.stat().st_mtime:
        subprocess.run([sys.executable, "-m", "dataset.prepare", "sft", "--input", str(raw), "--output", str(data),
                        "--workers", str(a.workers)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    t_conv = time.perf_counter() - t
    print(f"data: {a.rows:,} deepctrl rows ({raw.stat().st_size / 1e9:.2f} GB, generated in {t_gen:.0f}s), canonical "
          f"{data.stat().st_size / 1e9:.2f} GB (converted in {t_conv:.0f}s)", flush=True)
    res = {"rows": a.rows, "raw_bytes": raw.stat().st_size, "canonical_bytes": data.stat().st_size,
           "max_seq_len": a.max_seq_len, "cpu": describe_cpu()}
    if a.one_core:
        r = one_core(data, a.max_seq_len, a.one_core, work)
        print(json.dumps(r, indent=1))
        rate = r["records_per_s"]
        print(f"RATIO one core: new build (1 worker) {r['new_vs_old_rate']}x the old path's rate ({rate['new_1_worker']:,} "
              f"vs {rate['old']:,} records/s; {r['new_gpt2_only_vs_old_rate']}x with the GPT-2 pattern everywhere); "
              f"the new path's tiktoken calls alone {rate['bpe_new_calls']:,} records/s "
              f"({r['us_per_token']['bpe_new_calls']} us/token, {r['tokens_per_record']} tokens/record) = bound "
              f"{r['bound_new_vs_old_rate']}x; the old path's calls alone {r['us_per_token']['bpe_old_calls']} us/token")
        (work / "one_core.json").write_text(json.dumps(r, indent=2) + "\n")
        return 0
    common = ["--_data", str(data), "--max_seq_len", str(a.max_seq_len), "--_cache_dir", str(cache)]
    res["check"] = _run_child(["--_check", "--workdir", str(work), *common, "--check_rows", str(a.check_rows)])
    print(f"check on the first {a.check_rows} rows: old and new items identical: {res['check']['identical_items']}",
          flush=True)
    rounds = []
    for k in range(a.reps):  # alternating rounds: build, later start, old (load changes hit all of them)
        shutil.rmtree(cache, ignore_errors=True)
        r = {"load_before": round(os.getloadavg()[0], 2)}
        r["build"] = _run_child(["--_measure", "build", "--workers", str(a.workers), *common])
        _print(r["build"], f"[{k + 1}/{a.reps}] new: first start (builds the store)")
        r["start"] = _run_child(["--_measure", "start", "--workers", str(a.workers), *common])
        _print(r["start"], f"[{k + 1}/{a.reps}] new: later start (opens the store)")
        if not a.skip_old:
            r["old"] = _run_child(["--_measure", "old", "--workers", str(a.old_workers), *common])
            _print(r["old"], f"[{k + 1}/{a.reps}] old: in-memory tokenisation at every start")
        r["load_after"] = round(os.getloadavg()[0], 2)
        rounds.append(r)
        res["rounds"] = rounds
        (work / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    def median_run(kind):  # the round with the median time of this step
        runs = sorted((r[kind] for r in rounds), key=lambda x: x["seconds"])
        return runs[(len(runs) - 1) // 2]

    res["build"], res["start"] = median_run("build"), median_run("start")
    if not a.skip_old:
        res["old"] = median_run("old")
    if "old" in res:
        res["build_vs_old_rate"] = round(res["old"]["seconds"] / res["build"]["seconds"], 2)
        res["start_vs_old_time"] = round(res["old"]["seconds"] / res["start"]["seconds"], 1)
        print(f"RATIO first build {res['build_vs_old_rate']}x the old rate (medians of {a.reps} round(s)); later start "
              f"{res['start']['seconds']:.2f}s vs {res['old']['seconds']:.1f}s; peak RSS at a later start "
              f"{res['start']['peak_rss_mb']:.0f} MB vs old {res['old']['peak_rss_mb']:.0f} MB")
    (work / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"results: {work / 'results.json'}")
    return 0


def _print(r: dict, what: str) -> None:
    print(f"{what}: {r['seconds']:.2f}s ({r['cpu_seconds']:.2f} CPU-s), {r['records'] / r['seconds']:,.0f} records/s, "
          f"{r['tokens'] / r['seconds']:,.0f} tokens/s ({r['samples']:,} samples, {r['tokens']:,} tokens, "
          f"{r['workers']} worker(s)); peak RSS {r['peak_rss_mb']:.0f} MB (after imports "
          f"{r['rss_after_imports_mb']:.0f} MB), workers {r['workers_peak_rss_mb']:.0f} MB", flush=True)



if __name__ == "__main__":
    sys.exit(main())
