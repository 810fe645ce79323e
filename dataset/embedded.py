"""Deterministic derivation of the embedded datasets from the committed corpus.

``ensure_embedded(out_dir)`` writes (idempotently; skipped when the stamp matches the corpus hash):

- ``pretrain_{train,validation,test}.jsonl``: ``{"text"}``: title line, ``朝代·作者`` line, the work;
  notes / commentary as separate documents; long prose is cut at paragraph boundaries (~``MAX_DOC_CHARS``).
- ``sft_{train,validation,test}.jsonl``: ``{"id", "task", "conversations", ["answer"]}``; one or more
  conversations per work (tasks below); ``answer`` is the exact short answer of exact-answer tasks
  (the assistant message contains it; score with ``answer in output`` after stripping punctuation).
- ``prefs_prompts_{train,validation}.jsonl``: ``{"id", "task", "conversations": [user], "reference"}``
  for preference generation; open-ended tasks, from train / validation works respectively.

Tasks: ``write_poem`` (title + form -> the work), ``author`` (exact), ``continue_line`` (exact next line),
``title`` (exact), ``form`` (五言绝句 / 七言律诗 ..., exact), ``cipai`` (词牌, exact), ``explain``
(works with notes or a modern explanation), ``recite`` (famous poems), ``continue_poem`` (prefs only).

CLI: ``python -m dataset.embedded --out data/embedded [--force]`` prints counts per file and task.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
from pathlib import Path

from .build_corpus import CORPUS_PATH, read_corpus

GENERATOR_VERSION = 2  # bump when the derivation changes: ensure_embedded() then rebuilds
SEED = "mateconv-embedded-v1"
SPLITS = ("train", "validation", "test")
PREF_SPLITS = ("train", "validation")
PREF_COUNTS = {"train": 4000, "validation": 400}
MAX_DOC_CHARS = 480
MAX_WRITE_CHARS = 300  # works longer than this are not used as "write a poem" targets
STAMP = ".stamp.json"

FILE_NAMES = [f"pretrain_{s}" for s in SPLITS] + [f"sft_{s}" for s in SPLITS] + [
    f"prefs_prompts_{s}" for s in PREF_SPLITS]

_CLAUSE_RE = re.compile(r"[^，。？！；：、]+[，。？！；：、]?")
_PUNCT_RE = re.compile(r"[，。？！；：、「」『』“”‘’《》·…—\s]")
_CJK_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_FORMS = ("五言绝句", "七言绝句", "五言律诗", "七言律诗", "五言古诗", "七言古诗", "五言排律", "七言排律")
_CI = {"songci", "huajianji", "nantang", "nalanxingde"}
_SHI = {"tang", "songshi", "shuimotangshi", "caocao", "shijing", "chuci"}
_PROSE_BOOKS = {"lunyu", "sishu", "youmengying"}


# ------------------------------------------------------------------------------------------ helpers
def strip_punct(text: str) -> str:
    return _PUNCT_RE.sub("", text)


def kind_of(work: dict) -> str:
    """诗 / 词 / 曲 / 文."""
    col = work["collection"]
    if col in _CI:
        return "词"
    if col == "yuanqu":
        return "曲"
    if col in _SHI:
        return "诗"
    if col == "mengxue" and {"唐诗三百首", "千家诗"} & set(work.get("tags", [])):
        return "诗"
    return "文"


def clauses(work: dict) -> list[str]:
    cached = work.get("_clauses")
    if cached is None:
        cached = [c.strip() for para in work["paragraphs"] for c in _CLAUSE_RE.findall(para) if c.strip()]
        work["_clauses"] = cached
    return cached


def detect_form(work: dict) -> str | None:
    """Regulated forms from line lengths (or the source's form tag): 五言绝句, 七言律诗, ..."""
    if "_form" not in work:
        work["_form"] = _detect_form(work)
    return work["_form"]


def _detect_form(work: dict) -> str | None:
    for tag in work.get("tags", []):
        if tag in _FORMS:
            return tag
    if kind_of(work) != "诗" or work["collection"] in ("shijing", "chuci"):
        return None
    cls = clauses(work)
    if not cls or any("□" in c for c in cls):
        return None
    lengths = {len(c) - (c[-1] in "，。？！；：、") for c in cls}
    if len(lengths) != 1:
        return None
    n_chars = lengths.pop()
    if n_chars not in (5, 7):
        return None
    prefix = "五言" if n_chars == 5 else "七言"
    if len(cls) == 4:
        return prefix + "绝句"
    if len(cls) == 8:
        return prefix + "律诗"
    return None


def body_text(work: dict) -> str:
    return "\n".join(work["paragraphs"])


def dynasty_label(work: dict) -> str:
    dyn = work.get("dynasty") or ""
    return dyn + "代" if len(dyn) == 1 else dyn


def byline(work: dict) -> str:
    dyn, author = work.get("dynasty") or "", work.get("author") or ""
    return f"{dyn}·{author}" if dyn and author else (author or dyn)


def display_title(work: dict) -> str:
    return work.get("rhythmic") if work["collection"] == "songci" else work["title"]


def _rng(*parts) -> random.Random:
    digest = hashlib.blake2b(":".join([SEED, *map(str, parts)]).encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _msg(user: str, assistant: str | None = None) -> list[dict]:
    conv = [{"role": "user", "content": user}]
    if assistant is not None:
        conv.append({"role": "assistant", "content": assistant})
    return conv


def _explanation(work: dict) -> str | None:
    parts = []
    if work.get("commentary"):
        parts.append(work["commentary"].strip())
    if work.get("notes"):
        parts.append("注释：\n" + "\n".join(work["notes"]))
    return "\n\n".join(parts) if parts else None


# ------------------------------------------------------------------------------------------ pretraining
def pretrain_docs(work: dict) -> list[str]:
    header = display_title(work)
    if work["collection"] == "songci" and work["title"] != work.get("rhythmic"):
        header = work["title"]
    head = [header, byline(work)]
    if work.get("preface"):
        head.append(work["preface"])
    docs, chunk = [], []
    for para in work["paragraphs"]:
        if chunk and sum(map(len, chunk)) + len(para) > MAX_DOC_CHARS:
            docs.append("\n".join(head + chunk))
            chunk = []
        chunk.append(para)
    if chunk:
        docs.append("\n".join(head + chunk))
    if work.get("notes"):
        docs.append(f"《{header}》注释：\n" + "\n".join(work["notes"]))
    if work.get("commentary"):
        label = "评点" if work["collection"] == "youmengying" else "译文与赏析"
        docs.append(f"《{header}》{label}：\n" + work["commentary"])
    return docs


# ------------------------------------------------------------------------------------------ SFT tasks
_WRITE_SHI = [
    "请以《{title}》为题，写一首{form}。",
    "以“{title}”为题，作一首{form}。",
    "写一首{form}，题目是《{title}》。",
    "模仿{dyn}{author}的风格，写一首题为《{title}》的{form}。",
    "请你作一首{form}，题为《{title}》。",
]
_WRITE_CI = [
    "请以《{rhythmic}》为词牌填一首词。",
    "模仿{dyn}{author}的风格，填一首《{rhythmic}》。",
    "用词牌《{rhythmic}》写一首词。",
    "请填一首词，词牌是《{rhythmic}》。",
]
_WRITE_CI_TITLED = [
    "以《{title}》为题，填一首词。",
    "请写一首词，题为《{title}》。",
]
_WRITE_QU = [
    "以《{title}》为题，写一首元曲。",
    "模仿{author}的风格，写一首《{title}》。",
    "请按曲牌写一首散曲，题为《{title}》。",
]
_AUTHOR = [
    "下面这首{kind}的作者是谁？\n{body}",
    "《{title}》\n{body}\n这首{kind}是谁写的？",
    "请说出这首{kind}的作者：\n{body}",
    "{body}\n以上这首{kind}出自哪位作者之手？",
]
_AUTHOR_PROSE = [
    "下面这段文字出自哪位作者？\n{body}",
    "《{title}》的作者是谁？",
]
_CONTINUE = [
    "请接出下一句：{clause}",
    "“{clause}”的下一句是什么？",
    "{title}中，“{clause}”后面一句是什么？",
    "对出下句：{clause}",
]
_TITLE = [
    "这首{kind}的题目是什么？\n{body}",
    "{body}\n请问这首{kind}的标题是？",
    "下面这首{kind}题为什么？\n{body}",
]
_FORM = [
    "这首诗是什么体裁？\n{body}",
    "{body}\n请判断这首诗的体裁（如五言绝句、七言律诗）。",
    "下面这首诗属于哪种诗体？\n{body}",
]
_CIPAI = [
    "这首词的词牌名是什么？\n{body}",
    "{body}\n请说出这首词所用的词牌。",
    "下面这首词用的是哪个词牌？\n{body}",
]
_EXPLAIN = [
    "请解释一下这首{kind}：\n《{title}》\n{body}",
    "帮我讲解{author}的《{title}》：\n{body}",
    "《{title}》\n{body}\n这首{kind}是什么意思？",
    "请赏析并解释下面的{kind}：\n{body}",
]
_EXPLAIN_PROSE = [
    "请谈谈你对这段话的理解：\n{body}",
    "怎么理解下面这段文字？\n{body}",
]
_RECITE = [
    "请背诵{author}的《{title}》。",
    "{author}的《{title}》全文是什么？",
    "默写{dyn}{author}的《{title}》。",
]
_CONTINUE_POEM = [
    "请续写这首{kind}：\n{head}",
    "下面是一首{kind}的开头，请接着写完：\n{head}",
]


def _fmt(rng: random.Random, templates: list[str], **kw) -> str:
    usable = [t for t in templates if ("{author}" not in t or kw.get("author") not in ("", "佚名"))]
    return rng.choice(usable or templates).format(**kw)


def _fields(work: dict) -> dict:
    return dict(title=display_title(work), author=work.get("author") or "", dyn=dynasty_label(work),
                body=body_text(work), kind=kind_of(work), rhythmic=work.get("rhythmic") or work["title"])


def task_write_poem(work: dict, rng: random.Random) -> dict | None:
    kind = kind_of(work)
    body = body_text(work)
    if kind == "文" or len(body) > MAX_WRITE_CHARS or "□" in body:
        return None
    f = _fields(work)
    if kind == "词":
        titled = work["collection"] == "nalanxingde" or (work["title"] != f["rhythmic"])
        templates = _WRITE_CI_TITLED if titled and work["collection"] != "songci" else _WRITE_CI
        f["title"] = work["title"]
        prompt = _fmt(rng, templates, **f)
    elif kind == "曲":
        prompt = _fmt(rng, _WRITE_QU, **f)
    else:
        if work["title"] in ("无题", "句") and work["collection"] != "tang":
            return None
        form = detect_form(work) or ("诗" if work["collection"] not in ("shijing", "chuci") else "古诗")
        prompt = _fmt(rng, _WRITE_SHI, form=form, **f)
    return {"conversations": _msg(prompt, body)}


def task_author(work: dict, rng: random.Random) -> dict | None:
    author = work.get("author") or ""
    if author in ("", "佚名", "无名氏") or len(author) > 8:
        return None
    f = _fields(work)
    if f["kind"] == "文":
        if len(f["body"]) > 400:
            return None
        prompt = _fmt(rng, _AUTHOR_PROSE, **f)
    else:
        if len(f["body"]) > 400:
            return None
        prompt = _fmt(rng, _AUTHOR, **f)
    noun = {"文": "这段文字"}.get(f["kind"], "这首" + f["kind"])
    dyn = f["dyn"]
    answer = f"{noun}的作者是{dyn}的{author}。" if dyn else f"{noun}的作者是{author}。"
    return {"conversations": _msg(prompt, answer), "answer": author}


def task_continue_line(work: dict, rng: random.Random) -> dict | None:
    cls = clauses(work)
    bare = [strip_punct(c) for c in cls]
    counts = collections.Counter(bare)
    candidates = [
        i for i in range(len(cls) - 1)
        if 3 <= len(bare[i]) <= 12 and 2 <= len(bare[i + 1]) <= 12
        and counts[bare[i]] == 1 and "□" not in cls[i] and "□" not in cls[i + 1]
    ]
    if not candidates:
        return None
    # prefer the first half of a couplet (a clause ending with "，")
    firsts = [i for i in candidates if cls[i].endswith("，")] or candidates
    i = rng.choice(firsts)
    f = _fields(work)
    prompt = _fmt(rng, _CONTINUE, clause=cls[i].rstrip("，。？！；：、"), title=f"《{f['title']}》")
    nxt = cls[i + 1]
    return {"conversations": _msg(prompt, nxt), "answer": strip_punct(nxt)}


def task_title(work: dict, rng: random.Random) -> dict | None:
    f = _fields(work)
    title = work["title"]
    if f["kind"] in ("词", "文") or title in ("无题", "句") or "□" in title or len(f["body"]) > 400:
        return None
    prompt = _fmt(rng, _TITLE, **f)
    return {"conversations": _msg(prompt, f"这首{f['kind']}的题目是《{title}》。"), "answer": title}


def task_form(work: dict, rng: random.Random) -> dict | None:
    form = detect_form(work)
    if form is None:
        return None
    prompt = _fmt(rng, _FORM, **_fields(work))
    return {"conversations": _msg(prompt, f"这是一首{form}。"), "answer": form}


def task_cipai(work: dict, rng: random.Random) -> dict | None:
    rhythmic = work.get("rhythmic")
    if work["collection"] != "songci" or not rhythmic or "□" in rhythmic or len(body_text(work)) > 400:
        return None
    prompt = _fmt(rng, _CIPAI, **_fields(work))
    return {"conversations": _msg(prompt, f"这首词的词牌是《{rhythmic}》。"), "answer": rhythmic}


def task_explain(work: dict, rng: random.Random) -> dict | None:
    explanation = _explanation(work)
    if explanation is None:
        return None
    f = _fields(work)
    templates = _EXPLAIN_PROSE if f["kind"] == "文" else _EXPLAIN
    return {"conversations": _msg(_fmt(rng, templates, **f), explanation)}


def task_recite(work: dict, rng: random.Random) -> dict | None:
    tags = set(work.get("tags", []))
    if not {"唐诗三百首", "千家诗"} & tags or work.get("author") in (None, "", "佚名"):
        return None
    if len(body_text(work)) > 400:
        return None
    return {"conversations": _msg(_fmt(rng, _RECITE, **_fields(work)), body_text(work))}


def task_continue_poem(work: dict, rng: random.Random) -> dict | None:
    """Prefs only: the first half (at least one line) is given, the rest is the reference."""
    paras = work["paragraphs"]
    kind = kind_of(work)
    if kind == "文" or len(paras) < 2 or len(body_text(work)) > MAX_WRITE_CHARS or "□" in body_text(work):
        return None
    k = max(1, len(paras) // 2)
    head = "\n".join(paras[:k])
    prompt = _fmt(rng, _CONTINUE_POEM, kind=kind, head=head)
    return {"conversations": _msg(prompt), "reference": "\n".join(paras[k:])}


PRIMARY_TASKS = {  # name -> (function, weight); one is drawn per work among those that apply
    "write_poem": (task_write_poem, 3.0),
    "continue_line": (task_continue_line, 3.0),
    "author": (task_author, 2.0),
    "title": (task_title, 1.0),
    "form": (task_form, 1.0),
    "cipai": (task_cipai, 1.0),
}
EXTRA_TASKS = {"explain": task_explain, "recite": task_recite}  # added whenever they apply
PREF_TASKS = {"write_poem": (task_write_poem, 2.0), "explain": (task_explain, 6.0),
              "continue_poem": (task_continue_poem, 2.0)}


def sft_records(work: dict) -> list[dict]:
    rng = _rng("sft", work["id"])
    options = []
    for name, (fn, weight) in PRIMARY_TASKS.items():
        rec = fn(work, rng)
        if rec is not None:
            options.append((name, rec, weight))
    out = []
    if options:
        name, rec, _ = rng.choices(options, weights=[w for *_, w in options])[0]
        out.append((name, rec))
    for name, fn in EXTRA_TASKS.items():
        rec = fn(work, rng)
        if rec is not None:
            out.append((name, rec))
    return [{"id": f"{work['id']}-{name}", "task": name, **rec} for name, rec in out]


def pref_candidates(work: dict) -> list[dict]:
    rng = _rng("pref", work["id"])
    options = []
    for name, (fn, weight) in PREF_TASKS.items():
        rec = fn(work, rng)
        if rec is None:
            continue
        if "reference" not in rec:
            rec = {"conversations": rec["conversations"][:1], "reference": rec["conversations"][1]["content"]}
        options.append((name, rec, weight))
    if not options:
        return []
    name, rec, _ = rng.choices(options, weights=[w for *_, w in options])[0]
    return [{"id": f"pref-{work['id']}-{name}", "task": name, **rec}]


def _select_prefs(records: list[dict], n: int, split: str) -> list[dict]:
    """Deterministic sample of n prompts; works with notes (explain) are all kept when possible."""
    explain = [r for r in records if r["task"] == "explain"]
    other = [r for r in records if r["task"] != "explain"]
    other.sort(key=lambda r: hashlib.sha1(f"{SEED}:{split}:{r['id']}".encode()).hexdigest())
    chosen = explain[: n // 4] + other[: max(0, n - min(len(explain), n // 4))]
    chosen.sort(key=lambda r: hashlib.sha1(f"{SEED}:order:{r['id']}".encode()).hexdigest())
    return chosen[:n]


# ------------------------------------------------------------------------------------------ driver
def derive(works: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {name: [] for name in FILE_NAMES}
    pref_pool: dict[str, list[dict]] = {s: [] for s in PREF_SPLITS}
    for work in works:
        split = work["split"]
        out[f"pretrain_{split}"].extend({"text": t} for t in pretrain_docs(work))
        out[f"sft_{split}"].extend(sft_records(work))
        if split in pref_pool:
            pref_pool[split].extend(pref_candidates(work))
    for split in PREF_SPLITS:
        out[f"prefs_prompts_{split}"] = _select_prefs(pref_pool[split], PREF_COUNTS[split], split)
    return drop_train_overlap(out)


def drop_train_overlap(out: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Remove held-out records whose text also occurs in the train split.

    Splits are by work, but two different works can still yield the same record (e.g. an author
    question about works with placeholder titles), which would leak training data into evaluation.
    """
    def key(rec: dict) -> str:
        return json.dumps(rec.get("conversations", rec.get("text")), ensure_ascii=False, sort_keys=True)

    def prompt_key(rec: dict) -> str:
        return json.dumps(rec["conversations"][:1], ensure_ascii=False, sort_keys=True)

    train_text = {key(r) for r in out["pretrain_train"]}
    train_sft = {key(r) for r in out["sft_train"]}
    train_prompts = {prompt_key(r) for r in out["sft_train"]} | {prompt_key(r) for r in out["prefs_prompts_train"]}
    for name, recs in out.items():
        if name.endswith("_train"):
            continue
        if name.startswith("pretrain_"):
            out[name] = [r for r in recs if key(r) not in train_text]
        elif name.startswith("sft_"):
            out[name] = [r for r in recs if key(r) not in train_sft]
        else:
            out[name] = [r for r in recs if prompt_key(r) not in train_prompts]
    return out


def corpus_hash(path: str | Path = CORPUS_PATH) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _paths(out_dir: Path) -> dict[str, Path]:
    return {name: out_dir / f"{name}.jsonl" for name in FILE_NAMES}


def ensure_embedded(out_dir: str | Path = "data/embedded", force: bool = False,
                    corpus: str | Path = CORPUS_PATH) -> dict[str, Path]:
    """Materialise the embedded datasets under ``out_dir`` (skipped when up to date); returns name -> path.

    Names: ``pretrain_{train,validation,test}``, ``sft_{train,validation,test}``,
    ``prefs_prompts_{train,validation}``.
    """
    out_dir = Path(out_dir)
    paths = _paths(out_dir)
    stamp_path = out_dir / STAMP
    want = {"corpus_sha256": corpus_hash(corpus), "generator_version": GENERATOR_VERSION}
    if not force and stamp_path.exists() and all(p.exists() for p in paths.values()):
        try:
            stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stamp = {}
        if all(stamp.get(k) == v for k, v in want.items()):
            return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    data = derive(read_corpus(corpus))
    counts = {}
    for name, records in data.items():
        tmp = paths[name].with_name(f"{paths[name].name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, paths[name])
        counts[name] = {"records": len(records),
                        "tasks": dict(collections.Counter(r["task"] for r in records if "task" in r))}
    tmp = stamp_path.with_name(f"{STAMP}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({**want, "counts": counts}, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, stamp_path)
    return paths


def counts(out_dir: str | Path = "data/embedded") -> dict:
    stamp = Path(out_dir) / STAMP
    return json.loads(stamp.read_text(encoding="utf-8"))["counts"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Derive the embedded datasets from dataset/corpus/.")
    ap.add_argument("--out", default="data/embedded")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp says up to date")
    args = ap.parse_args(argv)
    paths = ensure_embedded(args.out, force=args.force)
    info = counts(args.out)
    for name, path in paths.items():
        c = info[name]
        tasks = "  ".join(f"{k}={v}" for k, v in sorted(c["tasks"].items()))
        print(f"{path}: {c['records']} records  {tasks}")


if __name__ == "__main__":
    main()
