"""One inference path: the server (real HTTP on 127.0.0.1), the evaluator's generation and the local
preference generator give the same tokens for the same prompt and seed (tiny real MateConv models,
dense and MoE, the real tokenizer; every component loads the checkpoint through ``model.load``)."""

from __future__ import annotations

import httpx
import pytest

from evaluation.evaluate import load_checkpoint
from evaluation.generate_eval import generate_answers, generate_ids
from model import load
from model.generation import Request, decode, generate_requests
from prefs.generators import LocalGenerator, Prompt
from serving.app import create_app
from serving.background import BackgroundServer
from tests.tiny_models import save_tiny_checkpoint
from tokenizer.chat import encode_chat

MSGS = [{"role": "user", "content": "请写一首关于春天的诗。"}]
MAX_NEW = 24


@pytest.fixture(scope="module", params=["mateconv-tiny", "mateconv-moe-tiny"])
def ckpt(request, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)


@pytest.fixture(scope="module")
def served(ckpt):
    with BackgroundServer(create_app(str(ckpt), model_name="tiny")) as srv:
        yield srv


def _ask(url, **body):
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_server_evaluator_and_prefs_agree(ckpt, served):
    model, tok = load(ckpt, device="cpu")
    prompt = encode_chat(tok, MSGS)
    # the evaluator: its loader, its prompt rendering, its greedy generation
    ev_model = load_checkpoint(ckpt)
    rec = generate_answers(ev_model, tok, [{"id": "x", "task": "t", "messages": MSGS, "reference": "r"}],
                           max_new_tokens=MAX_NEW)[0]
    assert rec["n_prompt_tokens"] == len(prompt)
    ev_ids = generate_ids(ev_model, [prompt], tok.eos_token_id, tok.pad_token_id, MAX_NEW)[0]["ids"]
    assert len(ev_ids) == rec["n_new_tokens"] > 3 and len(set(ev_ids)) > 2
    # the server, over HTTP
    body = _ask(served.url, temperature=0, max_tokens=MAX_NEW)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == len(ev_ids)
    text = tok.decode(ev_ids, skip_special_tokens=True).rstrip("\ufffd")  # an unfinished UTF-8 tail is not text
    assert body["choices"][0]["message"]["content"] == text
    # the preference generator (K greedy samples are all the same answer)
    gen = LocalGenerator(str(ckpt), k=2, temperature=0.0, top_p=1.0, max_tokens=MAX_NEW)
    cands = gen.generate([Prompt("p0", MSGS)])[0]
    assert cands.texts == [text] * 2
    # and the loop itself, for the ids
    assert decode(model, [prompt], MAX_NEW, eos_token_ids=[tok.eos_token_id])[0][0] == ev_ids


def test_seeded_sampling_server_and_prefs_agree_alone_or_batched(ckpt, served):
    model, tok = load(ckpt, device="cpu")
    gen = LocalGenerator(str(ckpt), k=3, temperature=0.9, top_p=0.95, max_tokens=MAX_NEW, seed=11)
    cands = gen.generate([Prompt("p0", MSGS)])[0]
    seed = gen.batch_seed(["p0"])
    body = _ask(served.url, temperature=0.9, top_p=0.95, max_tokens=MAX_NEW, n=3, seed=seed)
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts == cands.texts
    assert len(set(texts)) > 1  # really sampled
    # the same request batched with another one draws the same numbers (its own random stream)
    prompt = encode_chat(tok, MSGS)
    other = encode_chat(tok, [{"role": "user", "content": "你好，今天天气如何？能再长一点吗？"}])
    alone = generate_requests(model, tok, [Request([prompt], n=3, max_tokens=MAX_NEW, temperature=0.9, top_p=0.95,
                                                   seed=seed)])[0][0]
    both = generate_requests(model, tok, [
        Request([other], n=2, max_tokens=MAX_NEW // 2, temperature=0.7, seed=5),
        Request([prompt], n=3, max_tokens=MAX_NEW, temperature=0.9, top_p=0.95, seed=seed)])[1][0]
    assert [c.token_ids for c in alone] == [c.token_ids for c in both]
    assert [c.text for c in alone] == texts


def test_layering_no_trainer_below_the_stage_scripts_and_no_serving_in_evaluation():
    """Every import statement (module level or inside a function) of the packages below the stage scripts:
    none imports the trainer; evaluation does not import serving."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imports(pkg):
        for f in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    yield from ((f, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    yield f, node.module

    def top(name):
        return name.split(".")[0]

    found = [(f.relative_to(root), m) for pkg in ("tokenizer", "model", "dataset", "evaluation", "prefs", "serving")
             for f, m in imports(pkg) if top(m) == "trainer"]
    found += [(f.relative_to(root), m) for f, m in imports("evaluation") if top(m) in ("serving", "prefs")]
    assert not found, found
    assert any(m == "model.loading" for _, m in imports("evaluation"))  # the check sees lazy imports too
