"""OpenAI-compatible HTTP API for one MateConv checkpoint (FastAPI).

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (``messages``,
``temperature``, ``top_p``, ``max_tokens`` / ``max_completion_tokens``, ``n``, ``stop``, ``seed``,
``stream`` with ``stream_options.include_usage``), ``GET /health``.

One worker thread generates; requests that arrive while a batch runs are batched together into the
next one (``max_batch_rows`` rows, see ``serving/batching.py``). Errors use the
OpenAI body ``{"error": {"message", "type", "param", "code"}}``. With ``api_key`` set, every ``/v1``
call (and the API docs: ``/docs``, ``/redoc``, ``/openapi.json``) needs ``Authorization: Bearer <key>``.
Any ``model`` name is accepted (one model is served) and the served name is echoed back.

Input never causes a 500: bodies over ``max_body_mb`` get 413 (from ``Content-Length`` before the body
is read, or while reading a chunked body); malformed or too deeply nested JSON, lone surrogates in
text, non-finite numbers, out-of-range seeds and over-long prompts (bounded from the character count
before any tokenisation) get 400, each for that request alone. Message content is encoded as plain
text (``tokenizer.chat``): ``</s>``/``<s>`` typed in a message cannot open a turn. A client that goes
away stops its request: streaming or not, its rows are cancelled at the next decoding step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from pathlib import Path
from threading import Event

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.generation import SEED_MAX, SEED_MIN

from .batching import DEFAULT_MAX_BATCH_ROWS, Batcher
from .engine import VALID_ROLES, Engine, Job

MAX_N = 16
MAX_STOP = 4
DEFAULT_MAX_BODY_MB = 8.0
DISCONNECT_POLL_S = 0.05  # how often a waiting non-streaming request checks that its client is still there
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _err(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


def _number(body: dict, name: str, default, lo, hi, kind=float, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name,
                       "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a finite number", name, "invalid_value")
    if kind is int and isinstance(v, float) and not v.is_integer():
        raise APIError(400, f"'{name}' must be an integer", name, "invalid_type")
    if kind is float and isinstance(v, int) and abs(v) > 2**53:  # no such temperature / top_p; keeps float() safe
        raise APIError(400, f"'{name}' = {v} is out of range", name, "invalid_value")
    v = kind(v)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise APIError(400, f"'{name}' = {v} is outside {rng}", name, "invalid_value")
    return v


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content", "invalid_value")
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   f"messages[{i}].content", "invalid_type")


def parse_chat_request(body, engine: Engine) -> dict:
    """Validate a chat-completions body; return the generation arguments (raises APIError)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in VALID_ROLES:
            raise APIError(400, f"messages[{i}].role {role!r} is not one of {list(VALID_ROLES)}",
                           f"messages[{i}].role", "invalid_value")
        msgs.append({"role": role, "content": _content_text(m.get("content"), i)})
    if all(m["role"] in ("system", "developer") for m in msgs):
        raise APIError(400, "'messages' needs at least one user or assistant message", "messages",
                       "invalid_value")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    n = _number(body, "n", 1, 1, MAX_N, kind=int)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", "seed", "invalid_type")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise APIError(400, f"'seed' must be in [{SEED_MIN}, {SEED_MAX}]", "seed", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop",
                       "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
    so = body.get("stream_options") or {}
    include_usage = bool(isinstance(so, dict) and so.get("include_usage"))

    for i, m in enumerate(msgs):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"messages[{i}].content is not valid Unicode text ({e.reason} at character "
                                f"{e.start})", f"messages[{i}].content", "invalid_value") from None
    ctx = engine.max_context
    at_least = engine.min_prompt_tokens(msgs)
    if at_least >= ctx:  # certainly too long: refused without tokenising it
        raise APIError(400, f"the prompt is at least {at_least} tokens; this model's context is {ctx} tokens",
                       "messages", "context_length_exceeded")
    try:
        prompt_ids = engine.encode_chat(msgs)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"the messages cannot be encoded: {e}", "messages", "invalid_value") from None
    if len(prompt_ids) >= ctx:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {ctx} tokens "
                            "and the answer needs at least one", "messages", "context_length_exceeded")
    room = ctx - len(prompt_ids)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, None, kind=int)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise APIError(400, f"'{name}' = {max_tokens} plus the prompt ({len(prompt_ids)} tokens) exceeds the "
                            f"context of {ctx} tokens (at most {room} new tokens)", name,
                       "context_length_exceeded")
    return {"prompt_ids": prompt_ids, "n": n, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stop": stop, "seed": seed, "stream": stream, "include_usage": include_usage}


def create_app(model_dir_or_model, tokenizer=None, api_key: str | None = None, model_name: str | None = None,
               *, device: str = "cpu", max_context: int | None = None,
               max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, max_body_mb: float = DEFAULT_MAX_BODY_MB) -> FastAPI:
    """Build the app. ``model_dir_or_model``: a checkpoint directory, a loaded model or an :class:`Engine`.

    ``tokenizer``: a tokenizer object or directory (default: the checkpoint's own, else the project's).
    ``max_batch_rows``: most answers sampled together (a request with ``n`` answers counts ``n``).
    ``max_body_mb``: the largest request body accepted (413 beyond).
    """
    if isinstance(model_dir_or_model, Engine):
        engine = model_dir_or_model
    elif isinstance(model_dir_or_model, (str, Path)):
        tok_path = tokenizer if isinstance(tokenizer, (str, Path)) else None
        engine = Engine.from_dir(model_dir_or_model, tok_path, model_name, device=device, max_context=max_context)
        if tokenizer is not None and tok_path is None:
            engine = Engine(engine.model, tokenizer, engine.model_name, max_context)
    else:
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from .engine import load_tokenizer_for

            tokenizer = load_tokenizer_for(None, tokenizer)
        engine = Engine(model_dir_or_model, tokenizer, model_name or "mateconv", max_context)
    if model_name:
        engine.model_name = model_name

    batcher = Batcher(engine, max_batch_rows)
    created = int(time.time())
    if not max_body_mb > 0:
        raise ValueError("max_body_mb must be positive")
    max_body = int(max_body_mb * 1024 * 1024)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="MateConv OpenAI-compatible API", lifespan=lifespan)
    app.state.engine = engine
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return _err(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, e: RequestValidationError):
        return JSONResponse(error_body(f"invalid request: {e.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_req, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    app.add_middleware(_AuthMiddleware, api_key=api_key)
    app.state.abandoned = []  # (finish reasons) of non-streaming requests whose client went away

    def _model_card():
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "mateconv",
                "max_model_len": engine.max_context}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != engine.model_name:
            raise APIError(404, f"model {model_id!r} not found", "model", "model_not_found", "not_found_error")
        return _model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await _read_body(request, max_body)
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        loop = asyncio.get_running_loop()
        args = await loop.run_in_executor(None, parse_chat_request, body, engine)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        n, plen = args["n"], len(args["prompt_ids"])
        gen_kwargs = {k: args[k] for k in ("n", "max_tokens", "temperature", "top_p", "stop", "seed")}

        if not args["stream"]:
            cancel = Event()
            fut = batcher.submit(Job([args["prompt_ids"]], cancel=cancel, **gen_kwargs))
            waiting = asyncio.wrap_future(fut)
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if not waiting.done() and await request.is_disconnected():  # nobody will read the answer
                    cancel.set()
                    if not fut.cancel():  # already running: record how it ended
                        fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else
                                              app.state.abandoned.append([c.finish_reason for c in f.result()[0]]))
                    else:
                        app.state.abandoned.append(["cancelled"] * n)
                    waiting.cancel()
                    return Response(status_code=499)
            try:
                comps = waiting.result()[0]
            except ValueError as e:  # this request alone could not run
                raise APIError(400, str(e)) from None
            ctoks = sum(c.completion_tokens for c in comps)
            return {
                "id": cid, "object": "chat.completion", "created": now, "model": engine.model_name,
                "system_fingerprint": None,
                "choices": [{"index": j, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish_reason} for j, c in enumerate(comps)],
                "usage": {"prompt_tokens": plen, "completion_tokens": ctoks, "total_tokens": plen + ctoks},
            }

        queue: asyncio.Queue = asyncio.Queue()
        cancel = Event()

        def on_delta(r: int, text: str):
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", r, text))

        def finished(fut):
            if fut.cancelled():
                return
            e = fut.exception()
            with contextlib.suppress(RuntimeError):  # the event loop may be gone (client left, shutdown)
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e, None) if e else ("done", fut.result()[0], None))

        def chunk(choices, usage=None):
            d = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": engine.model_name,
                 "system_fingerprint": None, "choices": choices}
            if args["include_usage"]:
                d["usage"] = usage
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        async def events():
            fut = batcher.submit(Job([args["prompt_ids"]], on_delta=on_delta, cancel=cancel, **gen_kwargs))
            fut.add_done_callback(finished)
            try:
                for j in range(n):
                    yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
                while True:
                    kind, a, b = await queue.get()
                    if kind == "delta":
                        yield chunk([{"index": a, "delta": {"content": b}, "logprobs": None,
                                      "finish_reason": None}])
                    elif kind == "done":
                        for j, c in enumerate(a):
                            yield chunk([{"index": j, "delta": {}, "logprobs": None,
                                          "finish_reason": c.finish_reason}])
                        if args["include_usage"]:
                            ctoks = sum(c.completion_tokens for c in a)
                            yield chunk([], {"prompt_tokens": plen, "completion_tokens": ctoks,
                                             "total_tokens": plen + ctoks})
                        break
                    else:
                        err = error_body(f"generation failed: {type(a).__name__}", "server_error")
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # client gone or stream finished: stop sampling
                fut.cancel()  # if it has not started yet

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 when over ``limit`` bytes: from Content-Length before reading, else
    while reading (chunked bodies)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise APIError(400, "invalid Content-Length header") from None
        if declared > limit:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limit} bytes (--max_body_mb)",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes (--max_body_mb)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _protected(path: str) -> bool:
    return path.startswith("/v1") or path in DOC_PATHS


class _AuthMiddleware:
    """``Authorization: Bearer <key>`` on ``/v1`` and the API docs (a plain ASGI middleware, so request
    disconnects still reach the handlers)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.api_key and _protected(scope.get("path", "")):
            got = ""
            for k, v in scope.get("headers") or []:
                if k == b"authorization":
                    got = v.decode("latin-1")
                    break
            scheme, _, token = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                response = _err(APIError(401, "invalid or missing API key (use 'Authorization: Bearer <key>')",
                                         code="invalid_api_key", type_="authentication_error"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
