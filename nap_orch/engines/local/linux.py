"""Linux calls the agent makes through ctypes: hole punching (``fallocate``) and inotify."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2


def punch_hole(path: str, length: int) -> bool:
    """Free the first ``length`` bytes of a file without moving its end (the writer appends on)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        return _libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(length)) == 0
    finally:
        os.close(fd)


class Inotify:
    """Modify events for the files of one directory (inotify through ctypes); None where unsupported."""

    IN_MODIFY, IN_Q_OVERFLOW = 0x2, 0x4000
    HEADER = struct.Struct("iIII")

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def watch(cls, directory: str) -> Inotify | None:
        try:
            fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            if _libc.inotify_add_watch(fd, str(directory).encode(), cls.IN_MODIFY) < 0:
                os.close(fd)
                return None
            return cls(fd)
        except (OSError, AttributeError):
            return None

    def read(self) -> set[str] | None:
        """Names of the files written since the last read; None if events were lost."""
        names: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            pos = 0
            while pos < len(data):
                _wd, mask, _cookie, size = self.HEADER.unpack_from(data, pos)
                pos += self.HEADER.size
                if mask & self.IN_Q_OVERFLOW:
                    return None
                names.add(data[pos : pos + size].rstrip(b"\0").decode(errors="replace"))
                pos += size

    def close(self) -> None:
        os.close(self.fd)
