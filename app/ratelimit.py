"""Request rate limits on /v1: a fixed one-minute window per API key, and one per client
address for requests that carry no usable key; counted in Redis when the deployment has
one, so all API replicas share the count; in process memory in the embedded default.

- A request with a bearer key counts against that key's bucket, named by the key's SHA-256
  (the digest it is stored and looked up by, never the key). The header is read by
  `app.services.teams.bearer_key`, the parser authentication uses, so every spelling of a
  key (`bEaReR`, extra spaces, tabs) is one bucket.
- A request with no key (or a header that is not a bearer key) counts against its client
  address before anything else runs; so does a request whose key turned out to be invalid
  (answered 401), after the fact. While an address is over its limit, its requests are
  refused unless their key is known good: answered by this process with anything but 401.
  So rotating made-up keys buys an address no more lookups than sending none, while a
  team's key keeps working from an address shared with a misbehaving client.

Over a limit, a request gets 429 `rate_limit_exceeded` with `Retry-After`, before any
database work or reading its body. /healthz, /readyz, /metrics and the dashboard are not
limited. The client address is the socket's peer; behind a proxy, run uvicorn with
`--forwarded-allow-ips` so that it is the client's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.error_handlers import envelope
from app.services.teams import bearer_key, hash_key

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60
KNOWN_GOOD_KEYS = 10_000  # digests remembered per process, least recently used dropped
clock = time.time  # the windows' clock (tests fix it)


class MemoryCounter:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    async def hit(self, who: str, window: int, *, read: str | None = None) -> tuple[int, int]:
        """Count one request for `who`; return its count and, when asked, `read`'s."""
        with self.lock:
            for old in [k for k in self.counts if k[1] < window]:
                del self.counts[old]
            self.counts[(who, window)] = self.counts.get((who, window), 0) + 1
            other = self.counts.get((read, window), 0) if read else 0
            return self.counts[(who, window)], other


class RedisCounter:
    def __init__(self, url: str) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)

    async def hit(self, who: str, window: int, *, read: str | None = None) -> tuple[int, int]:
        """One round trip: INCR (and EXPIRE) `who`'s count, GET `read`'s."""
        key = f"lathe:ratelimit:{who}:{window}"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.incr(key).expire(key, WINDOW_SECONDS * 2)
            if read:
                pipe.get(f"lathe:ratelimit:{read}:{window}")
            count, _, *other = await pipe.execute()
        return int(count), (int(other[0] or 0) if other else 0)


class RateLimitMiddleware:
    """Plain ASGI middleware (no per-request task or body wrapping, unlike
    BaseHTTPMiddleware): one counter round trip per /v1 request, a second only for a
    request with a key that turns out invalid."""

    def __init__(self, app: ASGIApp, per_minute: int, broker_url: str | None) -> None:
        self.app = app
        self.per_minute = per_minute
        redis_url = broker_url if broker_url and broker_url.startswith("redis") else None
        self.counter = RedisCounter(redis_url) if redis_url else MemoryCounter()
        self.known_good: OrderedDict[str, None] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        key = bearer_key(header)
        client = scope.get("client")
        address = f"addr:{client[0] if client else 'unknown'}"
        digest = f"key:{hash_key(key)[:32]}" if key else None
        vouched = digest in self.known_good
        now = clock()
        window = int(now // WINDOW_SECONDS)
        try:
            if digest is None:
                count, _ = await self.counter.hit(address, window)
                over = (
                    "per client address without a valid API key" if count > self.per_minute else ""
                )
            else:
                # The address's count is read only for a key not known good (one pipeline).
                count, failures = await self.counter.hit(
                    digest, window, read=None if vouched else address
                )
                over = (
                    "per API key"
                    if count > self.per_minute
                    else "per client address without a valid API key"
                    if failures >= self.per_minute
                    else ""
                )
        except Exception:  # the counter's store is down: serve rather than refuse
            log.warning("rate limit counter unavailable", exc_info=True)
            return await self.app(scope, receive, send)
        if over:
            return await self._refuse(scope, receive, send, window, now, over)
        extra = [
            (b"x-ratelimit-limit", str(self.per_minute).encode()),
            (b"x-ratelimit-remaining", str(max(0, self.per_minute - count)).encode()),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
                if digest is not None:
                    await self._judge(digest, address, window, message["status"])
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _judge(self, digest: str, address: str, window: int, status: int) -> None:
        """After a keyed request: a 401 counts against the address (and forgets the key as
        good: it may have been revoked); anything else vouches for the key."""
        if status == 401:
            self.known_good.pop(digest, None)
            try:
                await self.counter.hit(address, window)
            except Exception:
                log.warning("rate limit counter unavailable", exc_info=True)
            return
        self.known_good[digest] = None
        self.known_good.move_to_end(digest)
        if len(self.known_good) > KNOWN_GOOD_KEYS:
            self.known_good.popitem(last=False)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, window: int, now: float, who: str
    ) -> None:
        retry = int((window + 1) * WINDOW_SECONDS - now) + 1
        response = envelope(
            429,
            f"rate limit exceeded: {self.per_minute} requests a minute {who}; retry in {retry} s",
            "rate_limit_error",
            "rate_limit_exceeded",
            None,
        )
        response.headers["Retry-After"] = str(retry)
        await response(scope, receive, send)
