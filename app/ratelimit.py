"""Per-key request rate limits: a fixed one-minute window per API key (its SHA-256, never
the key), counted in Redis when the deployment has one, so all API replicas share the
count; in process memory in the embedded default.

Over the limit, a request gets 429 `rate_limit_exceeded` with `Retry-After`, before any
database work. /healthz, /readyz and the docs are not limited.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response

from app.api.error_handlers import envelope

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60


class MemoryCounter:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def hit(self, who: str, window: int) -> int:
        with self.lock:
            for old in [k for k in self.counts if k[1] < window]:
                del self.counts[old]
            self.counts[(who, window)] = self.counts.get((who, window), 0) + 1
            return self.counts[(who, window)]


class RedisCounter:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)

    def hit(self, who: str, window: int) -> int:
        key = f"lathe:ratelimit:{who}:{window}"
        count, _ = self.client.pipeline().incr(key).expire(key, WINDOW_SECONDS * 2).execute()
        return int(count)


class RateLimitMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, per_minute: int, broker_url: str | None) -> None:
        super().__init__(app)
        self.per_minute = per_minute
        redis_url = broker_url if broker_url and broker_url.startswith("redis") else None
        self.counter = RedisCounter(redis_url) if redis_url else MemoryCounter()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        header = request.headers.get("authorization", "")
        if not request.url.path.startswith("/v1/") or not header:
            return await call_next(request)
        who = hashlib.sha256(header.encode()).hexdigest()[:32]
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        try:
            count = self.counter.hit(who, window)
        except Exception:  # the counter's store is down: serve rather than refuse
            log.warning("rate limit counter unavailable", exc_info=True)
            return await call_next(request)
        if count > self.per_minute:
            retry = int((window + 1) * WINDOW_SECONDS - now) + 1
            response = envelope(
                429,
                f"rate limit exceeded: {self.per_minute} requests a minute per API key; "
                f"retry in {retry} s",
                "rate_limit_error",
                "rate_limit_exceeded",
                None,
            )
            response.headers["Retry-After"] = str(retry)
            return response
        response = await call_next(request)
        response.headers["X-RateLimit-Limit"] = str(self.per_minute)
        response.headers["X-RateLimit-Remaining"] = str(max(0, self.per_minute - count))
        return response
