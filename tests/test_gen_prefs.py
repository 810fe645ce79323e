"""7.gen_prefs_openai.py / prefs: against our own server, a local checkpoint, a fault-injecting endpoint,
and a SIGKILL followed by a rerun. Everything runs on loopback; no network."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from prefs.judges import chrf, lcs_length, parse_ranking, rouge_l_f1
from prefs.runner import main as prefs_main
from serving.app import create_app
from serving.background import BackgroundServer
from tokenizer import ORIGINAL_TOKENIZER_FIXTURE

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_TOKENIZER = ORIGINAL_TOKENIZER_FIXTURE
PAIR_FIELDS = {"id", "prompt", "chosen", "rejected", "q", "history", "pos", "neg", "meta"}

QUESTIONS = ["请写一首关于春天的诗。", "介绍一下李白。", "什么是律诗？", "解释“床前明月光”。", "写一句关于秋天的话。",
             "杜甫是谁？", "推荐一首宋词。", "如何欣赏古诗？", "写一首五言绝句。", "苏轼有哪些名句？",
             "解释平仄。", "什么是词牌？"]


def write_prompts(path: Path, n: int, extra: dict[int, str] | None = None) -> list[str]:
    ids = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = QUESTIONS[i % len(QUESTIONS)] + (extra or {}).get(i, "")
            conv = [{"role": "user", "content": q}]
            if i % 3 == 1:  # some with earlier turns and a system message
                conv = [{"role": "system", "content": "你是诗词助手。"}, {"role": "user", "content": "你好"},
                        {"role": "assistant", "content": "你好！"}] + conv
            rec = {"id": f"p{i:03d}", "task": "qa", "conversations": conv, "reference": "春眠不觉晓，处处闻啼鸟。" + q}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            ids.append(rec["id"])
    return ids


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "torn last line"
    return [json.loads(line) for line in text.splitlines()]  # every line must be valid JSON


def check_pairs(pairs: list[dict]) -> None:
    for p in pairs:
        assert PAIR_FIELDS <= set(p), set(p)
        assert p["pos"] == p["chosen"] and p["neg"] == p["rejected"] and p["chosen"] != p["rejected"]
        assert p["prompt"][-1]["role"] == "user" and p["q"] == p["prompt"][-1]["content"]
        m = p["meta"]
        assert {"prompt_id", "scores", "ranking", "generator", "judge"} <= set(m)
        assert m["scores"][m["chosen_index"]] - m["scores"][m["rejected_index"]] >= 0


# ----------------------------------------------------------------------------------------------
# unit: metrics and verdict parsing


def test_metrics_and_ranking_parser():
    assert lcs_length("床前明月光", "床前看月光") == 4
    assert rouge_l_f1("床前明月光", "床前明月光") == 1.0 and rouge_l_f1("abc", "xyz") == 0.0
    assert chrf("春眠不觉晓", "春眠不觉晓") == pytest.approx(1.0)
    assert chrf("春眠不觉晓处处", "春眠不觉晓") > chrf("夜来风雨声", "春眠不觉晓")
    assert parse_ranking('好的：\n```json\n{"ranking": [2, 1, 4, 3]}\n```', 4) == [2, 1, 4, 3]
    assert parse_ranking("Ranking: 3 > 1 > 2 > 4.", 4) == [3, 1, 2, 4]
    assert parse_ranking("[3, 1, 2]", 4) == [3, 1, 2, 4]
    assert parse_ranking("They are all fine.", 4) is None
    assert parse_ranking('{"ranking": [1, 1, 2, 3]}', 4) is None
    assert parse_ranking('{"ranking": [1, 2, 3, 9]}', 4) is None


def test_settings_env_names_and_flag_precedence():
    from prefs.config import build_parser, resolve

    env = {"GEN_MODEL": "qwen2.5", "JUDGE_MODEL": "j", "N_PROMPTS": "7", "K_SAMPLES": "3", "MAX_WORKERS": "2",
           "RPS": "1.5", "MAX_TRIES": "4", "GEN_TEMPERATURE": "0.9", "OUT_PATH": "x.jsonl",
           "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "secret-never-stored"}
    cfg = resolve(build_parser().parse_args(["--k_samples", "5", "--gen_model", "flag-wins"]), env=env)
    assert (cfg.gen_model, cfg.k_samples, cfg.judge_model, cfg.n_prompts) == ("flag-wins", 5, "j", 7)
    assert (cfg.max_workers, cfg.rps, cfg.max_tries, cfg.gen_temperature) == (2, 1.5, 4, 0.9)
    assert cfg.out_path == "x.jsonl" and cfg.base_url == "http://127.0.0.1:9/v1"
    assert "secret-never-stored" not in json.dumps(cfg.public_dict())
    d = resolve(build_parser().parse_args([]), env={})
    assert (d.gen_model, d.judge_model, d.gen_temperature, d.judge_temperature, d.n_prompts, d.k_samples,
            d.max_tries) == ("gpt-4o", "gpt-4o-mini", 0.7, 0.0, 3000, 4, 8)
    with pytest.raises(ValueError):
        resolve(build_parser().parse_args(["--k_samples", "1"]), env={})


# ----------------------------------------------------------------------------------------------
# our own server as the generator, and the local generator; reference judge


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from model import MateConvConfig, MateConvForCausalLM
    from tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("prefs_ckpt")
    tok_dir = ROOT / "tokenizer" / "mateconv"
    tok = load_tokenizer(tok_dir if (tok_dir / "tokenizer.json").exists() else FIXTURE_TOKENIZER)
    torch.manual_seed(1)
    cfg = MateConvConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    MateConvForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(prompts, out, **kw):
    base = {"prompts": prompts, "out_path": out, "k_samples": 4, "gen_max_tokens": 12, "judge": "reference",
            "min_margin": 0, "progress": "false", "rps": 0, "threads": 1, "max_workers": 3, "timeout": 60}
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def test_own_server_generator_with_reference_judge(tiny_ckpt, tmp_path):
    ids = write_prompts(tmp_path / "prompts.jsonl", 7)
    out = tmp_path / "pairs.jsonl"
    app = create_app(str(tiny_ckpt), api_key="k-123", model_name="tiny")
    env_before = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = "k-123"
    try:
        with BackgroundServer(app) as srv:
            args = _args(tmp_path / "prompts.jsonl", out, base_url=srv.url + "/v1", gen_model="tiny",
                         n_prompts=6, pairs_per_prompt=2)
            assert prefs_main(args) == 0
            s1 = json.loads(Path(str(out) + ".summary.json").read_text())
            assert prefs_main(args) == 0  # rerun: everything already done
            s2 = json.loads(Path(str(out) + ".summary.json").read_text())
    finally:
        if env_before is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = env_before
    assert s1["selected"] == 6 and s1["failed"] == 0 and s1["done"] == 6
    assert s1["generator"] == "tiny" and s1["judge"] == "reference:rougeL"
    assert s1["tokens"]["completion"] > 0
    pairs = read_jsonl(out)
    check_pairs(pairs)
    assert len(pairs) == s1["pairs_written"] > 0
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert {p["meta"]["prompt_id"] for p in pairs} <= set(ids)
    assert s2["skipped_already_done"] == 6 and s2["done"] == 0 and s2["pairs_in_file"] == len(pairs)
    assert "k-123" not in out.read_text() + Path(str(out) + ".summary.json").read_text()


def test_local_generator_batched(tiny_ckpt, tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 12)
    out = tmp_path / "local.jsonl"
    args = _args(tmp_path / "prompts.jsonl", out, generator="local", model_dir=tiny_ckpt, n_prompts=10,
                 local_batch=4, metric="chrf")
    assert prefs_main(args) == 0
    s = json.loads(Path(str(out) + ".summary.json").read_text())
    assert s["done"] == 10 and s["failed"] == 0 and s["generator"].startswith("local:")
    pairs = read_jsonl(out)
    check_pairs(pairs)
    assert len(pairs) == s["pairs_written"] == s["written_prompts"]  # one pair per prompt by default
    assert all(p["meta"]["k"] >= 2 for p in pairs)
    # the DPO stage reads the file as written
    from dataset.datasets import PreferenceDataset
    from tokenizer import load_tokenizer

    ds = PreferenceDataset(str(out), load_tokenizer(tiny_ckpt), 256)
    assert len(ds) == len(pairs) and ds[0]["chosen_input_ids"].numel() > 0


# ----------------------------------------------------------------------------------------------
# a fault-injecting OpenAI-compatible endpoint (http.server in a thread, loopback)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # dropped connections are on purpose
        pass


class FaultServer:
    """Replies like an OpenAI endpoint; by global request count injects 429 + Retry-After, 500, a reply
    slower than the client timeout and a dropped connection; judge calls get malformed verdicts every
    3rd time. Prompts containing ALWAYS_500 / ALWAYS_BAD_JUDGE always fail that way. ``faults=False``:
    only a small delay per request."""

    def __init__(self, faults: bool = True, delay: float = 0.0, slow: float = 1.5):
        self.faults, self.delay, self.slow = faults, delay, slow
        self.count = 0
        self.judge_count = 0
        self.judge_tries: dict[str, int] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                owner.handle(self)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def send(h, status, obj, headers=None):
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client gave up (timeout): nothing to do
            pass

    def handle(self, h):
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))))
        is_judge = body.get("model") == "judge-m"
        text = "\n".join(m["content"] for m in body["messages"])
        with self.lock:
            self.count += 1
            c = self.count
            if is_judge:
                self.judge_count += 1
                key = body["messages"][-1]["content"].split("Candidate answers")[0]
                self.judge_tries[key] = self.judge_tries.get(key, 0) + 1
                first_try = self.judge_tries[key] == 1
            jc = self.judge_count
        if self.delay:
            time.sleep(self.delay)
        if self.faults:
            if c % 16 == 1:
                return self.send(h, 429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                 {"Retry-After": "1"})
            if c % 16 == 4 or "ALWAYS_500" in text:
                return self.send(h, 500, {"error": {"message": "boom", "type": "server_error"}})
            if c % 16 == 7:
                time.sleep(self.slow)
            if c % 16 == 10:
                h.close_connection = True
                h.request.shutdown(socket.SHUT_RDWR)
                return None
        if body.get("model") == "no-n" and (body.get("n") or 1) > 1:
            return self.send(h, 400, {"error": {"message": "'n' is not supported", "type": "invalid_request_error"}})
        if is_judge:
            shown = re.split(r"### Candidate \d+\n", text.split("\n\nRank all")[0])[1:]
            k = len(shown)
            if "ALWAYS_BAD_JUDGE" in text or (self.faults and first_try and jc % 2 == 0):
                content = "I cannot decide, they are all lovely."
            else:  # the longest answer is the best
                order = sorted(range(1, k + 1), key=lambda i: -len(shown[i - 1]))
                content = [f'{{"ranking": {order}}}', " > ".join(map(str, order)),
                           "```json\n" + json.dumps({"ranking": [str(x) for x in order]}) + "\n```"][jc % 3]
            choices = [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
        else:
            q = body["messages"][-1]["content"]
            n = body.get("n") or 1
            marks = range(n) if n > 1 else [c % 5]  # single calls: vary by request count
            choices = [{"index": j, "message": {"role": "assistant", "content": f"答{m}：" + q * (m + 1)},
                        "finish_reason": "stop"} for j, m in enumerate(marks)]
        usage = {"prompt_tokens": 10, "completion_tokens": 5 * len(choices), "total_tokens": 10 + 5 * len(choices)}
        return self.send(h, 200, {"id": f"c{c}", "object": "chat.completion", "created": 0,
                                  "model": body.get("model"), "choices": choices, "usage": usage})


def _outcome(out: Path, ids: list[str], summary: dict):
    pairs = read_jsonl(out)
    check_pairs(pairs)
    assert len({p["id"] for p in pairs}) == len(pairs), "duplicate pair in the output"
    per_prompt: dict[str, list[int]] = {}
    for p in pairs:
        per_prompt.setdefault(p["meta"]["prompt_id"], []).append(p["meta"]["pair_index"])
    assert all(sorted(v) == list(range(len(v))) for v in per_prompt.values()), "a prompt written twice"
    written = list(per_prompt)
    no_pair = {s["id"] for s in read_jsonl(Path(str(out) + ".status.jsonl")) if s["status"] == "no_pair"}
    failed = set(summary["failed_ids"])
    assert not (set(written) & failed) and not (no_pair & failed) and not (set(written) & no_pair)
    assert set(written) | no_pair | failed == set(ids), "a prompt was lost"
    return set(written), failed


def test_fault_injection_every_prompt_written_once_or_failed(tmp_path):
    ids = write_prompts(tmp_path / "prompts.jsonl", 12, extra={3: " ALWAYS_500", 8: " ALWAYS_BAD_JUDGE"})
    out = tmp_path / "pairs.jsonl"
    with FaultServer(faults=True) as fs:
        args = _args(tmp_path / "prompts.jsonl", out, base_url=fs.url, gen_model="gen-m", judge="openai",
                     judge_model="judge-m", n_prompts=0, max_workers=4, rps=50, timeout=0.5, max_tries=8,
                     backoff_base=0.05, backoff_cap=0.3, judge_tries=3, pairs_per_prompt=2)
        assert prefs_main(args) == 0
        s = json.loads(Path(str(out) + ".summary.json").read_text())
        written, failed = _outcome(out, ids, s)
        assert s["failed_ids"] == {"p003": "retries_exhausted:http_500", "p008": "judge_malformed"}
        assert written == set(ids) - {"p003", "p008"}
        for reason in ("http_429", "http_500", "timeout", "connection", "judge_malformed"):
            assert s["retries"].get(reason, 0) > 0, (reason, s["retries"])
        assert s["tokens"]["total"] > 0
        # best (longest answer, ranked first by the fake judge) vs the two worst
        p = json.loads(out.read_text().splitlines()[0])
        assert p["chosen"].startswith("答3") and p["rejected"].startswith(("答0", "答1"))
        # rerun: written prompts are skipped, the failed ones are tried again and fail again
        assert prefs_main(args) == 0
        s2 = json.loads(Path(str(out) + ".summary.json").read_text())
        assert s2["skipped_already_done"] == 10 and set(s2["failed_ids"]) == {"p003", "p008"}
        _outcome(out, ids, s2)
        # an endpoint that rejects n: K single calls instead
        out2 = tmp_path / "no_n.jsonl"
        args2 = _args(tmp_path / "prompts.jsonl", out2, base_url=fs.url, gen_model="no-n", n_prompts=4,
                      max_workers=1, timeout=5, backoff_base=0.05)
        fs.faults = False
        assert prefs_main(args2) == 0
        s3 = json.loads(Path(str(out2) + ".summary.json").read_text())
        assert s3["done"] + s3["failed"] == 4 and s3["written_prompts"] == 4 - s3["failed"]
        assert all(p["meta"]["k"] == 4 for p in read_jsonl(out2))


def test_kill_and_rerun_resumes_cleanly(tmp_path):
    n = 40
    ids = write_prompts(tmp_path / "prompts.jsonl", n)
    out = tmp_path / "pairs.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": "dummy", "PYTHONPATH": str(ROOT)}
    with FaultServer(faults=False, delay=0.05) as fs:
        cmd = [sys.executable, str(ROOT / "7.gen_prefs_openai.py"),
               *_args(tmp_path / "prompts.jsonl", out, base_url=fs.url, gen_model="gen-m", judge="openai",
                      judge_model="judge-m", n_prompts=0, max_workers=2, timeout=10)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(3600):  # until some prompts are written (at most ~3 min on a loaded machine)
                if out.exists() and out.read_text(encoding="utf-8").count("\n") >= 5 or proc.poll() is not None:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        first = read_jsonl(out)  # every line valid; no torn line
        assert 5 <= len(first) < n
        # simulate a torn write on top of the kill: the rerun must cut it off
        with open(out, "a", encoding="utf-8") as f:
            f.write('{"id": "torn", "prompt": [{"ro')
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(Path(str(out) + ".summary.json").read_text())
    assert s["skipped_already_done"] >= len(first)
    written, failed = _outcome(out, ids, s)
    assert not failed and written == set(ids)
    assert "torn" not in out.read_text(encoding="utf-8")
    assert "pairs written" in r.stdout


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tiny_ckpt, tmp_path, capsys):
    """A ``nohup`` log gets readable lines, not tqdm bars (carriage returns, bar characters)."""
    write_prompts(tmp_path / "prompts.jsonl", 6)
    out = tmp_path / "local.jsonl"
    args = _args(tmp_path / "prompts.jsonl", out, generator="local", model_dir=tiny_ckpt, n_prompts=5,
                 local_batch=2, progress="true")
    assert prefs_main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "█" not in err
    assert "[prompts] 100.0% 5 prompt" in err
