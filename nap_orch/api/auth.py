"""Users and their bearer tokens (Redis). Only a token's SHA-256 is kept."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from ..errors import Conflict, Unauthorized
from ..keys import RedisKeys
from ..names import check_name
from .limits import TokenCache

ADMIN = "admin"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    def __init__(
        self, redis: aioredis.Redis, namespace: str = "nap", admin_token: str = "", cache: TokenCache | None = None
    ):
        # Any: redis-py annotates replies as ``bytes | str``; without decode_responses they are bytes.
        self.redis: Any = redis
        self.keys = RedisKeys(namespace)
        self.admin_token = admin_token
        self.cache = cache or TokenCache(ttl=0)
        # Tokens not in the cache are looked up a few at a time: a flood of made-up tokens waits here
        # rather than taking every Redis connection from the requests of known users.
        self._lookups = asyncio.Semaphore(8)

    async def bootstrap(self) -> None:
        """Make the configured admin token valid (the admin is a user named ``admin``)."""
        if self.admin_token:
            await self._store(ADMIN, self.admin_token, admin=True, replace=True)

    async def add(self, name: str, admin: bool = False) -> str:
        check_name(name, "user name")
        token = "nap_" + secrets.token_urlsafe(24)
        await self._store(name, token, admin=admin, replace=False)
        return token

    async def _store(self, name: str, token: str, admin: bool, replace: bool) -> None:
        record = json.dumps({"name": name, "admin": admin, "created": time.time(), "token_sha256": _digest(token)})
        if replace:
            old = await self.redis.hget(self.keys.users, name)
            if old:
                await self.redis.hdel(self.keys.tokens, json.loads(old)["token_sha256"])
            await self.redis.hset(self.keys.users, name, record)
        elif not await self.redis.hsetnx(self.keys.users, name, record):
            raise Conflict(f"user {name!r} already exists")
        await self.redis.hset(self.keys.tokens, _digest(token), name)
        self.cache.forget(_digest(token))

    async def authenticate(self, header: str | None) -> tuple[str, bool]:
        """(user name, is admin) for an ``Authorization: Bearer <token>`` header; 401 otherwise."""
        if not header or not header.startswith("Bearer "):
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        token = header[7:].strip()
        if not token or len(token) > 256:
            raise Unauthorized("invalid token")
        digest = _digest(token)
        known, answer = self.cache.get(digest, time.monotonic())
        if not known:
            async with self._lookups:
                known, answer = self.cache.get(digest, time.monotonic())  # another request looked it up
                if not known:
                    answer = await self._lookup(digest)
                    self.cache.put(digest, answer, time.monotonic())
        if answer is None:
            raise Unauthorized("invalid token")
        return answer

    async def _lookup(self, digest: str) -> tuple[str, bool] | None:
        name = await self.redis.hget(self.keys.tokens, digest)
        if not name:
            return None
        record = await self.redis.hget(self.keys.users, name)
        if not record:
            return None
        return name.decode(), bool(json.loads(record).get("admin"))

    async def list(self) -> list[str]:
        return sorted(k.decode() for k in await self.redis.hkeys(self.keys.users))

    async def records(self) -> builtins.list[dict[str, Any]]:
        """Every user's name, whether an admin, and when it was added (never its token's digest)."""
        out = []
        for name, raw in (await self.redis.hgetall(self.keys.users)).items():
            record = json.loads(raw)
            out.append({"name": name.decode(), "admin": bool(record.get("admin")), "created": record.get("created")})
        return sorted(out, key=lambda r: r["name"])
