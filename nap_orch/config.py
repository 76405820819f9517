"""Settings, read once from the environment (every knob is an ``NAP_*`` variable)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MiB = 1024 * 1024


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _range(value: str, top: int = 65535) -> tuple[int, int]:
    low, _, high = value.partition("-")
    lo, hi = int(low), int(high or low)
    if not (0 < lo <= hi <= top):
        raise ValueError(f"bad range {value!r} (from 1 to {top})")
    return lo, hi


def _default_home() -> Path:
    """``~/nap``; for root ``/var/lib/nap``, a place every tenant's uid can pass through to its instance
    folder (the sandbox binds it as that uid), which root's home (mode 0700) is not."""
    if os.geteuid() == 0:
        return Path("/var/lib/nap")
    return Path(os.path.expanduser("~/nap"))


def read_env(cls: type[T], prefix: str, env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """A settings dataclass ``cls`` from ``<prefix><FIELD>`` variables (unset or empty: the default).
    Engines keep their own settings this way (``NAP_SLURM_*``)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        raw = env.get(prefix + f.name.upper())
        if raw is None or raw == "":
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "Path":
            values[f.name] = Path(raw).expanduser()
        elif kind == "tuple[int, int]":
            values[f.name] = _range(raw, f.metadata.get("top", 65535))
        elif kind == "int":
            values[f.name] = int(raw)
        elif kind == "float":
            values[f.name] = float(raw)
        elif kind == "bool":
            values[f.name] = _bool(raw)
        else:
            values[f.name] = raw
    values.update(overrides)
    return cls(**values)


PLATFORM_ENV = "platform.env"


def platform_env(home: Path) -> dict[str, str]:
    """``NAP_*=value`` lines of ``NAP_HOME/platform.env``: the platform's secrets (Redis's and etcd's
    credentials, the admin token) that ``nap up`` keeps in a file of mode 0600 rather than in the
    environment of every process it starts. Missing or unreadable: none."""
    try:
        text = (home / PLATFORM_ENV).read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip().startswith("NAP_"):
            found[key.strip()] = value.strip()
    return found


@dataclass(frozen=True)
class Settings:
    """Everything configurable. ``Settings.from_env()`` reads ``NAP_<FIELD>`` for each field."""

    home: Path = field(default_factory=_default_home)
    redis_url: str = "redis://127.0.0.1:6379/0"
    # etcd endpoints "host:port[,host:port...]"; empty means: keep the keys in Redis instead.
    etcd: str = ""
    engine: str = "local"
    # Prefix of every Redis key the platform owns (jobs, events, users, queue): lets tests share a server.
    namespace: str = "nap"
    allow_local_sources: bool = False
    # The folder local sources may come from (their real path inside it, never inside ``home``);
    # empty: none may be deployed even where they are allowed.
    local_sources_dir: str = ""
    # CIDRs deploys may fetch from although the fetch policy refuses them (ops.fetch.policy):
    # loopback, private, link-local ... ranges. Comma-separated; empty: none.
    fetch_allow: str = ""
    max_download: int = 512 * MiB
    max_extract: int = 2048 * MiB
    max_files: int = 20000
    download_timeout: float = 300.0  # seconds a download (or clone) may take in all
    download_idle_timeout: float = 30.0  # seconds a download may go without receiving a byte
    port_range: tuple[int, int] = (20000, 29999)
    max_count: int = 1000
    max_mpi_hosts: int = 16
    mpi_wait_timeout: float = 60.0
    mpicc: str = "mpicc"
    mpirun: str = "mpirun"
    restart_limit: int = 5
    stop_timeout: float = 10.0
    # Seconds a started common instance must stay up before it counts as running (Nomad's
    # min_healthy_time): until then it is "starting", and a crash loop never looks healthy.
    min_healthy: float = 3.0
    # Releases of an app kept (ops.releases): rollback reaches these; older ones are pruned.
    keep_releases: int = 5
    # Every instance runs sandboxed as its tenant's own uid, with cgroup limits (engines.sandbox,
    # engines.cgroups). Off (NAP_SANDBOX=off) is for development only: tenants are not isolated.
    sandbox: bool = True
    # The uids (and gids) given to tenants, one each, without passwd entries (ops.tenants).
    uid_range: tuple[int, int] = field(default=(200000, 299999), metadata={"top": 2**31 - 2})
    tasks_max: int = 512  # processes and threads an instance may have at once (the unit's TasksMax=)
    # How long a job's worker waits out a Redis outage before it gives up writing the job's state.
    job_write_wait: float = 120.0
    # How long a finished job's record and its event stream are kept, in seconds (0: for ever).
    job_retention: float = 7 * 24 * 3600.0
    # The reaper (jobs.reaper): how often it looks for jobs no worker runs and no queue holds, and how
    # long such a job must stay so before it is requeued (or failed when it has no attempts left).
    reap_interval: float = 10.0
    reap_grace: float = 30.0
    agent_socket: str = ""
    agent_wait: float = 15.0  # how long a call waits for an agent that does not answer (restarting)
    admin_token: str = ""
    host: str = "127.0.0.1"
    api_port: int = 8470
    # The API under load (api.limits): Redis connections its requests share, and how long a request
    # waits for one before it answers 503 with Retry-After; event streams (SSE) per user and per API
    # process; each user's request rate (a second, and bursts); how long a token check is remembered.
    api_redis_connections: int = 64
    api_redis_wait: float = 5.0
    sse_per_user: int = 20
    sse_max: int = 1000
    sse_heartbeat: float = 15.0  # seconds without an event before a stream gets a comment line
    user_rate: float = 50.0
    user_burst: float = 100.0
    token_cache_ttl: float = 10.0
    # Fair workers: jobs of one user running at once, over all workers (the rest wait in the queue).
    user_jobs_running: int = 4
    # Each user's quotas unless an admin set the user's own (ops.quotas): instances in all, apps, disk
    # of the user's apps and instance folders, memory summed over instances (sizes like 20g).
    quota_instances: int = 2000
    quota_apps: int = 100
    quota_disk: str = "50g"
    quota_memory: str = "512g"
    # Prometheus metrics (``metrics.py``): the folder this host's platform processes write theirs into
    # (empty: NAP_HOME/metrics), and a token that may read ``GET /metrics`` besides an admin's.
    metrics_dir: str = ""
    metrics_token: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """The settings from ``NAP_*`` variables, and for those unset, from ``NAP_HOME/platform.env``."""
        env = os.environ if env is None else env
        home = Path(env["NAP_HOME"]).expanduser() if env.get("NAP_HOME") else _default_home()
        return read_env(cls, "NAP_", {**platform_env(home), **env}, **overrides)

    def __post_init__(self) -> None:
        self.fetch_allow_networks  # noqa: B018 -- a bad NAP_FETCH_ALLOW fails at start, not at a deploy

    @cached_property
    def fetch_allow_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """``fetch_allow`` parsed (an address alone is a network of one)."""
        try:
            return tuple(ip_network(part.strip(), strict=False) for part in self.fetch_allow.split(",") if part.strip())
        except ValueError as e:
            raise ValueError(f"NAP_FETCH_ALLOW: {e}") from None

    @property
    def services_dir(self) -> Path:
        return self.home / "services"

    @property
    def apps_dir(self) -> Path:
        return self.home / "apps"

    @property
    def agent_dir(self) -> Path:
        return self.home / "agent"

    @property
    def agent_socket_path(self) -> str:
        return self.agent_socket or str(self.home / "agent.sock")

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics_dir).expanduser() if self.metrics_dir else self.home / "metrics"
