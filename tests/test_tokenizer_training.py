"""Stage 1: tokenizer training (tokenizer/train_tokenizer.py), the shipped default tokenizer
(tokenizer/mateconv/) and the notebook 1.Tokenizer_Training.ipynb (executed with nbclient)."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dataset.build_corpus import CORPUS_PATH
from tokenizer import DEFAULT_TOKENIZER_DIR, ORIGINAL_TOKENIZER_FIXTURE, load_tokenizer, tokenizer_fingerprint
from tokenizer import train_tokenizer as tt

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ORIGINAL_TOKENIZER_FIXTURE
NOTEBOOK = ROOT / "1.Tokenizer_Training.ipynb"

MESSAGES = [
    {"role": "user", "content": "请接出下一句：床前明月光"},
    {"role": "assistant", "content": "疑是地上霜。"},
    {"role": "user", "content": "《静夜思》的作者是谁？"},
    {"role": "assistant", "content": "这首诗的作者是唐代的李白。"},
]
ODD_TEXTS = ["标点：，。？！；：「」『』“”《》……——", "mixed 中英 text 123\n\t  two  spaces ", "𠀀𪚥 rare chars □",
             "<s>user\n你好</s>\n", "emoji 🙂 and é", ""]


def _corpus_texts(split: str, n: int) -> list[str]:
    """The first n works of a split, as title + byline + body (read lazily from the corpus)."""
    out = []
    with lzma.open(CORPUS_PATH, "rt", encoding="utf-8") as fh:
        for line in fh:
            w = json.loads(line)
            if w["split"] == split:
                out.append("\n".join([w["title"], f"{w['dynasty']}·{w['author']}", *w["paragraphs"]]))
                if len(out) >= n:
                    break
    return out


@pytest.fixture(scope="module")
def held_out():
    return _corpus_texts("validation", 300)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    texts = _corpus_texts("train", 1500)
    tok = tt.train(texts, vocab_size=600)
    out = tt.save(tok, tmp_path_factory.mktemp("tok"))
    return out


# ------------------------------------------------------------------------------------- training
def test_trained_tokenizer_has_specials_and_loads_with_autotokenizer(small_tokenizer):
    tok = AutoTokenizer.from_pretrained(str(small_tokenizer))
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 600
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = tok("床前明月光")["input_ids"]
    assert ids and 1 not in ids and 2 not in ids  # no automatic bos / eos
    assert tok("<s>x</s>", add_special_tokens=False)["input_ids"][0] == 1  # specials are atomic in text
    cfg = json.loads((small_tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == tt.CHAT_TEMPLATE and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_round_trip_and_chars_per_token(small_tokenizer, held_out):
    tok = load_tokenizer(small_tokenizer)
    assert tt.round_trip_failures(tok, held_out + ODD_TEXTS) == []
    cpt = tt.chars_per_token(tok, held_out)
    assert 0.5 < cpt < 1.2  # tiny vocab: below one character per token on Chinese is expected
    report = tt.evaluate(small_tokenizer, held_out, [FIXTURE])
    assert report["round_trip_ok"] and report["chars_per_token"] == round(cpt, 4)
    assert report["compare"][str(FIXTURE)]["vocab_size"] == 6400


def test_cli_trains_on_given_files_and_writes_a_report(tmp_path, capsys):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                  for t in _corpus_texts("train", 400)), encoding="utf-8")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(t.replace("\n", " ") for t in _corpus_texts("validation", 50)), encoding="utf-8")
    report = tt.main(["--out", str(tmp_path / "tok"), "--vocab_size", "400", "--input", str(train_file),
                      "--eval_input", str(eval_file), "--max_texts", "300", "--compare"])
    out = capsys.readouterr().out
    assert "chars/token" in out and "round trip       exact" in out
    assert report["train_texts"] == 300 and report["eval_texts"] == 50 and report["compare"] == {}
    assert json.loads((tmp_path / "tok" / "training_report.json").read_text())["vocab_size"] == 400


# ------------------------------------------------------------------------------------- shipped tokenizer
@pytest.fixture(scope="module")
def shipped():
    return load_tokenizer(None)


def test_shipped_tokenizer_files_and_specials(shipped):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (DEFAULT_TOKENIZER_DIR / name).is_file(), name
    assert isinstance(shipped, PreTrainedTokenizerFast) and len(shipped) == 6400
    assert (shipped.unk_token, shipped.bos_token, shipped.eos_token, shipped.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (shipped.unk_token_id, shipped.bos_token_id, shipped.eos_token_id, shipped.pad_token_id) == (0, 1, 2, 3)
    assert 1 not in shipped("春眠不觉晓")["input_ids"] and 2 not in shipped("春眠不觉晓")["input_ids"]
    assert tokenizer_fingerprint(shipped) == tokenizer_fingerprint(load_tokenizer(DEFAULT_TOKENIZER_DIR))


def test_shipped_chat_template_is_the_original_format(shipped):
    q, a = MESSAGES[0]["content"], MESSAGES[1]["content"]
    render = lambda msgs, **kw: shipped.apply_chat_template(msgs, tokenize=False, **kw)
    assert render(MESSAGES[:2]) == f"<s>user\n{q}</s>\n<s>assistant\n{a}</s>\n"
    assert render(MESSAGES[:1], add_generation_prompt=True) == f"<s>user\n{q}</s>\n<s>assistant\n"
    system = [{"role": "system", "content": "你是诗人。"}]
    assert render(system + MESSAGES[:2]) == f"<s>system\n你是诗人。</s>\n<s>user\n{q}</s>\n<s>assistant\n{a}</s>\n"
    # identical to the original MateConv tokenizer's rendering of user/assistant turns
    original = load_tokenizer(FIXTURE)
    assert render(MESSAGES) == original.apply_chat_template(MESSAGES, tokenize=False)
    assert render(MESSAGES[:3], add_generation_prompt=True) == original.apply_chat_template(MESSAGES[:3], tokenize=False)
    # token ids: <s> and </s> are single special tokens; the assistant mask covers answer + </s>
    enc = shipped.apply_chat_template(MESSAGES[:2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 2
    assert shipped.decode([i for i, m in zip(ids, mask) if m]) == a + "</s>"


def test_shipped_round_trips_and_compression(shipped, held_out):
    assert tt.round_trip_failures(shipped, held_out + ODD_TEXTS) == []
    ours = tt.chars_per_token(shipped, held_out)
    original = tt.chars_per_token(load_tokenizer(FIXTURE), held_out)
    assert ours > 1.0 and ours > 1.2 * original  # trained on this domain: fewer tokens than the general one
    report = json.loads((DEFAULT_TOKENIZER_DIR / "training_report.json").read_text(encoding="utf-8"))
    assert report["round_trip_ok"] and report["vocab_size"] == 6400


def test_load_tokenizer_accepts_the_original_fixture():
    tok = load_tokenizer(FIXTURE)
    assert tok.eos_token_id == 2 and tt.round_trip_failures(tok, ["床前明月光，疑是地上霜。"]) == []


# ------------------------------------------------------------------------------------- notebook
@pytest.mark.slow
def test_notebook_executes_with_small_parameters(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    out_dir = tmp_path / "nb_tok"
    cell.source += f"\n# injected by the test\nVOCAB_SIZE = 500\nMAX_TEXTS = 1500\nMAX_EVAL_TEXTS = 200\nOUT_DIR = {str(out_dir)!r}\n"
    shipped_before = (DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_bytes()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "chars/token" in text and "round trip       exact on all texts" in text
    assert "<s>system\\n" in text and "notebook_tokenizer" in text
    assert (out_dir / "tokenizer.json").is_file() and len(load_tokenizer(out_dir)) == 500
    assert (DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_bytes() == shipped_before
