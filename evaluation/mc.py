"""Multiple-choice log-likelihood tasks (the HellaSwag / CORE way), built from the **test split only**.

Usage::

    from evaluation.mc import ensure_mc_items, score_mc, summarize_mc
    files = ensure_mc_items("data/embedded/mc")             # task -> mc_<task>_test.jsonl (built once)
    items = load_mc_items(files)                             # all tasks, fixed order
    per_item = score_mc(model, tokenizer, items)             # one record per item
    summary = summarize_mc(per_item)                         # per task: acc, chance, centred, CIs

    python -m evaluation.mc --out data/embedded/mc [--n_per_task 200]   # build / print counts

Distractors are drawn from the right answers of other test works *with their multiplicities*, so that
right answers and distractors follow one distribution (a frequent name, often a single token, is not
more often right than wrong): a randomly initialised model scores chance (a test checks it).

Items (one JSON line each: ``id``, ``task``, ``format``, ``prompt`` or ``messages`` + ``assistant_prefix``,
``options`` (4 strings), ``label`` (index of the right one), ``work_id``, ``split`` = ``"test"``). Every
item comes from a work of the corpus's ``test`` split (the split ``dataset.embedded`` derives
``*_test.jsonl`` from; the corpus keeps the fields those files drop: collection, author, form), and test
works whose text also occurs in a train work are left out. Built deterministically (hash-seeded per
work, no global random state): the same files on every run and machine. Tasks:

* ``next_line``: the work in the pretraining document format (``title\\n朝代·作者\\nbody``) up to the end
  of one line (a clause ending in ``，``); options: the true next line and 3 lines with the **same number
  of characters** from other test works (trailing punctuation removed from all four).
* ``author``: prompt ``title\\n朝代·``; option: ``author\\n`` + the first lines of the body (so the choice
  is the author that makes title *and* text most likely); distractors: authors of other test works,
  of the same dynasty where there are enough.
* ``title``: no prompt (``bos`` only); option: ``title\\n朝代·作者\\n`` + the first lines; distractors: titles
  of other test works of the same kind (诗 / 曲).
* ``form``: chat format (the SFT question ``这首诗是什么体裁？\\n{body}``, answer prefix ``这是一首``); options:
  the four regulated forms 五言绝句 / 七言绝句 / 五言律诗 / 七言律诗 + ``。`` (poems in one of them, form from
  line lengths and count: ``dataset.embedded.detect_form``; the right answers are balanced over the four,
  so a model that always says one form scores chance); for 词 (a fifth of the items): ``这首词的词牌名是什么？``,
  prefix ``这首词的词牌是《``, options: 4 词牌 + ``》。`` (distractors: 词牌 of other test works).
* ``cloze``: the document up to a missing span of 2 characters inside a line; option: the span + the rest
  of that line (so the right context counts); distractors: 2-character spans from lines of other works.

Scoring (:func:`score_mc`): for each option, ``logp_sum`` = sum of the log-probabilities of its tokens
given the prompt (:func:`model.losses.sequence_nll_of`; the prompt is encoded alone, the option alone, then
concatenated, so every option sees the same prompt ids); ``logp_norm`` = ``logp_sum`` / number of
**characters** of the option (length-normalised, tokenizer-independent, like lm-eval's ``acc_norm`` per
byte). The model's choice is the arg-max (first on ties); ``correct`` uses ``logp_sum`` (the headline),
``correct_norm`` uses ``logp_norm``. A prompt too long for the window (``max_len`` tokens, default the
model's context) keeps its end (left-truncated); an option longer than the window keeps its start.

Summary (:func:`summarize_mc`): per task ``acc`` and ``acc_norm`` with percentile bootstrap 95% CIs over
items, ``chance`` (mean of 1 / number of options = 0.25), and the centred accuracy
``centred = (acc - chance) / (1 - chance)`` (0 = chance, 1 = perfect) with the same transform of the CI.
:func:`paired_mc` gives the paired bootstrap of the difference in accuracy between two arms on the same
items.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from dataset.collate import pad_collate
from model.losses import IGNORE_INDEX, sequence_nll_of

from .metrics import bootstrap_mean_ci, paired_bootstrap

MC_VERSION = 1
TASKS = ("next_line", "author", "title", "form", "cloze")
N_OPTIONS = 4
DEFAULT_N_PER_TASK = 200
STAMP = ".mc_stamp.json"
_SEED = "mateconv-mc-v1"
_END_PUNCT = "，。？！；：、"
_CLAUSE_RE = re.compile(r"[^，。？！；：、\n]+[，。？！；：、]?")
_HAN_RE = re.compile(r"^[\u3400-\u9fff]+$")
REGULATED = ("五言绝句", "七言绝句", "五言律诗", "七言律诗")
MAX_HEAD_CHARS = 64  # body characters shown after an author / title option
MAX_CONTEXT_CHARS = 160  # body characters before a next-line / cloze position


def _rng(*parts) -> random.Random:
    digest = hashlib.blake2b(":".join([_SEED, *map(str, parts)]).encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _order_key(task: str, work_id: str) -> str:
    return hashlib.sha1(f"{_SEED}:{task}:{work_id}".encode()).hexdigest()


def _bare(clause: str) -> str:
    return clause.rstrip(_END_PUNCT)


# ------------------------------------------------------------------------------------------ building


def test_works(corpus=None) -> list[dict]:
    """The corpus's test-split works (poetry and prose), minus those whose text occurs in a train work."""
    from dataset.build_corpus import CORPUS_PATH, read_corpus
    from dataset.embedded import body_text

    works = read_corpus(corpus or CORPUS_PATH)
    train_bodies = {body_text(w) for w in works if w["split"] == "train"}
    return [w for w in works if w["split"] == "test" and body_text(w) not in train_bodies and "□" not in body_text(w)]


def _known_author(w: dict) -> bool:
    a = w.get("author") or ""
    return bool(a) and a not in ("佚名", "无名氏", "不详") and len(a) <= 8


def _usable_title(w: dict) -> bool:
    return w["title"] not in ("无题", "句") and len(w["title"]) <= 16 and "□" not in w["title"]


def _head(w: dict) -> str:
    from dataset.embedded import byline, display_title

    return f"{display_title(w)}\n{byline(w)}\n"


def _body_upto(body: str, end: int) -> str:
    """``body[:end]`` cut to at most MAX_CONTEXT_CHARS, starting at a line start when cut."""
    if end <= MAX_CONTEXT_CHARS:
        return body[:end]
    start = body.find("\n", end - MAX_CONTEXT_CHARS)
    start = start + 1 if 0 <= start < end else end - MAX_CONTEXT_CHARS
    return body[start:end]


def _first_lines(body: str) -> str:
    lines, n = [], 0
    for line in body.split("\n"):
        if lines and n + len(line) > MAX_HEAD_CHARS:
            break
        lines.append(line[:MAX_HEAD_CHARS])
        n += len(line)
    return "\n".join(lines)


def _clause_spans(body: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in _CLAUSE_RE.finditer(body) if m.group().strip()]


def _pick_distractors(rng: random.Random, pool: Sequence[str], correct: str, k: int = N_OPTIONS - 1,
                      avoid: set | None = None) -> list[str] | None:
    """``k`` distinct strings drawn from ``pool`` **with its multiplicities** (a name that answers many
    works is drawn as often as it is a right answer: right answers and distractors come from one
    distribution, so a model that knows nothing picks the right one with probability 1/4), none equal
    to ``correct`` or in ``avoid``; ``None`` when the pool has too few."""
    avoid = (avoid or set()) | {correct}
    out: list[str] = []
    for idx in rng.sample(range(len(pool)), len(pool)) if len(pool) <= 4096 else (
            rng.randrange(len(pool)) for _ in range(4096)):
        v = pool[idx]
        if v not in avoid and v not in out:
            out.append(v)
            if len(out) == k:
                return out
    return None


def _options(rng: random.Random, correct: str, distractors: list[str]) -> tuple[list[str], int]:
    opts = distractors + [correct]
    rng.shuffle(opts)
    return opts, opts.index(correct)


def build_mc_items(n_per_task: int = DEFAULT_N_PER_TASK, corpus=None) -> dict[str, list[dict]]:
    """task -> items (see module doc); deterministic for a given corpus and ``n_per_task``."""
    from dataset.embedded import body_text, detect_form, kind_of

    works = [w for w in test_works(corpus) if kind_of(w) != "文"]
    by_id = {w["id"]: w for w in works}
    bodies = {w["id"]: body_text(w) for w in works}
    clauses = {wid: _clause_spans(b) for wid, b in bodies.items()}
    # pools for distractors
    lines_by_len: dict[int, list[tuple[str, str]]] = defaultdict(list)  # n chars -> (work id, bare line)
    spans2: list[tuple[str, str]] = []
    for wid, cl in clauses.items():
        for _, _, c in cl:
            b = _bare(c)
            if _HAN_RE.match(b):
                lines_by_len[len(b)].append((wid, b))
                if len(b) >= 4:
                    spans2.append((wid, b[1:3]))
    authors_by_dyn: dict[str, list] = defaultdict(list)  # pools keep multiplicities (see _pick_distractors)
    titles_by_kind: dict[str, list] = defaultdict(list)
    cipai: list = []
    for w in sorted(works, key=lambda w: w["id"]):
        if _known_author(w):
            authors_by_dyn[w.get("dynasty") or ""].append(w["author"])
        if w["collection"] == "songci":
            if w.get("rhythmic") and _HAN_RE.match(w["rhythmic"]):
                cipai.append(w["rhythmic"])
        elif _usable_title(w):
            titles_by_kind[kind_of(w)].append(w["title"])
    all_authors = [a for dyn in sorted(authors_by_dyn) for a in authors_by_dyn[dyn]]
    cipai_set = set(cipai)

    def next_line(w, rng):
        cl = clauses[w["id"]]
        cand = [i for i in range(len(cl) - 1) if cl[i][2].endswith("，") and _HAN_RE.match(_bare(cl[i + 1][2]))
                and 3 <= len(_bare(cl[i + 1][2])) <= 9]
        if not cand:
            return None
        i = rng.choice(cand)
        correct = _bare(cl[i + 1][2])
        pool = [b for wid, b in lines_by_len[len(correct)] if wid != w["id"]]
        avoid = {_bare(c) for _, _, c in cl}
        d = _pick_distractors(rng, pool, correct, avoid=avoid)
        if d is None:
            return None
        opts, label = _options(rng, correct, d)
        return {"format": "text", "prompt": _head(w) + _body_upto(bodies[w["id"]], cl[i][1]),
                "options": opts, "label": label}

    def author(w, rng):
        if not _known_author(w) or not w.get("dynasty"):
            return None
        a = w["author"]
        same = authors_by_dyn[w["dynasty"]]
        d = _pick_distractors(rng, same if len(set(same)) > 2 * N_OPTIONS else all_authors, a)
        if d is None:
            return None
        from dataset.embedded import display_title

        tail = "\n" + _first_lines(bodies[w["id"]])
        opts, label = _options(rng, a, d)
        return {"format": "text", "prompt": f"{display_title(w)}\n{w['dynasty']}·", "options": [o + tail for o in opts],
                "label": label, "choices": opts}

    def title(w, rng):
        if w["collection"] == "songci" or not _usable_title(w):
            return None
        d = _pick_distractors(rng, titles_by_kind[kind_of(w)], w["title"])
        if d is None:
            return None
        from dataset.embedded import byline

        tail = f"\n{byline(w)}\n" + _first_lines(bodies[w["id"]])
        opts, label = _options(rng, w["title"], d)
        return {"format": "text", "prompt": "", "options": [o + tail for o in opts], "label": label, "choices": opts}

    def form(w, rng):
        body = bodies[w["id"]]
        if len(body) > 200:
            return None
        if w["collection"] == "songci":
            r = w.get("rhythmic")
            if not r or r not in cipai_set:
                return None
            d = _pick_distractors(rng, cipai, r)
            if d is None:
                return None
            opts, label = _options(rng, r, d)
            return {"format": "chat", "messages": [{"role": "user", "content": f"这首词的词牌名是什么？\n{body}"}],
                    "assistant_prefix": "这首词的词牌是《", "options": [o + "》。" for o in opts], "label": label,
                    "choices": opts}
        f = detect_form(w)
        if f not in REGULATED:
            return None
        opts, label = _options(rng, f, [x for x in REGULATED if x != f])
        return {"format": "chat", "messages": [{"role": "user", "content": f"这首诗是什么体裁？\n{body}"}],
                "assistant_prefix": "这是一首", "options": [o + "。" for o in opts], "label": label, "choices": opts}

    def cloze(w, rng):
        cl = clauses[w["id"]]
        cand = [k for k, (_, _, c) in enumerate(cl) if _HAN_RE.match(_bare(c)) and len(_bare(c)) >= 5]
        if not cand:
            return None
        k = rng.choice(cand)
        start, _, c = cl[k]
        b = _bare(c)
        pos = rng.randrange(0, len(b) - 1)
        span, rest = b[pos:pos + 2], b[pos + 2:]
        pool = [s for wid, s in spans2 if wid != w["id"] and _HAN_RE.match(s)]
        d = _pick_distractors(rng, pool, span)
        if d is None:
            return None
        opts, label = _options(rng, span, d)
        return {"format": "text", "prompt": _head(w) + _body_upto(bodies[w["id"]], start + pos),
                "options": [o + rest for o in opts], "label": label, "choices": opts}

    makers: dict[str, Callable] = {"next_line": next_line, "author": author, "title": title, "form": form,
                                   "cloze": cloze}
    out: dict[str, list[dict]] = {}
    for task in TASKS:
        items = []
        per_class: dict[str, int] = defaultdict(int)
        for wid in sorted(by_id, key=lambda x: _order_key(task, x)):
            if len(items) >= n_per_task:
                break
            item = makers[task](by_id[wid], _rng(task, wid))
            if item is None:
                continue
            if task == "form":  # the same four options every time: balance the right answers (and 词牌)
                cls = item["choices"][item["label"]] if item["choices"][0] in REGULATED else "词牌"
                cap = n_per_task // 5 if cls == "词牌" else (n_per_task - n_per_task // 5) // len(REGULATED)
                if per_class[cls] >= max(cap, 1):
                    continue
                per_class[cls] += 1
            items.append({"id": f"mc-{task}-{wid}", "task": task, **item, "work_id": wid,
                          "collection": by_id[wid]["collection"], "split": "test"})
        out[task] = items
    return out


def mc_paths(out_dir) -> dict[str, Path]:
    return {t: Path(out_dir) / f"mc_{t}_test.jsonl" for t in TASKS}


def ensure_mc_items(out_dir="data/embedded/mc", n_per_task: int = DEFAULT_N_PER_TASK, force: bool = False,
                    corpus=None) -> dict[str, Path]:
    """Write ``mc_<task>_test.jsonl`` under ``out_dir`` (skipped when the stamp matches the corpus, the
    builder version and ``n_per_task``); returns task -> path."""
    from dataset.build_corpus import CORPUS_PATH
    from dataset.embedded import corpus_hash

    out_dir = Path(out_dir)
    paths = mc_paths(out_dir)
    want = {"corpus_sha256": corpus_hash(corpus or CORPUS_PATH), "mc_version": MC_VERSION, "n_per_task": n_per_task}
    stamp = out_dir / STAMP
    if not force and stamp.is_file() and all(p.is_file() for p in paths.values()):
        try:
            have = json.loads(stamp.read_text(encoding="utf-8"))
        except ValueError:
            have = {}
        if all(have.get(k) == v for k, v in want.items()):
            return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    items = build_mc_items(n_per_task, corpus)
    for task, path in paths.items():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items[task]), encoding="utf-8")
        os.replace(tmp, path)
    want["counts"] = {t: len(v) for t, v in items.items()}
    stamp.write_text(json.dumps(want, indent=1), encoding="utf-8")
    return paths


def load_mc_items(paths) -> list[dict]:
    """Items of one file, a list of files or a task -> file dict; a bad line names file, line and field."""
    if isinstance(paths, dict):
        paths = list(paths.values())
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    items = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    it = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                for key in ("id", "task", "options", "label"):
                    if key not in it:
                        raise ValueError(f"{path}:{n}: multiple-choice item without field {key!r}")
                if not (isinstance(it["options"], list) and len(it["options"]) >= 2
                        and all(isinstance(o, str) and o for o in it["options"])):
                    raise ValueError(f"{path}:{n}: field 'options' must be a list of at least 2 non-empty strings")
                if not (isinstance(it["label"], int) and 0 <= it["label"] < len(it["options"])):
                    raise ValueError(f"{path}:{n}: field 'label' must index 'options' (got {it['label']!r})")
                if it.get("format", "text") == "chat" and not isinstance(it.get("messages"), list):
                    raise ValueError(f"{path}:{n}: a chat-format item needs field 'messages'")
                items.append(it)
    return items


# ------------------------------------------------------------------------------------------ scoring


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _context_ids(tokenizer, item: dict) -> list[int]:
    if item.get("format", "text") == "chat":
        from tokenizer.chat import encode_chat

        return list(encode_chat(tokenizer, item["messages"])) + _ids(tokenizer, item.get("assistant_prefix", ""))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
    return [bos] + _ids(tokenizer, item.get("prompt", ""))


@torch.no_grad()
def score_mc(model, tokenizer, items: list[dict], batch_size: int = 32, device=None, autocast=None,
             max_len: int | None = None, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One record per item: ``id``, ``task``, ``label``, ``n_options``, ``logp_sum``, ``logp_norm`` (per option),
    ``pred``, ``pred_norm``, ``correct``, ``correct_norm`` (0/1). ``batch_size`` counts option rows."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ctx = autocast or nullcontext
    max_len = int(max_len or getattr(model.config, "max_position_embeddings", 512))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = pad_collate(pad)
    rows = []  # (item index, option index, input_ids, targets)
    for i, it in enumerate(items):
        c = _context_ids(tokenizer, it)
        for j, opt in enumerate(it["options"]):
            o = _ids(tokenizer, opt)[:max_len]  # an option longer than the window keeps its start
            ctx_keep = c[-(max_len + 1 - len(o)):]  # and at least one context token
            seq, n_ctx = ctx_keep + o, len(ctx_keep)
            tgt = [IGNORE_INDEX] * (n_ctx - 1) + seq[n_ctx:]
            rows.append((i, j, torch.tensor(seq[:-1]), torch.tensor(tgt)))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))  # similar lengths share a batch
    logp = [[0.0] * len(it["options"]) for it in items]
    try:
        for start in range(0, len(order), batch_size):
            chunk = [rows[r] for r in order[start:start + batch_size]]
            batch = collate([{"input_ids": r[2], "targets": r[3]} for r in chunk])
            ids, tgt, mask = (batch[k].to(device) for k in ("input_ids", "targets", "attention_mask"))
            with ctx():
                s, _ = sequence_nll_of(model, ids, mask, tgt)
            for (i, j, _, _), v in zip(chunk, s.double().cpu().tolist()):
                logp[i][j] = -v
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    out = []
    for it, lp in zip(items, logp):
        norm = [v / max(len(o), 1) for v, o in zip(lp, it["options"])]
        pred, pred_n = max(range(len(lp)), key=lambda k: (lp[k], -k)), max(range(len(norm)), key=lambda k: (norm[k], -k))
        out.append({"id": it["id"], "task": it["task"], "label": it["label"], "n_options": len(lp),
                    "logp_sum": lp, "logp_norm": norm, "pred": pred, "pred_norm": pred_n,
                    "correct": int(pred == it["label"]), "correct_norm": int(pred_n == it["label"])})
    return out


def _centred(acc: float, chance: float) -> float:
    return (acc - chance) / (1.0 - chance)


def summarize_mc(records: list[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """task -> ``n``, ``chance``, ``acc``/``acc_norm`` (``{"mean","ci_low","ci_high"}``), ``centred``/
    ``centred_norm`` (the same transformed), ``above_chance`` (CI low > chance)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out = {}
    for task in sorted(by_task, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t)):
        rs = by_task[task]
        chance = sum(1.0 / r["n_options"] for r in rs) / len(rs)
        res = {"n": len(rs), "chance": chance}
        for key, field in (("acc", "correct"), ("acc_norm", "correct_norm")):
            ci = bootstrap_mean_ci([r[field] for r in rs], n_resamples, seed)
            res[key] = {"mean": ci["mean"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"]}
            cent = "centred" if key == "acc" else "centred_norm"
            res[cent] = {k: _centred(ci[k], chance) for k in ("mean", "ci_low", "ci_high")}
        res["above_chance"] = bool(res["acc"]["ci_low"] > chance)
        out[task] = res
    return out


def paired_mc(records_a: list[dict], records_b: list[dict], field: str = "correct", n_resamples: int = 2000,
              seed: int = 0) -> dict:
    """task -> paired bootstrap of mean(a - b) of ``field`` over the items both arms scored (matched by id)."""
    b_by_id = {r["id"]: r for r in records_b}
    by_task: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in records_a:
        if r["id"] in b_by_id:
            xa, xb = by_task[r["task"]]
            xa.append(r[field])
            xb.append(b_by_id[r["id"]][field])
    return {t: paired_bootstrap(a, b, n_resamples, seed) for t, (a, b) in by_task.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the multiple-choice task files from the test split.")
    ap.add_argument("--out", default="data/embedded/mc")
    ap.add_argument("--n_per_task", type=int, default=DEFAULT_N_PER_TASK)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    t = time.time()
    paths = ensure_mc_items(a.out, a.n_per_task, a.force)
    for task, p in paths.items():
        n = sum(1 for line in open(p, encoding="utf-8") if line.strip())
        print(f"{p}: {n} items ({task})")
    print(f"built in {time.time() - t:.1f}s")


if __name__ == "__main__":
    main()
