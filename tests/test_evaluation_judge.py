"""The optional LLM judge over real HTTP: the real ``openai`` client against a small local
OpenAI-compatible server whose "model" is a deterministic reference-based judge (the answer with the
higher character ROUGE-L against the reference wins; equal -> tie). Checks order randomisation,
verdict parsing, tie handling and counting of unusable replies."""

from __future__ import annotations

import re

import fastapi  # noqa: E402
import pytest
from launchers import free_port  # noqa: E402

from evaluation.judge import judge_win_rate, parse_verdict  # noqa: E402
from evaluation.metrics import rouge_l  # noqa: E402


def _section(text: str, name: str) -> str:
    m = re.search(rf"{name}：\n(.*?)(?:\n\n|$)", text, re.S)
    return m.group(1) if m else ""


def _app():
    app = fastapi.FastAPI()
    calls = []

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        msg = body["messages"][-1]["content"]
        calls.append(msg)
        ref, first, second = (_section(msg, n) for n in ("参考答案", "回答1", "回答2"))
        if "无法评判" in msg:
            verdict = "我不确定"
        else:
            s1, s2 = rouge_l(first, ref, "char"), rouge_l(second, ref, "char")
            verdict = "tie" if s1 == s2 else ("1" if s1 > s2 else "2")
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": verdict}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app, calls


@pytest.fixture(scope="module")
def server():
    from serving.background import BackgroundServer

    app, calls = _app()
    with BackgroundServer(app, log_level="error") as srv:
        yield srv.url + "/v1", calls


def _recs(preds, refs, prompts=None):
    prompts = prompts or [f"问题{i}" for i in range(len(preds))]
    return [{"id": str(i), "prompt": q, "reference": r, "prediction": p} for i, (p, r, q) in enumerate(zip(preds, refs, prompts))]


def test_parse_verdict():
    assert parse_verdict("1") == "1" and parse_verdict(" 回答2更好 ") == "2"
    assert parse_verdict("Tie") == "tie" and parse_verdict("两者相当") == "tie" and parse_verdict("不知道") is None


def test_judge_win_rate_over_http(server):
    url, calls = server
    refs = ["床前明月光", "春眠不觉晓", "白日依山尽", "红豆生南国", "千山鸟飞绝", "锄禾日当午"]
    good = list(refs)
    bad = ["不知道"] * 6
    n0 = len(calls)
    r = judge_win_rate(_recs(good, refs), _recs(bad, refs), url, "ref-judge", api_key="local", seed=0, n_resamples=200)
    assert r["n_judged"] == 6 and r["n_failed"] == 0 and r["win_rate"] == 1.0
    assert len(calls) - n0 == 6
    orders = {v["a_first"] for v in r["verdicts"]}
    assert orders == {True, False}  # both positions used, and each parsed back to A's win
    # B better on two, tie on two (identical answers), A better on two -> 0.5
    a = [refs[0], refs[1], "x", "y", refs[4], refs[5]]
    b = ["x", "y", refs[2], refs[3], refs[4], refs[5]]
    r = judge_win_rate(_recs(a, refs), _recs(b, refs), url, "ref-judge", api_key="local", seed=1, n_resamples=200)
    assert r["win_rate"] == pytest.approx(0.5) and r["ci_low"] <= 0.5 <= r["ci_high"]
    assert sorted(v["score_a"] for v in r["verdicts"]) == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    # an unusable reply is counted, not scored
    prompts = ["无法评判", "问题"]
    r = judge_win_rate(_recs(good[:2], refs[:2], prompts), _recs(bad[:2], refs[:2], prompts), url, "ref-judge",
                       api_key="local", n_resamples=100)
    assert r["n_failed"] == 1 and r["n_judged"] == 1


def test_judge_unreachable_endpoint_counts_failures():
    port = free_port()  # nothing listens there
    r = judge_win_rate(_recs(["a"], ["a"]), _recs(["b"], ["a"]), f"http://127.0.0.1:{port}/v1", "m",
                       api_key="x", timeout=2.0, max_retries=0)
    assert r["n_failed"] == 1 and r["n_judged"] == 0 and "win_rate" not in r
