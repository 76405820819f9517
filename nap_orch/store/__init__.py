"""The state store: the seed's etcd keys (``/services/...``) and the platform's own (``/nap/...``).

``open_store(settings)`` picks etcd when ``NAP_ETCD`` is set, else the Redis fallback with the same keys.
"""

from __future__ import annotations

from ..config import Settings
from .base import Lease, Store


def open_store(settings: Settings) -> Store:
    """The store ``settings`` name (not yet opened). Each client library is imported only when chosen:
    grpc (etcd's) takes a while to load, and the MPI rank processes start one each."""
    if settings.etcd:
        from .etcd import EtcdStore

        return EtcdStore(settings.etcd)
    from .redis import RedisStore

    return RedisStore(settings.redis_url, namespace=settings.namespace)


__all__ = ["Store", "Lease", "open_store"]
