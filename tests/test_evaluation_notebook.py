"""6.inference&evaluate.ipynb executes top to bottom (nbclient, real kernel) on a micro demo model and
small held-out files, and its outputs show held-out metrics and generation samples."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "6.inference&evaluate.ipynb"

POEMS = {
    "train": [("静夜思", "李白", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
              ("春晓", "孟浩然", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"),
              ("登鹳雀楼", "王之涣", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")],
    "validation": [("相思", "王维", "红豆生南国，春来发几枝。愿君多采撷，此物最相思。"),
                   ("江雪", "柳宗元", "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。")],
}


def _data(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, poems in POEMS.items():
        with open(d / f"pretrain_{split}.jsonl", "w", encoding="utf-8") as f:
            for t, a, b in poems:
                f.write(json.dumps({"text": f"《{t}》{a}：{b}"}, ensure_ascii=False) + "\n")
        with open(d / f"sft_{split}.jsonl", "w", encoding="utf-8") as f:
            for t, a, b in poems:
                f.write(json.dumps({"id": f"{t}-author", "task": "author", "answer": a, "conversations": [
                    {"role": "user", "content": f"《{t}》的作者是谁？"},
                    {"role": "assistant", "content": f"这首诗的作者是{a}。"}]}, ensure_ascii=False) + "\n")
                f.write(json.dumps({"id": f"{t}-recite", "task": "recite", "conversations": [
                    {"role": "user", "content": f"请背诵《{t}》。"}, {"role": "assistant", "content": b}]},
                    ensure_ascii=False) + "\n")
    return d


def _set_parameters(nb, **params):
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source += "\n# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())


@pytest.mark.slow
def test_notebook_executes_on_heldout_data(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _set_parameters(nb, DATA_DIR=str(_data(tmp_path / "data")), MAX_EXAMPLES=4,
                    MAX_ITEMS=4, MAX_NEW_TOKENS=8, N_SAMPLES=2, DEMO_STEPS=5, MC_ITEMS=8, VERSE_EXAMPLES=2)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert "tokenizer/mateconv" in text.split("\n")[0] or "mateconv" in text  # the shipped default tokenizer
    assert "stopped_on_eos=" in text and "prediction:" in text
    assert "pretrain loss" in text and "sft      loss" in text and "rouge_l_char" in text
    assert "sft_validation.jsonl" in text and "sft_train" not in text.split("demo model:")[1]
    assert "task author" in text and "dense model: no routing statistics" in text
    assert "bits/char" in text and "multiple choice next_line" in text and "chance 0.25" in text
    assert "template alone" in text and "[evaluate] multiple choice" in text
