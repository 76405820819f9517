"""How much a folder holds: the one walk that quotas and the git fetcher's watchdog share."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path


def tree_bytes(folder: Path, allocated: bool = False) -> int:
    """Bytes under ``folder``, links not followed, tolerating files that vanish meanwhile (git renames
    its temporary files): the files' sizes, or with ``allocated`` the blocks they take on disk (as
    ``du``, directories included)."""
    total = 0
    pending = [str(folder)]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    with suppress(OSError):
                        st = entry.stat(follow_symlinks=False)
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                            total += st.st_blocks * 512 if allocated else 0
                        else:
                            total += st.st_blocks * 512 if allocated else st.st_size
        except OSError:
            continue
    return total
