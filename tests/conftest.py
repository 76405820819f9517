from .fixtures_services import *  # noqa

import pytest

from .httpserver import FileServer
from .stack import NapStack

# Small limits so the size tests stay small; the defaults (512 MiB ...) are documented in the README.
LIMITS = {"NAP_MAX_DOWNLOAD": str(1024 * 1024), "NAP_MAX_EXTRACT": str(4 * 1024 * 1024), "NAP_MAX_FILES": "100",
          "NAP_RESTART_LIMIT": "3", "NAP_STOP_TIMEOUT": "3", "NAP_PORT_RANGE": "21000-22999", "NAP_MAX_COUNT": "3000",
          "NAP_MAX_MPI_HOSTS": "4", "NAP_MPI_WAIT_TIMEOUT": "20"}


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
    s = NapStack(tmp_path_factory.mktemp("nap-r"), redis_server.url, "",
                 extra_env={**LIMITS, "NAP_ALLOW_LOCAL_SOURCES": "0"})
    s.start()
    yield s
    s.stop()


@pytest.fixture
def user(stack):
    """A fresh user of the etcd stack: (name, client)."""
    return stack.add_user()
