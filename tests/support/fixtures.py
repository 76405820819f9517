"""The tests' shared fixtures (loaded by tests/conftest.py as a plugin): real services they start.

- the stacks: ``stack`` (etcd as its state store), ``redis_stack`` (the embedded shape), ``slurm_stack``
  and ``slurm2_stack`` (on one- and two-node Slurm clusters), ``engine_stack`` (each engine in turn),
  and ``user``/``engine_user`` (a fresh user of one); ``file_server`` serves deploy archives.

- ``etcd_server``, ``redis_server`` (session): a started :class:`EtcdServer` / :class:`RedisServer` in the
  session's temp folder. A test may stop or restart one; the store fixtures start it again if needed.
- ``key_prefix``: a key folder of this test's own (``/test-<hex>/``), since tests share one etcd.
- ``etcd_store``, ``redis_store``: an open store on the session's server (Redis: a namespace of its own).
- ``memory_store``: the in-process one; ``store``: parametrized over the three kinds, so a test that takes
  it runs once on each.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from nap_orch.store.etcd import EtcdStore
from nap_orch.store.memory import MemoryStore
from nap_orch.store.redis import RedisStore

from .httpserver import FileServer
from .services import EtcdServer, RedisServer
from .slurm_cluster import SlurmCluster, slurm_available
from .stack import NapStack

SERVER_STORES = ("etcd", "redis")  # the stores with a server of their own
STORE_KINDS = (*SERVER_STORES, "memory")


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


@pytest.fixture
async def memory_store():
    store = MemoryStore()
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=STORE_KINDS)
def store(request):
    """An open store of each kind in turn (only the kind's own server is started)."""
    return request.getfixturevalue(f"{request.param}_store")


# Small limits so the size tests stay small; the defaults (512 MiB ...) are documented in the README.
LIMITS = {
    "NAP_MAX_DOWNLOAD": str(1024 * 1024),
    "NAP_MAX_EXTRACT": str(4 * 1024 * 1024),
    "NAP_MAX_FILES": "100",
    "NAP_RESTART_LIMIT": "3",
    "NAP_STOP_TIMEOUT": "3",
    "NAP_PORT_RANGE": "21000-22999",
    "NAP_MAX_COUNT": "3000",
    "NAP_MAX_MPI_HOSTS": "4",
    "NAP_MPI_WAIT_TIMEOUT": "20",
    # An instance is running once up 0.5 s (the default: 3 s), so that launches in tests settle sooner.
    "NAP_MIN_HEALTHY": "0.5",
    # The reaper sweeps every second and acts on a job stranded for 3 s (the defaults: 10 s and 30 s).
    "NAP_REAP_INTERVAL": "1",
    "NAP_REAP_GRACE": "3",
    # Quotas out of the way of the launches of thousands (test_quotas.py sets users' own).
    "NAP_QUOTA_INSTANCES": "100000",
    "NAP_QUOTA_MEMORY": "100000t",
    # The file servers the tests deploy from listen on loopback, which the fetch policy refuses.
    "NAP_FETCH_ALLOW": "127.0.0.0/8",
}


@pytest.fixture(scope="session")
def file_server(tmp_path_factory):
    server = FileServer(tmp_path_factory.mktemp("www")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, redis_server, etcd_server):
    """The whole stack with etcd as its state store (the production shape)."""
    s = NapStack(tmp_path_factory.mktemp("nap"), redis_server.url, etcd_server.endpoint, extra_env=LIMITS)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def redis_stack(tmp_path_factory, redis_server):
    """The embedded shape: the state store's keys in Redis; local sources not allowed."""
    s = NapStack(
        tmp_path_factory.mktemp("nap-r"), redis_server.url, "", extra_env={**LIMITS, "NAP_ALLOW_LOCAL_SOURCES": "0"}
    )
    s.start()
    yield s
    s.stop()


@pytest.fixture
def user(stack):
    """A fresh user of the etcd stack: (name, client)."""
    return stack.add_user()


# -- the Slurm engine: stacks on private Slurm clusters (tests/support/slurm_cluster.py) -------------------
# Two slurmd "nodes" share this machine, hence its hostname: Open MPI's shared-memory segment names of
# ranks on n1 and n2 would collide, so ranks talk TCP.
SLURM_ENV = {"NAP_SLURM_MPI_ENV": "OMPI_MCA_btl=self,tcp"}


def slurm_stack_on(
    tmp_path_factory,
    redis_server,
    etcd_server,
    name: str,
    nodes: int,
    port_range: str,
    extra_env: dict | None = None,
    **cluster_args,
) -> NapStack:
    """A started SlurmCluster of ``nodes`` nodes and a started NapStack with the slurm engine on it
    (``stack.cluster``); the caller stops both. Skips where this machine can't run Slurm."""
    ok, why = slurm_available()
    if not ok:
        pytest.skip(f"no Slurm here: {why}")
    cluster = SlurmCluster(tmp_path_factory.mktemp(name), nodes=nodes, **cluster_args).start()
    s = NapStack(
        tmp_path_factory.mktemp(f"nap-{name}"),
        redis_server.url,
        etcd_server.endpoint,
        engine="slurm",
        extra_env={**LIMITS, **SLURM_ENV, **cluster.env, "NAP_PORT_RANGE": port_range, **(extra_env or {})},
    )
    s.cluster = cluster
    try:
        s.start()
    except BaseException:
        s.stop()
        cluster.stop()
        raise
    return s


@pytest.fixture(scope="session")
def slurm_stack(tmp_path_factory, redis_server, etcd_server):
    """The stack on a one-node Slurm cluster (the state store: the session's etcd)."""
    s = slurm_stack_on(tmp_path_factory, redis_server, etcd_server, "slurm1", 1, "23000-24999")
    yield s
    s.stop()
    s.cluster.stop()


@pytest.fixture(scope="session")
def slurm2_stack(tmp_path_factory, redis_server, etcd_server):
    """The stack on a two-node Slurm cluster (n1 and n2, both on this machine)."""
    s = slurm_stack_on(tmp_path_factory, redis_server, etcd_server, "slurm2", 2, "25000-26999")
    yield s
    s.stop()
    s.cluster.stop()


ENGINES = [
    "local",
    pytest.param("slurm", marks=pytest.mark.slurm_engine),
    pytest.param("slurm2", marks=pytest.mark.slurm_engine),
]


@pytest.fixture(params=ENGINES)
def engine_stack(request):
    """The contract tests' stack: the local engine's, then the one- and the two-node Slurm cluster's.
    What the test's users started is removed after it (a Slurm cluster shared by the session would
    otherwise carry hundreds of jobs into the next test)."""
    s = request.getfixturevalue({"local": "stack", "slurm": "slurm_stack", "slurm2": "slurm2_stack"}[request.param])
    first = len(s.users)
    yield s
    s.remove_instances(s.users[first:])


@pytest.fixture
def engine_user(engine_stack):
    """A fresh user of ``engine_stack``: (name, client)."""
    return engine_stack.add_user()
