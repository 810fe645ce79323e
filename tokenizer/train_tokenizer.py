"""Stage 1: train MateConv's byte-level BPE tokenizer (Hugging Face ``tokenizers``).

    python -m tokenizer.train_tokenizer --out DIR [--vocab_size 6400] [--input a.jsonl b.txt] [--max_texts N]

Defaults train on the embedded pretraining train split (``dataset.embedded``), then report characters
per token on the validation split (ours and, when present, the original MateConv tokenizer's), check
exact round trips ``decode(encode(x)) == x`` on held-out texts and print a summary.

The saved directory holds ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template,
no automatic bos/eos) and ``special_tokens_map.json``; ``AutoTokenizer.from_pretrained(DIR)`` loads it
as a ``PreTrainedTokenizerFast`` and ``apply_chat_template`` renders the original MateConv format.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizer import ORIGINAL_TOKENIZER_FIXTURE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
UNK, BOS, EOS, PAD = SPECIAL_TOKENS

# `<s>{role}\n{content}</s>\n` per message (system first when present); the generation prompt is
# `<s>assistant\n`. {% generation %} marks the assistant answer and its `</s>` for
# `return_assistant_tokens_mask=True`; it does not change the rendered text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<s>assistant\\n' }}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 6400
ORIGINAL_TOKENIZER_DIR = ORIGINAL_TOKENIZER_FIXTURE  # the default --compare


def read_texts(paths: Iterable[str | Path], max_texts: int | None = None) -> Iterator[str]:
    """Texts from ``.jsonl`` (field ``text``, or the contents of ``conversations``) or plain-text files
    (one text per non-empty line)."""
    n = 0
    for path in paths:
        path = Path(path)
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if max_texts is not None and n >= max_texts:
                    return
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    rec = json.loads(line)
                    if "text" in rec:
                        text = rec["text"]
                    else:
                        text = "\n".join(m["content"] for m in rec.get("conversations", []))
                else:
                    text = line
                if text:
                    n += 1
                    yield text


def train(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with the special tokens at ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} is not at id {i}"
    return tok


def save(tok, out_dir: str | Path, model_max_length: int = 32768) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with chat template) and special_tokens_map.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, name in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out_dir


def chars_per_token(tokenizer, texts: list[str]) -> float:
    """Characters per token over ``texts`` (no special tokens added)."""
    n_chars = sum(len(t) for t in texts)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(ids) for ids in enc)
    return n_chars / max(1, n_tokens)


def round_trip_failures(tokenizer, texts: list[str]) -> list[str]:
    """Texts for which ``decode(encode(x)) != x`` (should be empty for a byte-level tokenizer)."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t for t, ids in zip(texts, enc)
            if tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) != t]


def evaluate(tokenizer_dir: str | Path, texts: list[str], compare_dirs: Iterable[str | Path] = ()) -> dict:
    """Chars/token and round-trip check of the tokenizer in ``tokenizer_dir`` (and others for comparison)."""
    from . import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    extra = ["标点：，。？！；：「」『』“”《》……——", "mixed 中英 text 123\n\t  spaces", "<s>user\n你好</s>\n"]
    failures = round_trip_failures(tok, texts + extra)
    report = {
        "tokenizer": str(tokenizer_dir),
        "vocab_size": len(tok),
        "eval_texts": len(texts),
        "eval_chars": sum(map(len, texts)),
        "chars_per_token": round(chars_per_token(tok, texts), 4),
        "round_trip_ok": not failures,
        "round_trip_failures": len(failures),
        "compare": {},
    }
    for other in compare_dirs:
        other = Path(other)
        if other.is_dir():
            otok = load_tokenizer(other)
            report["compare"][str(other)] = {
                "vocab_size": len(otok),
                "chars_per_token": round(chars_per_token(otok, texts), 4),
                "round_trip_failures": len(round_trip_failures(otok, texts)),
            }
    return report


def default_inputs() -> tuple[list[Path], list[Path]]:
    """(train files, held-out files) from the embedded data."""
    from dataset.embedded import ensure_embedded

    paths = ensure_embedded()
    return [paths["pretrain_train"]], [paths["pretrain_validation"]]


def run(out: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, inputs: list[str | Path] | None = None,
        eval_inputs: list[str | Path] | None = None, max_texts: int | None = None,
        max_eval_texts: int | None = 2000, min_frequency: int = 2,
        compare_dirs: Iterable[str | Path] | None = None) -> dict:
    """Train, save to ``out`` and evaluate; returns the report (also written to ``out/training_report.json``)."""
    if inputs is None or eval_inputs is None:
        default_train, default_eval = default_inputs()
        inputs = inputs or default_train
        eval_inputs = eval_inputs or default_eval
    t0 = time.time()
    texts = list(read_texts(inputs, max_texts))
    tok = train(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    train_s = time.time() - t0
    save(tok, out)
    held_out = list(read_texts(eval_inputs, max_eval_texts))
    if compare_dirs is None:
        compare_dirs = [ORIGINAL_TOKENIZER_DIR]
    report = evaluate(out, held_out, compare_dirs)
    report.update(train_texts=len(texts), train_chars=sum(map(len, texts)), train_seconds=round(train_s, 2),
                  inputs=[str(p) for p in inputs], eval_inputs=[str(p) for p in eval_inputs])
    (Path(out) / "training_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n",
                                                    encoding="utf-8")
    return report


def format_report(report: dict) -> str:
    lines = [
        f"tokenizer        {report['tokenizer']}  (vocab {report['vocab_size']})",
        f"trained on       {report.get('train_texts', '?')} texts, {report.get('train_chars', '?')} chars "
        f"in {report.get('train_seconds', '?')} s",
        f"held-out         {report['eval_texts']} texts, {report['eval_chars']} chars",
        f"chars/token      {report['chars_per_token']:.3f}",
        "round trip       " + ("exact on all texts" if report["round_trip_ok"]
                                  else f"FAILED on {report['round_trip_failures']} texts"),
    ]
    for name, c in report["compare"].items():
        lines.append(f"compare          {name}: vocab {c['vocab_size']}, chars/token {c['chars_per_token']:.3f}, "
                     f"round-trip failures {c['round_trip_failures']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Train MateConv's byte-level BPE tokenizer.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--input", nargs="+", default=None,
                    help=".jsonl ({'text'} or {'conversations'}) or .txt files (default: embedded pretrain_train)")
    ap.add_argument("--eval_input", nargs="+", default=None,
                    help="held-out files for chars/token and round trips (default: embedded pretrain_validation)")
    ap.add_argument("--max_texts", type=int, default=None, help="use at most N training texts")
    ap.add_argument("--max_eval_texts", type=int, default=2000)
    ap.add_argument("--min_frequency", type=int, default=2)
    ap.add_argument("--compare", nargs="*", default=None,
                    help="other tokenizer dirs to compare chars/token with (default: the original MateConv one)")
    args = ap.parse_args(argv)
    report = run(args.out, args.vocab_size, args.input, args.eval_input, args.max_texts, args.max_eval_texts,
                 args.min_frequency, args.compare)
    print(format_report(report))
    if not report["round_trip_ok"]:
        raise SystemExit("round trip failed")
    return report


if __name__ == "__main__":
    main()
