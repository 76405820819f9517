"""Shared pytest fixtures: real etcd and Redis servers for the whole session, and open stores on them.

- ``etcd_server``, ``redis_server`` (session): a started :class:`EtcdServer` / :class:`RedisServer` in the
  session's temp folder. A test may stop or restart one; the store fixtures start it again if needed.
- ``key_prefix``: a key folder of this test's own (``/test-<hex>/``), since tests share one etcd.
- ``etcd_store``, ``redis_store``: an open store on the session's server (Redis: a namespace of its own).
- ``store``: parametrized over both kinds, so a test that takes it runs once on each.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from nap_orch.store.etcd import EtcdStore
from nap_orch.store.redis import RedisStore

from .services import EtcdServer, RedisServer

STORE_KINDS = ("etcd", "redis")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    if not os.path.exists(binary) and not os.environ.get("CI"):
        pytest.skip("etcd is not installed here (apt-get install etcd-server)")
    server = EtcdServer(tmp_path_factory.mktemp("etcd"), binary=binary)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
async def etcd_store(etcd_server):
    etcd_server.start()  # again, if an earlier test stopped it
    store = EtcdStore(etcd_server.endpoint)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def redis_store(redis_server):
    redis_server.start()
    store = RedisStore(redis_server.url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=STORE_KINDS)
def store(request):
    """An open store of each kind in turn (only the kind's own server is started)."""
    return request.getfixturevalue(f"{request.param}_store")


__all__ = ["STORE_KINDS", "etcd_server", "redis_server", "key_prefix", "etcd_store", "redis_store", "store"]
