"""The embedded corpus (dataset/corpus) and its derivation (dataset.embedded): cleaning, deduplication,
splits by work, no leakage between splits, determinism and idempotence."""

from __future__ import annotations

import io
import json
import lzma
import random
import re
import tarfile
from pathlib import Path

import pytest

from dataset import build_corpus as bc
from dataset import embedded as emb

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = ROOT / "dataset" / "corpus"


@pytest.fixture(scope="module")
def works():
    return bc.read_corpus()


def _work_id(rec_id: str) -> str:
    return re.sub(r"^pref-", "", rec_id).rsplit("-", 1)[0]


# ------------------------------------------------------------------------------------- committed corpus
def test_committed_corpus_files_license_and_size():
    assert bc.CORPUS_PATH.exists() and bc.CORPUS_PATH.stat().st_size <= 10_000_000
    lic = (CORPUS_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in lic and "JackeyGao" in lic
    readme = (CORPUS_DIR / "README.md").read_text(encoding="utf-8")
    assert "chinese-poetry" in readme and "python -m dataset.build_corpus" in readme
    stats = json.loads((CORPUS_DIR / "stats.json").read_text(encoding="utf-8"))
    assert stats["source"]["license"] == "MIT"


def test_corpus_records_are_clean_unique_and_split_by_work(works):
    stats = json.loads((CORPUS_DIR / "stats.json").read_text(encoding="utf-8"))
    assert len(works) == stats["works"] > 50_000
    ids = [w["id"] for w in works]
    assert len(set(ids)) == len(ids)
    keys = set()
    for w in works:
        assert w["split"] in ("train", "validation", "test")
        assert w["title"] and w["author"] and w["paragraphs"]
        key = bc.normalise_body(w["paragraphs"])
        assert key not in keys, w["id"]  # exact duplicates collapsed
        keys.add(key)
        assert bc.split_of(key) == w["split"]  # split is a function of the work itself
    splits = {s: sum(w["split"] == s for w in works) for s in ("train", "validation", "test")}
    assert 0.85 < splits["train"] / len(works) < 0.95 and splits["validation"] > 2000 and splits["test"] > 2000
    assert len({w["collection"] for w in works}) >= 10


def test_corpus_text_is_simplified_and_cleaned(works):
    import opencc

    cc = opencc.OpenCC("t2s")
    sample = random.Random(0).sample(works, 400)
    text = "\n".join(p for w in sample for p in [w["title"], *w["paragraphs"]])
    assert cc.convert(text) == text  # already Simplified
    body = "\n".join(p for w in works for p in w["paragraphs"])
    for bad in ",?!;()[]{}（）〖【<>\"":
        assert bad not in body, bad
    assert "，" in body and "。" in body and "「" in body  # full-width Chinese punctuation kept
    assert body.count("□") / len(body) < 0.005


def test_cleaner_examples():
    c = bc.Cleaner()
    assert c.line("闌風長雨（一作「東風細雨」）秋紛紛，") == "阑风长雨秋纷纷，"
    assert c.line("每朝席上宴佳宾，抵多少\"十年窗下无人问\"！（末云住）（正旦唱）。") == "每朝席上宴佳宾，抵多少“十年窗下无人问”！"
    assert c.line("疲{艹/尔}竟何人，") == "疲□竟何人，"
    assert c.line("忽如亂刀劒，[攪]妾心腸間") == "忽如乱刀剑，搅妾心肠间"  # variant 劒 -> 剑
    assert c.line("何不改乎此度?") == "何不改乎此度？"
    assert c.lines(["（〖1〗这首诗虽不见《全唐诗》", "秦川雄帝宅，函谷壯皇居。", "（）"]) == ["秦川雄帝宅，函谷壮皇居。"]
    assert c.note("1.小山--写女子的隔夜残妆。") == "小山：写女子的隔夜残妆。"


def test_build_from_a_tiny_tarball_converts_dedups_and_splits(tmp_path):
    poems = [
        {"title": "靜夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"], "id": "a"},
        # the same poem again with an editorial note: collapses into the first
        {"title": "夜思", "author": "李白", "paragraphs": ["床前明月光（一作看月光），疑是地上霜。", "舉頭望明月，低頭思故鄉。"], "id": "b"},
        {"title": "殘", "author": "佚名", "paragraphs": ["□□□□，□□□□。", "□□□□，明月。"], "id": "c"},  # unknown chars
        {"title": "空", "author": "佚名", "paragraphs": ["（注）"], "id": "d"},
    ]
    ci = [{"author": "蘇軾", "rhythmic": "水調歌頭", "paragraphs": ["明月幾時有，把酒問青天。"]}]
    files = {"package/dist/quantangshi/poet.tang.0.json": poems, "package/dist/songci/ci.song.0.json": ci,
             "package/package.json": {"name": "chinese-poetry", "version": "0.0.0", "license": "MIT"}}
    tarball = tmp_path / "cp.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, obj in {**files, "package/LICENSE": "MIT License test"}.items():
            data = (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "corpus"
    out.mkdir()
    stats = bc.build(tarball, out_dir=out)
    got = bc.read_corpus(out / bc.CORPUS_PATH.name)
    assert stats["works"] == 2 == len(got)
    tang, song = got
    assert tang["title"] == "静夜思" and tang["paragraphs"] == ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]
    assert song["collection"] == "songci" and song["author"] == "苏轼" and song["rhythmic"] == "水调歌头"
    assert all(w["split"] == bc.split_of(bc.normalise_body(w["paragraphs"])) for w in got)
    assert (out / "LICENSE").read_text() == "MIT License test"
    # deterministic bytes
    first = (out / bc.CORPUS_PATH.name).read_bytes()
    bc.build(tarball, out_dir=out)
    assert (out / bc.CORPUS_PATH.name).read_bytes() == first


# ------------------------------------------------------------------------------------- derivation
def test_detect_form_and_clauses():
    w = {"collection": "tang", "title": "静夜思", "author": "李白", "dynasty": "唐",
         "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]}
    assert emb.detect_form(dict(w)) == "五言绝句"
    assert emb.detect_form(dict(w, paragraphs=w["paragraphs"] * 2)) == "五言律诗"
    assert emb.detect_form(dict(w, paragraphs=["床前明月光，疑是地上霜。"])) is None
    assert emb.clauses(dict(w))[1] == "疑是地上霜。"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, works):
    """A stratified sample of the real corpus (all splits and collections) for fast derivation tests."""
    rng = random.Random(1)
    by_col: dict[str, list] = {}
    for w in works:
        by_col.setdefault(w["collection"], []).append(w)
    sample = []
    for _col, ws in sorted(by_col.items()):
        sample.extend(rng.sample(ws, min(len(ws), 150)))
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl.xz"
    path.write_bytes(lzma.compress("".join(json.dumps(w, ensure_ascii=False) + "\n" for w in sample).encode()))
    return path, {w["id"]: w for w in sample}


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_ensure_embedded_writes_the_contract_files_idempotently(tmp_path, small_corpus):
    corpus, by_id = small_corpus
    out = tmp_path / "emb"
    paths = emb.ensure_embedded(out, corpus=corpus)
    assert sorted(paths) == sorted([f"pretrain_{s}" for s in ("train", "validation", "test")]
                                   + [f"sft_{s}" for s in ("train", "validation", "test")]
                                   + ["prefs_prompts_train", "prefs_prompts_validation"])
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(f"{n}.jsonl" for n in paths)
    mtimes = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    assert emb.ensure_embedded(out, corpus=corpus) == paths
    assert {n: p.stat().st_mtime_ns for n, p in paths.items()} == mtimes  # skipped: up to date
    # a changed corpus (stamp mismatch) or a missing file triggers a rebuild; same bytes (deterministic)
    before = {n: p.read_bytes() for n, p in paths.items()}
    paths["sft_test"].unlink()
    emb.ensure_embedded(out, corpus=corpus)
    assert {n: p.read_bytes() for n, p in paths.items()} == before
    other = emb.ensure_embedded(tmp_path / "again", corpus=corpus)
    assert all(other[n].read_bytes() == before[n] for n in paths)


def test_derived_records_follow_the_contract_and_never_leak(tmp_path, small_corpus):
    corpus, by_id = small_corpus
    paths = emb.ensure_embedded(tmp_path / "emb", corpus=corpus)
    seen_tasks = set()
    for split in ("train", "validation", "test"):
        for rec in _read(paths[f"sft_{split}"]):
            assert set(rec) <= {"id", "task", "conversations", "answer"}
            conv = rec["conversations"]
            assert [m["role"] for m in conv] == ["user", "assistant"] and all(m["content"] for m in conv)
            assert by_id[_work_id(rec["id"])]["split"] == split  # SFT record from a work of this split
            if "answer" in rec:
                assert emb.strip_punct(rec["answer"]) in emb.strip_punct(conv[-1]["content"])
            if rec["task"] == "continue_line":
                bare = [emb.strip_punct(c) for c in emb.clauses(dict(by_id[_work_id(rec["id"])]))]
                prompt = emb.strip_punct(conv[0]["content"])
                assert any(bare[j] == rec["answer"] and bare[j - 1] in prompt for j in range(1, len(bare)))
            seen_tasks.add(rec["task"])
        for rec in _read(paths[f"pretrain_{split}"]):
            assert set(rec) == {"text"} and rec["text"].strip()
    assert {"write_poem", "author", "continue_line", "explain", "title", "form", "cipai"} <= seen_tasks
    for split in ("train", "validation"):
        prefs = _read(paths[f"prefs_prompts_{split}"])
        assert prefs and len({r["id"] for r in prefs}) == len(prefs)
        for rec in prefs:
            assert [m["role"] for m in rec["conversations"]] == ["user"] and rec["reference"].strip()
            assert by_id[_work_id(rec["id"])]["split"] == split
    # no pretraining text of a held-out work appears in train
    train_texts = {r["text"] for r in _read(paths["pretrain_train"])}
    for split in ("validation", "test"):
        assert not train_texts & {r["text"] for r in _read(paths[f"pretrain_{split}"])}


@pytest.mark.slow
def test_default_embedded_data_sizes():
    """The real derivation (cached in data/embedded): >= 20k SFT training conversations, >= 4 task kinds."""
    paths = emb.ensure_embedded()
    counts = emb.counts(paths["sft_train"].parent)
    assert counts["sft_train"]["records"] >= 20_000
    assert len(counts["sft_train"]["tasks"]) >= 4
    assert counts["prefs_prompts_train"]["records"] >= 2000 and counts["prefs_prompts_validation"]["records"] >= 200
    assert counts["pretrain_train"]["records"] > 50_000
