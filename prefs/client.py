"""A rate-limited, retrying chat-completions caller over the ``openai`` client.

- :class:`TokenBucket`: requests per second shared by all workers (burst = max(1, rps)).
- :class:`ChatCaller`: one ``chat.completions.create`` call with up to ``max_tries`` attempts.
  429 waits for ``Retry-After`` (``retry-after-ms`` / ``retry-after`` seconds or HTTP date) when the
  server sends one, else exponential backoff with jitter capped at ``backoff_cap_429`` (60 s);
  5xx, 408/409, timeouts, dropped connections and unreadable replies back off up to ``backoff_cap``
  (30 s). 400/422 fail the prompt at once; 401/403/404 abort the run (:class:`FatalError`).
  The ``openai`` client's own retries are switched off so that every attempt is counted here.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


class PromptFailed(Exception):
    """This prompt cannot be done now; ``reason`` is a short code for the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FatalError(Exception):
    """No prompt can succeed (bad key, unknown model or endpoint): stop the run."""


class TokenBucket:
    def __init__(self, rate: float, capacity: float | None = None):
        self.rate = float(rate)
        self.capacity = max(1.0, float(capacity if capacity is not None else rate))
        self.tokens = self.capacity
        self.t = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        if self.rate <= 0:
            return
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
                self.t = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                wait = (1.0 - self.tokens) / self.rate
            time.sleep(wait)


@dataclass
class Stats:
    """Thread-safe counters shared by the callers of one run."""

    retries: Counter = field(default_factory=Counter)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_usage(self, usage) -> None:
        with self.lock:
            self.requests += 1
            if usage is not None:
                self.usage_reported = True
                self.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
                self.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)

    def retry(self, reason: str) -> None:
        with self.lock:
            self.retries[reason] += 1


def retry_after_seconds(headers) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (number or HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ChatCaller:
    """Calls ``chat.completions.create`` on one endpoint with rate limiting and retries."""

    def __init__(self, base_url: str | None, api_key: str | None, *, timeout: float, max_tries: int,
                 bucket: TokenBucket, stats: Stats, backoff_base: float = 1.0, backoff_cap: float = 30.0,
                 backoff_cap_429: float = 60.0, max_retry_after: float = 120.0, rng: random.Random | None = None):
        import openai

        self._openai = openai
        # local servers (vLLM, Ollama, ours) usually need no key; the client insists on one
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0)
        self.max_tries = max_tries
        self.bucket = bucket
        self.stats = stats
        self.backoff_base, self.backoff_cap, self.backoff_cap_429 = backoff_base, backoff_cap, backoff_cap_429
        self.max_retry_after = max_retry_after
        self.rng = rng or random.Random()
        self._rng_lock = threading.Lock()

    def _backoff(self, attempt: int, cap: float) -> float:
        d = min(cap, self.backoff_base * (2 ** (attempt - 1)))
        with self._rng_lock:
            return d / 2 + self.rng.uniform(0, d / 2)

    def create(self, **kwargs):
        """One completion with retries; returns the ``ChatCompletion``. Raises PromptFailed / FatalError."""
        oa = self._openai
        last = "unknown"
        for attempt in range(1, self.max_tries + 1):
            self.bucket.acquire()
            wait = None
            try:
                resp = self.client.chat.completions.create(**kwargs)
                if not getattr(resp, "choices", None):
                    raise PromptFailed("bad_response", "no choices in the reply")
                self.stats.add_usage(getattr(resp, "usage", None))
                return resp
            except oa.RateLimitError as e:
                last = "http_429"
                ra = retry_after_seconds(getattr(e.response, "headers", None))
                wait = min(ra, self.max_retry_after) if ra is not None else self._backoff(attempt, self.backoff_cap_429)
            except oa.APITimeoutError:
                last = "timeout"
            except oa.APIConnectionError:
                last = "connection"
            except oa.APIStatusError as e:
                status = e.status_code
                if status in (401, 403):
                    raise FatalError(f"HTTP {status} from the endpoint (check the API key)") from None
                if status == 404:
                    raise FatalError(f"HTTP 404: unknown model or endpoint ({kwargs.get('model')!r})") from None
                if status < 500 and status not in (408, 409):
                    raise PromptFailed(f"http_{status}", _short(e)) from None
                last = f"http_{status}"
            except oa.APIResponseValidationError:
                last = "bad_response"
            except PromptFailed as e:
                last = e.reason
            if attempt == self.max_tries:
                break
            self.stats.retry(last)
            time.sleep(wait if wait is not None else self._backoff(attempt, self.backoff_cap))
        raise PromptFailed(f"retries_exhausted:{last}", f"{self.max_tries} attempts")


def _short(e: Exception, n: int = 200) -> str:
    body = getattr(e, "body", None)
    msg = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        msg = body["error"].get("message")
    return (msg or str(e))[:n]
