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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.error_handlers import envelope

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60


class MemoryCounter:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    async def hit(self, who: str, window: int) -> int:
        with self.lock:
            for old in [k for k in self.counts if k[1] < window]:
                del self.counts[old]
            self.counts[(who, window)] = self.counts.get((who, window), 0) + 1
            return self.counts[(who, window)]


class RedisCounter:
    def __init__(self, url: str) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)

    async def hit(self, who: str, window: int) -> int:
        key = f"lathe:ratelimit:{who}:{window}"
        async with self.client.pipeline(transaction=False) as pipe:
            count, _ = await pipe.incr(key).expire(key, WINDOW_SECONDS * 2).execute()
        return int(count)


class RateLimitMiddleware:
    """Plain ASGI middleware (no per-request task or body wrapping, unlike
    BaseHTTPMiddleware): one counter round trip per /v1 request."""

    def __init__(self, app: ASGIApp, per_minute: int, broker_url: str | None) -> None:
        self.app = app
        self.per_minute = per_minute
        redis_url = broker_url if broker_url and broker_url.startswith("redis") else None
        self.counter = RedisCounter(redis_url) if redis_url else MemoryCounter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if not header:
            return await self.app(scope, receive, send)
        who = hashlib.sha256(header).hexdigest()[:32]
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        try:
            count = await self.counter.hit(who, window)
        except Exception:  # the counter's store is down: serve rather than refuse
            log.warning("rate limit counter unavailable", exc_info=True)
            return await self.app(scope, receive, send)
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
            return await response(scope, receive, send)
        extra = [
            (b"x-ratelimit-limit", str(self.per_minute).encode()),
            (b"x-ratelimit-remaining", str(max(0, self.per_minute - count)).encode()),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
