"""A tenant is a Unix identity: each nap user gets a uid of its own (its gid is the same number) from
``NAP_UID_RANGE``, the first time one of its instances is launched, and keeps it.

The uids have no passwd entries: nothing on the host needs a name for them, and a fixed range (like
subuid ranges) can't collide with the host's own accounts or need ``useradd`` on every node of a
cluster. The range must be kept free of the host's users. The state store holds the mapping both
ways, each key created atomically, so two launches of a new user at once agree on one uid:
``/nap/tenants/<user>`` = uid and ``/nap/uids/<uid>`` = user.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from .. import keys
from ..config import Settings
from ..errors import AppError, Exhausted
from ..store.base import Store


async def uid_of(store: Store, settings: Settings, user: str) -> int:
    """The uid of ``user``, given now if it has none yet."""
    got = await store.get(keys.TENANT.format(user=user))
    if got is not None:
        return int(got)
    lo, hi = settings.uid_range
    size = hi - lo + 1
    start = zlib.crc32(user.encode()) % size  # a stable first guess: few probes while the range is sparse
    for i in range(size):
        uid = lo + (start + i) % size
        key = keys.UID.format(uid=uid)
        if not await store.create(key, user) and await store.get(key) != user:
            continue
        if await store.create(keys.TENANT.format(user=user), str(uid)):
            return uid
        await store.delete(key)  # a concurrent launch gave the user another uid first
        return int(await store.get(keys.TENANT.format(user=user)) or 0)
    raise Exhausted(f"no uid left for user {user!r} in NAP_UID_RANGE {lo}-{hi}")


def give(folder: Path, uid: int) -> None:
    """Make ``folder`` (an instance's copy) the tenant's own: owned by its uid and gid, all of it, and
    closed to everyone else. Its parent stays the platform's and lets tenants pass through only."""
    try:
        os.chown(folder, uid, uid)
        os.chmod(folder, 0o700)
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)
        os.chmod(folder.parent, 0o711)
    except PermissionError as e:
        raise AppError(
            f"cannot give {folder.name} to its tenant's uid {uid} ({e.strerror}): the sandbox needs the "
            "platform to run as root (NAP_SANDBOX=off runs instances unisolated, for development only)"
        ) from None
