"""``python chat.py``: one answer with ``--prompt`` through a pseudo-terminal, a conversation through a pipe,
and the history kept within the context (tiny real dense and MoE checkpoints, the real tokenizer)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.launchers import ROOT, subprocess_env
from tests.tiny_models import save_tiny_checkpoint

QUESTION = "床前明月光的下一句是什么？"
MAX_NEW = 10


@pytest.fixture(scope="module", params=["mateconv-tiny", "mateconv-moe-tiny"])
def ckpt(request, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=0)


def expected_answer(ckpt, messages, max_new=MAX_NEW) -> str:
    """The greedy answer, computed in-process by the one decoding loop."""
    from model import load
    from model.generation import decode
    from tokenizer.chat import encode_chat

    model, tok = load(ckpt, device="cpu")
    ids, _ = decode(model, [encode_chat(tok, messages)], max_new, eos_token_ids=[tok.eos_token_id])
    return tok.decode(ids[0], skip_special_tokens=True).rstrip("\ufffd")


def _cmd(ckpt, *extra):
    return [sys.executable, "chat.py", "--model", str(ckpt), "--temperature", "0", "--max_new_tokens", str(MAX_NEW),
            "--threads", "1", *extra]


def test_prompt_through_a_pseudo_terminal(ckpt):
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(_cmd(ckpt, "--prompt", QUESTION), cwd=ROOT, env=subprocess_env(), stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, data.decode("utf-8", "replace")
    out = data.decode("utf-8").replace("\r\n", "\n")
    want = expected_answer(ckpt, [{"role": "user", "content": QUESTION}])
    assert len(want) > 3
    assert out.endswith(want + "\n"), (out[-300:], want)


def test_conversation_through_a_pipe(ckpt):
    lines = [QUESTION, "再说一遍", "/reset", QUESTION, "/system 你是一位诗人。", QUESTION, "/exit", "never read"]
    p = subprocess.run(_cmd(ckpt), cwd=ROOT, env=subprocess_env(), input="\n".join(lines) + "\n",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    answers = p.stdout.split("\n")
    assert answers[-1] == "" and len(answers) == 4 + 1  # one line per message; nothing after /exit
    q = {"role": "user", "content": QUESTION}
    first = expected_answer(ckpt, [q])
    assert answers[0] == first
    # the second message sees the first turn as history
    assert answers[1] == expected_answer(ckpt, [q, {"role": "assistant", "content": first},
                                                {"role": "user", "content": "再说一遍"}])
    assert answers[2] == first  # after /reset: the same answer to the same question
    assert answers[3] == expected_answer(ckpt, [{"role": "system", "content": "你是一位诗人。"}, q])
    assert "history cleared" in p.stderr and "system message set" in p.stderr


def test_history_drops_the_oldest_turns_to_fit_the_context():
    import chat
    from tokenizer import load_tokenizer
    from tokenizer.chat import encode_chat

    tok = load_tokenizer(None)
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"第{i}个问题：" + "春眠不觉晓" * 3},
                  {"role": "assistant", "content": f"第{i}个回答：" + "处处闻啼鸟" * 3}]
    turns.append({"role": "user", "content": "最后的问题"})
    full = len(encode_chat(tok, turns))
    msgs, ids, dropped = chat.fit_history(tok, "系统", turns, ctx=full // 2, max_new=8)
    assert dropped > 0 and dropped % 2 == 0 and len(ids) + 8 <= full // 2
    assert msgs[0] == {"role": "system", "content": "系统"} and msgs[1:] == turns[dropped:]
    msgs, ids, dropped = chat.fit_history(tok, None, turns, ctx=full + 8, max_new=8)
    assert dropped == 0 and msgs == turns and ids == encode_chat(tok, turns)
    # a context too small for anything but the last message keeps the last message
    msgs, _, dropped = chat.fit_history(tok, None, turns, ctx=4, max_new=8)
    assert msgs == turns[-1:] and dropped == len(turns) - 1


def test_bad_model_path_is_one_clear_line(tmp_path):
    p = subprocess.run(_cmd(tmp_path / "nowhere", "--prompt", "hi"), cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: model path not found")
    assert "Traceback" not in p.stderr


def test_exported_native_model(tmp_path):
    from model.export import main as export_main

    save_tiny_checkpoint(tmp_path / "ours", "mateconv-tiny", seed=0)
    export_main(["--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "native")])
    p = subprocess.run(_cmd(tmp_path / "native", "--prompt", QUESTION), cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    want = expected_answer(tmp_path / "ours", [{"role": "user", "content": QUESTION}])
    assert len(want) > 3 and p.stdout == want + "\n"
