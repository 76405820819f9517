"""Every key name in one place: the state store's (seed) paths and the Redis keys of jobs and events."""

from __future__ import annotations

# State store (etcd or the Redis fallback): the seed's keys ...
URL = "/services/url/{user}/{app}"
URLS_OF_USER = "/services/url/{user}/"
PORT = "/services/port/{user}/{app}/{n}"
PORTS_OF_APP = "/services/port/{user}/{app}/"
MPI = "/services/mpi/{user}/{app}/{run}/"  # + slave<i> = {"host", "slots"}: the run's registered slaves
MPI_OF_APP = "/services/mpi/{user}/{app}/"
# ... and the platform's own, under /nap/.
INSTANCE = "/nap/instances/{user}/{app}/{n}"  # reservation of instance number n (value: instance name)
INSTANCES_OF_APP = "/nap/instances/{user}/{app}/"
INSTANCES_OF_USER = "/nap/instances/{user}/"
PORT_RESERVATION = "/nap/ports/{host}/{port}"  # value: instance name holding the port
PORTS_OF_HOST = "/nap/ports/{host}/"
TENANT = "/nap/tenants/{user}"  # the user's uid (= its gid), given once (ops.tenants)
UID = "/nap/uids/{uid}"  # value: the user the uid was given to
QUOTA = "/nap/quotas/{user}"  # the user's own limits, where an admin set them (ops.quotas)
QUOTA_LOCK = "/nap/quota-locks/{user}"  # held while a launch reserves and counts (value: its job)
RELEASE = "/nap/releases/{user}/{app}/{n}"  # release n of an app: its URL, time, digest (ops.releases)
RELEASES_OF_APP = "/nap/releases/{user}/{app}/"
# Engines keep records of their own under /nap/<engine>/ (each in its own package).


class RedisKeys:
    """Redis keys of the job model, all under one namespace so tests can share a server."""

    def __init__(self, namespace: str):
        self.ns = namespace

    def job(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    def user_jobs(self, user: str) -> str:
        return f"{self.ns}:jobs:{user}"

    def job_events(self, job_id: str) -> str:
        return f"{self.ns}:ev:job:{job_id}"

    def user_events(self, user: str) -> str:
        return f"{self.ns}:ev:user:{user}"

    @property
    def active_jobs(self) -> str:
        """The jobs not yet ended (queued or running), by creation time: what the reaper looks at."""
        return f"{self.ns}:jobs-active"

    def job_alive(self, job_id: str) -> str:
        """Set, with a short expiry, by the worker running the job, for as long as it runs it."""
        return f"{self.ns}:alive:{job_id}"

    def user_running(self, user: str) -> str:
        """The user's jobs running now (members), each with the time its hold lapses (score)."""
        return f"{self.ns}:running:{user}"

    @property
    def reaper_lock(self) -> str:
        return f"{self.ns}:reaper-lock"

    @property
    def users(self) -> str:
        return f"{self.ns}:users"

    @property
    def tokens(self) -> str:
        return f"{self.ns}:tokens"

    @property
    def dramatiq_namespace(self) -> str:
        return f"{self.ns}:dramatiq"
