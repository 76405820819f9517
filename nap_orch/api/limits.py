"""The API's per-user limits, kept in the API process (each process enforces its own share):

- a request rate per user (a token bucket: ``rate`` a second, bursts of ``burst``), answered 429 with
  ``Retry-After`` when spent;
- event streams (SSE) open at once, per user and for the whole process: 429 for the user's, 503 for
  the process's, so that streams left open cannot take the API from everyone else;
- bearer tokens checked once and then remembered for a few seconds (``TokenCache``), so a flood of
  requests, good tokens or bad, costs no Redis round trip after the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import Busy, TooManyRequests


@dataclass
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take()`` spends one, or says how long until one is."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """0 when a token was spent; else the seconds until one will be there (nothing spent)."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Limits:
    """What one API process allows each user (see the module's text)."""

    rate: float = 50.0
    burst: float = 100.0
    streams_per_user: int = 20
    streams_total: int = 1000
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)

    def check_rate(self, user: str, now: float | None = None) -> None:
        bucket = self.buckets.get(user)
        if bucket is None:
            if len(self.buckets) > 100_000:  # forget idle users rather than grow without end
                self.buckets.clear()
            bucket = self.buckets[user] = TokenBucket(self.rate, self.burst)
        wait = bucket.take(time.monotonic() if now is None else now)
        if wait:
            raise TooManyRequests(
                f"too many requests: at most {self.rate:g} a second (bursts of {self.burst:g}) per user",
                retry_after=wait,
            )

    @contextmanager
    def stream(self, user: str) -> Iterator[None]:
        """Hold one of the user's event streams for the block."""
        mine = self.streams.get(user, 0)
        if mine >= self.streams_per_user:
            raise TooManyRequests(
                f"too many event streams open: at most {self.streams_per_user} per user; close one", retry_after=5
            )
        if sum(self.streams.values()) >= self.streams_total:
            raise Busy(f"this API process serves {self.streams_total} event streams already", retry_after=5)
        self.streams[user] = mine + 1
        try:
            yield
        finally:
            left = self.streams[user] - 1
            if left:
                self.streams[user] = left
            else:
                del self.streams[user]


@dataclass
class TokenCache:
    """Answers of token checks, good and bad, kept ``ttl`` seconds (a token revoked or a user removed
    stops working within ``ttl``); at most ``size`` entries (all dropped when full)."""

    ttl: float = 10.0
    size: int = 100_000
    entries: dict[str, tuple[float, tuple[str, bool] | None]] = field(default_factory=dict)

    def get(self, digest: str, now: float) -> tuple[bool, tuple[str, bool] | None]:
        """(known, answer): answer is (user, admin), or None for a token known to be bad."""
        hit = self.entries.get(digest)
        if hit is None or hit[0] <= now:
            return False, None
        return True, hit[1]

    def put(self, digest: str, answer: tuple[str, bool] | None, now: float) -> None:
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[digest] = (now + self.ttl, answer)

    def forget(self, digest: str) -> None:
        self.entries.pop(digest, None)
