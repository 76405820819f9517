"""Empty files made ahead of time: what both engines' daemons use where they need many new files fast."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("nap.files")


class FilePool:
    """Empty files made ahead of time, renamed into place when an instance needs a file.

    Creating a file means allocating an inode, and ext4 skips the inodes freed in the last 30 s
    (``recently_deleted``): with thousands of those nearby (a test suite's temporary files, a removed
    batch) a create costs 0.2-0.7 ms here instead of 20 us, and five files for each of 1000 instances
    took seconds. A rename costs ~15 us. A background thread keeps the pool filled, and the files of
    removed instances are emptied and come back here instead of being deleted.
    """

    def __init__(self, directory: str, target: int):
        self.dir = directory
        self.target = target
        os.makedirs(directory, exist_ok=True)
        self.free = os.listdir(directory)
        self.count = 0
        self.prefix = f"{os.getpid()}-{time.time_ns()}-"
        self.filling: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None

    def _new_name(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"

    def place(self, dest: str) -> None:
        """Make sure ``dest`` exists: a spare renamed to it, or a new file (an existing one is kept)."""
        if os.path.exists(dest):
            return
        while self.free:
            name = self.free.pop()
            try:
                os.rename(f"{self.dir}/{name}", dest)
                return
            except FileNotFoundError:
                continue
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))

    def recycle(self, path: str) -> None:
        """Take back an instance's file (emptied), or delete it when the pool is full."""
        try:
            if len(self.free) >= 2 * self.target:
                os.unlink(path)
                return
            os.truncate(path, 0)
            name = self._new_name()
            os.rename(path, f"{self.dir}/{name}")
            self.free.append(name)
        except FileNotFoundError:
            pass

    def refill(self) -> None:
        if self.filling is None and len(self.free) < self.target:
            self.filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="nap-spare", initializer=_lower_priority)
        loop = asyncio.get_running_loop()
        try:
            while len(self.free) < self.target:
                names = [self._new_name() for _ in range(min(256, self.target - len(self.free)))]
                await loop.run_in_executor(self.executor, _create_files, self.dir, names)
                self.free[:0] = names  # at the bottom: place() takes the recycled ones first
        except OSError as e:
            log.warning("could not make spare files in %s: %s", self.dir, e)
        finally:
            self.filling = None

    def close(self) -> None:
        if self.filling is not None:
            self.filling.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
    except OSError:
        pass


def _create_files(directory: str, names: list[str]) -> None:
    for name in names:
        os.close(os.open(f"{directory}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))
