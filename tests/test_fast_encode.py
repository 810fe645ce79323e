"""tokenizer.fast_encode: tiktoken gives exactly the Hugging Face ids, or hands the text back.

Checked on the whole embedded corpus with both real tokenizers, on every Unicode code point, on
added tokens inside text, and by fuzzing a hand-made BPE whose merges make tiktoken and Hugging Face
disagree (the guard must catch every disagreement; without it they would differ).
"""

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dataset.build_bin import build_bin
from tokenizer import DEFAULT_TOKENIZER_DIR, ORIGINAL_TOKENIZER_FIXTURE, load_tokenizer
from tokenizer.fast_encode import bytes_to_unicode, fast_encoder

FIXTURE = ORIGINAL_TOKENIZER_FIXTURE


def hf_ids(tok, texts):
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def as_lists(arrays):
    return [list(map(int, a)) for a in arrays]


@pytest.fixture(scope="module")
def corpus_texts():
    from dataset.embedded import ensure_embedded

    paths = ensure_embedded()
    texts = []
    for split in ("pretrain_train", "pretrain_validation", "pretrain_test"):
        with open(paths[split], encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    with open(paths["sft_validation"], encoding="utf-8") as f:
        texts += [m["content"] for line in f for m in json.loads(line)["conversations"]]
    return texts


@pytest.mark.parametrize("tok_dir", [DEFAULT_TOKENIZER_DIR, FIXTURE], ids=["mateconv", "original"])
def test_same_ids_as_hugging_face_on_the_embedded_corpus(tok_dir, corpus_texts):
    """Ours on all of it (what stage 3 encodes by default); the original tokenizer on a third."""
    tok = load_tokenizer(tok_dir)
    enc, how = fast_encoder(tok)
    assert enc is not None, how
    if tok_dir == FIXTURE:
        corpus_texts = corpus_texts[::3]
    else:
        assert len(corpus_texts) > 90_000
    backend = enc.backend
    want = [e.ids for e in backend.encode_batch_fast(corpus_texts, add_special_tokens=False)]
    got = enc.encode(corpus_texts)
    assert as_lists(got) == want
    packed = enc.encode_packed(corpus_texts[:5000], [tok.bos_token_id], [tok.eos_token_id])
    assert packed.tolist() == [i for w in want[:5000] for i in [tok.bos_token_id, *w, tok.eos_token_id]]
    # a sample through the transformers tokenizer users call, not only its Rust backend
    assert as_lists(enc.encode(corpus_texts[::500])) == hf_ids(tok, corpus_texts[::500])


def test_every_unicode_code_point_splits_the_same_way():
    """The split pattern's classes (letter, number, space, other) come from two regex engines."""
    tok = load_tokenizer()
    enc, _ = fast_encoder(tok)
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    # "a{c}1" cuts differently for a letter, a digit or anything else; " {c}" tells space from the rest
    docs = ["".join(f"a{chr(c)}1 {chr(c)}" for c in cps[k:k + 512]) for k in range(0, len(cps), 512)]
    want = [e.ids for e in enc.backend.encode_batch_fast(docs, add_special_tokens=False)]
    assert as_lists(enc.encode(docs)) == want


def test_added_tokens_inside_text_are_cut_out_as_hugging_face_does():
    tok = load_tokenizer()
    enc, _ = fast_encoder(tok)
    texts = ["<s>床前明月光</s>", "a</s>b", "</s></s><s>", "<s", "</s", "<pad>x<unk>", "前<s>后 <s> </s>\n",
             "<<s>>", "</s>s>", "", " ", "<s><s>user\n你好</s>\n<s>assistant\n"]
    assert as_lists(enc.encode(texts)) == hf_ids(tok, texts)


def tricky_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose merges make tiktoken's algorithm differ from Hugging Face's.

    - ``abc`` = ``ab``+``c``, but ``bc`` merges before ``ab``: Hugging Face never builds ``abc`` from
      "abc" (it stops at ``a``, ``bc``), tiktoken does (whole-piece shortcut, or ``a``+``bc``).
    - ``xyz`` is made by two merges (``xy``+``z`` and ``x``+``yz``).
    - ``efg`` = ``ef``+``g`` also splits as ``e``+``fg``, but ``ef`` comes first: harmless.
    - the three bytes of 鸣 merge as (e9 b8) + a3 while (b8 a3) is a later token: harmless.
    """
    chars = bytes_to_unicode()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[chars[b]] = len(vocab)
    ming = "".join(chars[b] for b in "鸣".encode())
    merges = [("b", "c"), ("a", "b"), ("ab", "c"), ("x", "y"), ("y", "z"), ("xy", "z"), ("x", "yz"),
              ("e", "f"), ("f", "g"), ("ef", "g"), (ming[0], ming[1]), (ming[1], ming[2]), (ming[:2], ming[2]),
              ("abc", "d"), ("d", "d"), ("Ġ", "a")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok


def test_fuzz_a_bpe_where_tiktoken_alone_would_be_wrong():
    tok = tricky_tokenizer()
    enc, how = fast_encoder(tok)
    assert enc is not None, how
    raw = lambda s: [int(enc.rank_to_id[r]) for r in enc.encoding.encode_to_numpy(s)]  # noqa: E731
    # the guard is load-bearing: unguarded tiktoken differs from Hugging Face here
    assert raw("abc") != hf_ids(tok, ["abc"])[0]
    assert raw("abcd") != hf_ids(tok, ["abcd"])[0]
    suspects = {enc.encoding.decode_single_token_bytes(r) for r in np.flatnonzero(enc.suspect)}
    assert {b"abc", b"abcd", b"xyz"} <= suspects
    assert not {b"efg", "鸣".encode(), b"ab", b"bc"} & suspects
    rng = random.Random(0)
    alphabet = list("abcdefgxyz '\n1!") + ["鸣", "，", "<s>", "</s>", "  ", "ab", "bc", "efg"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(4000)]
    texts += ["abc", "abcd", "xyz", "efg", "鸣", "鸣鸣", "aabcc", " abc", "<s>abc</s>"]
    assert as_lists(enc.encode(texts)) == hf_ids(tok, texts)
    assert enc.fallback_docs > 0
    assert enc.encode_packed(["abc"], [1], [2]) is None  # packed refuses, encode() re-encodes
    assert enc.encode_packed(["efg 鸣"], [1], [2]).tolist() == [1, *hf_ids(tok, ["efg 鸣"])[0], 2]


def test_other_tokenizers_are_left_to_hugging_face(tmp_path):
    tok = load_tokenizer()
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.NFKC()
    normalized = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    enc, why = fast_encoder(normalized)
    assert enc is None and "normalizer" in why
    plain = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    enc, why = fast_encoder(PreTrainedTokenizerFast(tokenizer_object=plain))
    assert enc is None and "pre-tokenizer" in why
    # stage 3 with such a tokenizer still writes the per-line ids (Hugging Face batch path)
    texts = ["ｆｕｌｌ－ｗｉｄｔｈ　ＡＢＣ１２３，全角。", "床前明月光"]
    src = tmp_path / "pt.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    logs = []
    build_bin(src, tmp_path / "n.bin", normalized, progress=False, log=logs.append)
    assert any("Hugging Face batch encoding (it has a normalizer)" in line for line in logs)
    data = np.fromfile(tmp_path / "n.bin", dtype=np.uint16).tolist()
    assert data == [i for t in texts for i in [1, *normalized.encode(t, add_special_tokens=False), 2]]


def test_stage3_fast_path_bytes_equal_the_per_line_loop(tmp_path):
    """Odd lines through build_bin: CRLF, blank lines, special-token text, emoji, no final newline."""
    tok = load_tokenizer()
    texts = ["床前明月光\r\n疑是地上霜", "<s>不是开头</s>", "🙂👍🏽 emoji", "tab\tand  spaces  ", "x" * 5000, "鸣"]
    body = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts[:3]) + "\r\n\n   \n"
    body += "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts[3:])
    src = tmp_path / "odd.jsonl"
    src.write_bytes(body.encode("utf-8"))
    logs = []
    meta = build_bin(src, tmp_path / "odd.bin", DEFAULT_TOKENIZER_DIR, workers=2, batch_size=2, progress=False,
                     log=logs.append)
    assert any("stage 3 encoder: tiktoken" in line for line in logs)
    data = np.fromfile(tmp_path / "odd.bin", dtype=np.uint16).tolist()
    assert data == [i for t in texts for i in [tok.bos_token_id, *tok.encode(t, add_special_tokens=False),
                                                tok.eos_token_id]]
    assert meta["num_documents"] == len(texts)


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_trained_bpes_with_shuffled_merges(seed):
    """Train a byte-level BPE on random text, then shuffle its merges so many tokens become reachable
    only by pairs Hugging Face does not list: unguarded tiktoken then differs often; ours never does."""
    from tokenizers import trainers

    rng = random.Random(seed)
    alphabet = ["ab", "abc", "abcd", "ab ", "aab鸣", "a'b s"][seed]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.train_from_iterator(
        ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, 60))) for _ in range(2000)],
        trainers.BpeTrainer(vocab_size=256 + rng.randint(50, 300), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            special_tokens=["<s>", "</s>"], show_progress=False))
    spec = json.loads(backend.to_str())
    merges = spec["model"]["merges"]
    for i in range(1, len(merges)):
        j = max(0, i - rng.randint(1, 20))
        merges[i], merges[j] = merges[j], merges[i]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>")
    enc, how = fast_encoder(tok)
    assert enc is not None, how
    texts = ["".join(rng.choice(alphabet + "<s>") for _ in range(rng.randint(0, 80))) for _ in range(1500)]
    want = hf_ids(tok, texts)
    unguarded = sum(1 for t, w in zip(texts, want)
                    if "<s>" not in t and [int(enc.rank_to_id[r]) for r in enc.encoding.encode_to_numpy(t)] != w)
    assert unguarded > 0
    assert as_lists(enc.encode(texts)) == want
    assert enc.fallback_docs > 0
