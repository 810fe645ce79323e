"""The preference-generation run: prompts -> K candidates -> judge -> pairs, resumable and bounded.

Files (``OUT`` = ``--out_path``):

- ``OUT``: pairs in the canonical format (``dataset.prepare.make_pair``), one JSON object per line.
  All pairs of one prompt are written with one ``write`` and flushed, so a kill loses at most the
  prompts in flight; a torn last line (a kill inside the write) is cut off at the next start.
- ``OUT.status.jsonl``: one line per finished prompt: ``{"id", "status": "written"|"no_pair"|"failed",
  "reason", "pairs"}``. A rerun skips prompts that are in ``OUT`` or recorded as ``no_pair``;
  failed prompts are tried again.
- ``OUT.summary.json``: the last run's summary (also printed): selected, skipped (already done),
  done, written, no_pair by reason, failed by reason with ids, pairs written, retries by reason,
  tokens (when the endpoint reports usage), generator and judge names, settings.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from .client import ChatCaller, FatalError, PromptFailed, Stats, TokenBucket
from .config import PrefsConfig, build_parser, resolve
from .generators import Candidates, LocalGenerator, OpenAIGenerator, Prompt

log = logging.getLogger("prefs")


# ----------------------------------------------------------------------------------------------
# prompts


def _prompt_from_record(obj: dict, line_no: int) -> Prompt:
    conv = obj.get("conversations") or obj.get("messages")
    if conv is None and isinstance(obj.get("prompt"), list):  # a canonical pair file: reuse its prompts
        conv = obj["prompt"]
    if conv is None and "q" in obj:  # original pairs / SFT {q, history, a}
        conv = []
        for q, a in obj.get("history") or []:
            conv += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        conv.append({"role": "user", "content": obj["q"]})
    if not isinstance(conv, list) or not conv:
        raise ValueError("no conversations")
    msgs = [{"role": m["role"], "content": m["content"]} for m in conv]
    reference = obj.get("reference")
    if msgs[-1]["role"] == "assistant":  # an SFT record: the last answer is the reference
        reference = reference if reference is not None else msgs[-1]["content"]
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user message")
    pid = obj.get("id")
    return Prompt(str(pid) if pid is not None else f"line{line_no}", msgs, reference, obj.get("task"))


def resolve_prompts_path(spec: str) -> Path:
    """``embedded:train`` / ``embedded:validation`` / ``embedded:sft_train`` / a JSONL path."""
    if spec.startswith("embedded:"):
        split = spec.split(":", 1)[1] or "train"
        name = split if split.startswith(("sft_", "prefs_prompts_")) else f"prefs_prompts_{split}"
        from dataset.embedded import ensure_embedded

        paths = ensure_embedded("data/embedded")
        if name in paths:
            return Path(paths[name])
        p = Path("data/embedded") / f"{name}.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"embedded data has no {name}.jsonl")
        return p
    return Path(spec)


def load_prompts(path: str | Path, n: int, seed: int) -> tuple[list[Prompt], int]:
    """All valid prompts of a JSONL file, then a fixed-seed sample of ``n`` (0 = all). Returns (sample, bad)."""
    prompts, seen, bad = [], set(), 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = _prompt_from_record(json.loads(line), i)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                bad += 1
                log.warning("%s:%d: skipped: %s", path, i, e)
                continue
            if p.id in seen:
                bad += 1
                log.warning("%s:%d: duplicate id %r skipped", path, i, p.id)
                continue
            seen.add(p.id)
            prompts.append(p)
    # a seeded shuffle, then the first n: a larger n extends the same sample (resume-friendly)
    random.Random(seed).shuffle(prompts)
    if n and n < len(prompts):
        prompts = prompts[:n]
    return prompts, bad


# ----------------------------------------------------------------------------------------------
# resumable output


def _repair_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file we append to; cut off a torn last line; return the records."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good_end, records = 0, []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: torn
        line = data[pos:nl]
        try:
            if line.strip():
                records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            break  # a bad line can only come from a torn write: cut here
        pos = nl + 1
        good_end = pos
    if good_end < len(data):
        log.warning("%s: cutting %d bytes of a torn last write", path, len(data) - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


class PairWriter:
    def __init__(self, out_path: str | Path, fsync: bool = False):
        self.path = Path(out_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.status_path = Path(str(self.path) + ".status.jsonl")
        self.summary_path = Path(str(self.path) + ".summary.json")
        self.fsync = fsync
        pairs = _repair_jsonl(self.path)
        statuses = _repair_jsonl(self.status_path)
        self.done_ids = {str((r.get("meta") or {}).get("prompt_id", r.get("id"))) for r in pairs}
        self.pairs_before = len(pairs)
        self.done_ids |= {str(s["id"]) for s in statuses if s.get("status") == "no_pair"}
        self.lock = threading.Lock()
        self.f = open(self.path, "a", encoding="utf-8")
        self.sf = open(self.status_path, "a", encoding="utf-8")

    def _append(self, f, text: str) -> None:
        f.write(text)
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    def write(self, prompt_id: str, pairs: list[dict], status: str, reason: str | None = None) -> None:
        with self.lock:
            if pairs:
                self._append(self.f, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
            rec = {"id": prompt_id, "status": status, "reason": reason, "pairs": len(pairs), "time": time.time()}
            self._append(self.sf, json.dumps(rec, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.f.close()
        self.sf.close()


# ----------------------------------------------------------------------------------------------
# pairs from a verdict


def make_pairs(prompt: Prompt, texts: list[str], verdict, cfg: PrefsConfig, gen_name: str, judge_name: str,
               usage: dict) -> tuple[list[dict], str | None]:
    """Pairs (best vs worst [and second worst]) with metadata; or ([], reason) when none qualifies."""
    from dataset.prepare import make_pair

    ranking, scores = verdict.ranking, verdict.scores
    best = ranking[0]
    rejected = [ranking[-1]] + ([ranking[-2]] if cfg.pairs_per_prompt == 2 and len(ranking) >= 3 else [])
    pairs, reason = [], None
    for j, r in enumerate(rejected):
        if r == best or texts[r] == texts[best]:
            reason = "identical"
            continue
        margin = scores[best] - scores[r]
        if margin < cfg.min_margin:
            reason = reason or "below_margin"
            continue
        meta = {
            "prompt_id": prompt.id, "task": prompt.task, "source": "gen_prefs",
            "generator": gen_name, "judge": judge_name,
            "gen_temperature": cfg.gen_temperature, "judge_temperature": cfg.judge_temperature
            if cfg.judge == "openai" else None,
            "k": len(texts), "ranking": ranking, "scores": scores,
            "chosen_index": best, "rejected_index": r, "margin": round(margin, 6), "pair_index": j,
            "usage": usage, "created": int(time.time()),
        }
        if cfg.judge == "reference":
            meta["reference"] = prompt.reference
        pairs.append(make_pair(prompt.messages, texts[best], texts[r], id=f"{prompt.id}#{j}", meta=meta))
    return pairs, (None if pairs else reason)


# ----------------------------------------------------------------------------------------------
# the run


def _dedupe(texts: list[str]) -> list[str]:
    seen, out = set(), []
    for t in texts:
        t = t.strip() if isinstance(t, str) else ""
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def build_backends(cfg: PrefsConfig, stats: Stats, env=None):
    env = os.environ if env is None else env
    bucket = TokenBucket(cfg.rps)
    callers = {}

    def caller(base_url, key):
        k = (base_url, key)
        if k not in callers:
            callers[k] = ChatCaller(base_url, key, timeout=cfg.timeout, max_tries=cfg.max_tries, bucket=bucket,
                                    stats=stats, backoff_base=cfg.backoff_base, backoff_cap=cfg.backoff_cap,
                                    backoff_cap_429=cfg.backoff_cap_429, rng=random.Random(cfg.seed))
        return callers[k]

    key = env.get("OPENAI_API_KEY")
    if cfg.generator == "local":
        if not sys.stderr.isatty():  # no transformers progress bars ("Loading weights") in a log file
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        gen = LocalGenerator(cfg.model_dir, cfg.k_samples, cfg.gen_temperature, cfg.gen_top_p, cfg.gen_max_tokens,
                             batch_size=cfg.local_batch, tokenizer=cfg.tokenizer, device=cfg.device, seed=cfg.seed)
    else:
        gen = OpenAIGenerator(caller(cfg.base_url, key), cfg.gen_model, cfg.k_samples, cfg.gen_temperature,
                              cfg.gen_top_p, cfg.gen_max_tokens, cfg.gen_use_n, cfg.seed)
    if cfg.judge == "reference":
        from .judges import ReferenceJudge

        judge = ReferenceJudge(cfg.metric)
    else:
        from .judges import OpenAIJudge

        jurl = cfg.judge_base_url or cfg.base_url
        judge = OpenAIJudge(caller(jurl, env.get("JUDGE_API_KEY") or key), cfg.judge_model,
                            cfg.judge_temperature, cfg.judge_tries, cfg.judge_max_tokens, cfg.seed)
    return gen, judge


def run(cfg: PrefsConfig, prompts: list[Prompt], *, generator=None, judge=None, stats: Stats | None = None,
        stop_event: threading.Event | None = None) -> dict:
    """Generate pairs for ``prompts`` into ``cfg.out_path`` (resuming); return the summary."""
    t0 = time.time()
    stats = stats or Stats()
    if generator is None or judge is None:
        g, j = build_backends(cfg, stats)
        generator, judge = generator or g, judge or j
    threads = cfg.threads
    if threads == 0 and isinstance(generator, LocalGenerator) and cfg.device == "cpu":
        n_params = sum(p.numel() for p in generator.model.parameters())
        threads = 1 if n_params < 10_000_000 else 0  # tiny matrices: more threads only add overhead
    threads_before = None
    if threads > 0:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
    writer = PairWriter(cfg.out_path, cfg.fsync)
    pending = [p for p in prompts if p.id not in writer.done_ids]
    skipped = len(prompts) - len(pending)
    counts: Counter = Counter()
    no_pair: Counter = Counter()
    failed: dict[str, str] = {}
    pairs_written = 0
    fatal: list[str] = []
    stop_event = stop_event or threading.Event()

    def finish(p: Prompt, res: Candidates | PromptFailed) -> tuple[str, object]:
        """Judge and write one prompt: ("written", n_pairs) or ("no_pair", reason)."""
        if isinstance(res, PromptFailed):
            raise res
        texts = _dedupe(res.texts)
        if len(texts) < 2:
            writer.write(p.id, [], "no_pair", "fewer_than_2_distinct")
            return "no_pair", "fewer_than_2_distinct"
        verdict = judge.rank(p, texts)
        usage = {k: res.usage.get(k, 0) + verdict.usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens")}
        pairs, reason = make_pairs(p, texts, verdict, cfg, generator.name, judge.name, usage)
        if not pairs:
            writer.write(p.id, [], "no_pair", reason)
            return "no_pair", reason
        writer.write(p.id, pairs, "written")
        return "written", len(pairs)

    def task(batch: list[Prompt]) -> list[tuple[Prompt, str, object]]:
        """Outcomes per prompt: written / no_pair / failed / aborted, with a count or a reason."""
        if stop_event.is_set():
            return [(p, "aborted", None) for p in batch]
        try:
            results = generator.generate(batch)
        except FatalError as e:
            stop_event.set()
            fatal.append(str(e))
            return [(p, "aborted", None) for p in batch]
        except Exception as e:  # an unexpected generator error fails this batch only
            log.exception("generation failed for a batch of %d prompts", len(batch))
            results = [PromptFailed(f"error:{type(e).__name__}", str(e)[:200])] * len(batch)
        out = []
        for p, res in zip(batch, results):
            if stop_event.is_set():
                out.append((p, "aborted", None))
                continue
            try:
                out.append((p, *finish(p, res)))
            except PromptFailed as e:
                writer.write(p.id, [], "failed", e.reason)
                log.warning("prompt %s failed: %s", p.id, e)
                out.append((p, "failed", e.reason))
            except FatalError as e:
                stop_event.set()
                fatal.append(str(e))
                out.append((p, "aborted", None))
            except Exception as e:  # a bug or an unexpected reply: this prompt fails, the run goes on
                log.exception("prompt %s failed", p.id)
                reason = f"error:{type(e).__name__}"
                writer.write(p.id, [], "failed", reason)
                out.append((p, "failed", reason))
        return out

    bs = max(1, getattr(generator, "batch_size", 1))
    batches = [pending[i:i + bs] for i in range(0, len(pending), bs)]
    workers = cfg.max_workers if bs == 1 else 1  # a local model samples one batch at a time
    bar = None
    if cfg.progress:  # a tqdm bar on a terminal, plain periodic lines in a log (nohup, pipes)
        from dataset.jsonl import Progress

        bar = Progress(total=len(pending), desc="prompts", unit="prompt", interval=10.0, stream=sys.stderr)

    def tally(results) -> None:
        nonlocal pairs_written
        for p, kind, val in results:
            counts[kind] += 1
            if kind == "failed":
                failed[p.id] = val
            elif kind == "no_pair":
                no_pair[val or "unknown"] += 1
            elif kind == "written":
                pairs_written += val
            if bar is not None:
                bar.update(1)

    interrupted = False
    running: set = set()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefs")
    try:
        it = iter(batches)
        for b in it:  # keep at most 2 x workers batches queued: bounded memory, fast stop
            running.add(pool.submit(task, b))
            if len(running) >= 2 * workers:
                break
        while running:
            done_set, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done_set:
                tally(fut.result())
                if not stop_event.is_set():
                    nxt = next(it, None)
                    if nxt is not None:
                        running.add(pool.submit(task, nxt))
    except KeyboardInterrupt:
        interrupted = True
        stop_event.set()
    finally:
        stop_event.set()  # queued batches return at once; in-flight prompts finish (and are written)
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in running:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                tally(fut.result())
        if bar is not None:
            bar.close()
        writer.close()
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)
    summary = {
        "selected": len(prompts),
        "skipped_already_done": skipped,
        "done": counts["written"] + counts["no_pair"],
        "written_prompts": counts["written"],
        "no_pair": counts["no_pair"],
        "no_pair_reasons": dict(no_pair),
        "failed": len(failed),
        "failed_reasons": dict(Counter(failed.values())),
        "failed_ids": failed,
        "not_run": len(pending) - counts["written"] - counts["no_pair"] - len(failed),
        "pairs_written": pairs_written,
        "pairs_in_file": writer.pairs_before + pairs_written,
        "retries": dict(stats.retries),
        "requests": stats.requests,
        "tokens": ({"prompt": stats.prompt_tokens, "completion": stats.completion_tokens,
                    "total": stats.prompt_tokens + stats.completion_tokens} if stats.usage_reported else None),
        "generator": generator.name,
        "judge": judge.name,
        "fatal": fatal[0] if fatal else None,
        "interrupted": interrupted,
        "elapsed_s": round(time.time() - t0, 2),
        "out_path": str(writer.path),
        "settings": cfg.public_dict(),
    }
    tmp = Path(str(writer.summary_path) + ".tmp")
    tmp.write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, writer.summary_path)
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"prompts: {s['selected']} selected, {s['skipped_already_done']} already done (skipped), "
        f"{s['done']} done now ({s['written_prompts']} with pairs, {s['no_pair']} without), "
        f"{s['failed']} failed, {s['not_run']} not run",
        f"pairs written: {s['pairs_written']} (file holds {s['pairs_in_file']}) -> {s['out_path']}",
        f"generator: {s['generator']}   judge: {s['judge']}   time: {s['elapsed_s']} s   requests: {s['requests']}",
    ]
    if s["no_pair_reasons"]:
        lines.append(f"no pair: {s['no_pair_reasons']}")
    if s["failed"]:
        lines.append(f"failed: {s['failed_reasons']} (ids in {s['out_path']}.summary.json; rerun to retry)")
    if s["retries"]:
        lines.append(f"retries: {s['retries']}")
    if s["tokens"]:
        t = s["tokens"]
        lines.append(f"tokens: {t['prompt']} prompt + {t['completion']} completion = {t['total']}")
    if s["fatal"]:
        lines.append(f"STOPPED: {s['fatal']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = resolve_prompts_path(cfg.prompts)
    prompts, bad = load_prompts(path, cfg.n_prompts, cfg.seed)
    log.info("%d prompts sampled from %s (%d unusable records); generator=%s judge=%s k=%d -> %s",
             len(prompts), path, bad, cfg.generator if cfg.generator == "local" else cfg.gen_model,
             cfg.judge if cfg.judge == "reference" else cfg.judge_model, cfg.k_samples, cfg.out_path)
    summary = run(cfg, prompts)
    print(format_summary(summary), flush=True)
    if summary["fatal"]:
        return 3
    if summary["interrupted"]:
        return 130
    return 0
