"""``python -m tests.support.cleanup USER...`` (run with a stack's environment): remove every instance of
those users from the stack's engine, and their port reservations, so that a test leaves no jobs or
processes behind for the next one. It uses the engine's own ``remove`` (what a launch's rollback uses).
"""

from __future__ import annotations

import asyncio
import sys

from nap_orch import keys
from nap_orch.config import Settings
from nap_orch.engines.registry import open_engine
from nap_orch.store import open_store


async def remove_all(users: list[str]) -> int:
    settings = Settings.from_env()
    engine = await open_engine(settings).open()
    removed = 0
    try:
        async with open_store(settings) as store:
            for user in users:
                names = [st.name for st in await engine.instances(f"{user}_")]
                for i in range(0, len(names), 500):
                    await engine.remove(names[i : i + 500])
                removed += len(names)
                held = await store.get_prefix(keys.PORT_RESERVATION.partition("{host}")[0])  # every host's
                await store.delete_many([k for k, holder in held.items() if holder.startswith(f"{user}_")])
    finally:
        await engine.close()
    return removed


if __name__ == "__main__":
    print(asyncio.run(remove_all(sys.argv[1:])))
