"""What the agent keeps about an instance across its own restarts: ``state/<name>.json``.

Records are small JSON objects overwritten in place with one write, neither fsynced nor replaced by a
rename: creating inodes is what costs (see ``engines.files.FilePool``), and a record must survive the
agent, not the host (the instances don't either).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

from ..base import RUNNING, STARTING


@dataclass
class Record:
    """What the agent keeps about an instance across its own restarts (``state/<name>.json``)."""

    desired: str = RUNNING  # running | stopped
    state: str = STARTING
    pid: int | None = None
    starttime: int | None = None  # /proc/<pid>/stat field 22: tells a reused pid apart
    started_at: float | None = None  # wall time the current or last process started
    restarts: int = 0  # automatic restarts since the last start by a user
    failures: int = 0  # restarts in a row: the backoff step and the limit's count
    exit_code: int | None = None
    since: float = field(default_factory=time.time)
    message: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()


def write_record(path: str, data: bytes) -> None:
    """Overwrite a small JSON record in place with one write. If the agent dies before the truncation,
    ``read_record`` ignores the rest of the old, longer record."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def read_record(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data, _ = json.JSONDecoder().raw_decode(f.read())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
