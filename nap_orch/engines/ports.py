"""The port allocator: one port per instance on a host, reserved atomically in the state store.

A reservation is the key ``/nap/ports/<host>/<port>`` whose value is the instance holding it; it is
made with the store's create-if-absent, so concurrent launches (and the Slurm reconciler) never hand
one port to two instances. Hosts that share an address share their ports (several slurmd "nodes" on
one machine): a port held on any of them is taken on all. The launch code reserves on the host it
knows before submitting (the local engine); the Slurm reconciler reserves on the node a job landed on.

``choose`` is the pure part: which port each name should try, given what is taken.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import keys
from ..store.base import Store


def choose(
    names: Iterable[str],
    taken: set[int],
    port_range: tuple[int, int],
    prefer: dict[str, int | None] | None = None,
    usable: Callable[[int], bool] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """A candidate port for each name, none of them in ``taken``, and the names left without one.

    A name's preferred port (its last one) is taken when it is in the range, free and usable; otherwise
    the lowest free usable port. ``taken`` is updated with the ports chosen.
    """
    lo, hi = port_range
    prefer = prefer or {}
    got: dict[str, int] = {}
    missing: list[str] = []
    nxt = lo
    for name in names:
        pref = prefer.get(name)
        if pref is not None and lo <= pref <= hi and pref not in taken and (usable is None or usable(pref)):
            port: int | None = pref
        else:
            port = None
            while nxt <= hi:
                candidate = nxt
                nxt += 1
                if candidate not in taken and (usable is None or usable(candidate)):
                    port = candidate
                    break
        if port is None:
            missing.append(name)
            continue
        taken.add(port)
        got[name] = port
    return got, missing


def bindable(host: str) -> Callable[[int], bool]:
    """A check that a port is free on this machine's ``host`` address right now (nothing else listens)."""

    def check(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return True
            except OSError:
                return False

    return check


@dataclass
class Reserved:
    """The outcome of a reservation: the port of each name that got one (``fresh``: those reserved by
    this call, not already held), and the names left without one (the range is exhausted)."""

    ports: dict[str, int] = field(default_factory=dict)
    fresh: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


class Ports:
    """Reservations of ports in ``port_range`` in a state store."""

    def __init__(self, store: Store, port_range: tuple[int, int], in_flight: int = 64):
        self.store = store
        self.range = port_range
        self.in_flight = in_flight  # reservations sent at once

    async def holders(self, host: str) -> dict[int, str]:
        """The ports reserved on ``host`` and the instance holding each."""
        found = await self.store.get_prefix(keys.PORTS_OF_HOST.format(host=host))
        return {int(key.rsplit("/", 1)[1]): holder for key, holder in found.items()}

    async def reserve(
        self,
        host: str,
        names: list[str],
        *,
        siblings: Iterable[str] = (),
        prefer: dict[str, int | None] | None = None,
        usable: Callable[[int], bool] | None = None,
    ) -> Reserved:
        """A port on ``host`` for each name: the one it already holds there (a retry, an instance
        started again), else its preferred one if free, else the lowest free one. Ports held on
        ``siblings`` (hosts of the same address) count as taken. Idempotent for a given holder."""
        out = Reserved()
        taken: set[int] = set()
        for other in {host, *siblings}:
            for port, holder in (await self.holders(other)).items():
                taken.add(port)
                if other == host and holder in names:
                    out.ports[holder] = port
        want = [n for n in names if n not in out.ports]
        while want:
            got, missing = choose(want, taken, self.range, prefer, usable)
            out.missing += missing
            items = list(got.items())
            created = await self.store.create_many(
                [(keys.PORT_RESERVATION.format(host=host, port=p), name) for name, p in items], self.in_flight
            )
            for (name, port), ok in zip(items, created):
                if ok:
                    out.ports[name] = out.fresh[name] = port
            # Lost races (another reservation took the port first) try again with the next free ones.
            want = [name for (name, _), ok in zip(items, created) if not ok]
            prefer = None
        return out

    async def release(self, host: str, ports: Iterable[int]) -> None:
        """Drop the reservations of ``ports`` on ``host`` (those a caller reserved itself)."""
        await self.store.delete_many([keys.PORT_RESERVATION.format(host=host, port=p) for p in ports])

    async def release_held(self, held: Iterable[tuple[str, int, str]]) -> None:
        """Drop the reservations ``(host, port, holder)`` that ``holder`` still holds (the port may
        have gone to another instance since)."""
        held = list(held)
        if not held:
            return
        now = await self.store.get_many([keys.PORT_RESERVATION.format(host=h, port=p) for h, p, _ in held])
        await self.store.delete_many(
            [
                keys.PORT_RESERVATION.format(host=h, port=p)
                for (h, p, holder), current in zip(held, now)
                if current == holder
            ]
        )

    async def free(self, hosts: Iterable[str]) -> int:
        """How many ports of the range are free on every one of ``hosts`` (hosts of one address)."""
        lo, hi = self.range
        taken: set[int] = set()
        for host in hosts:
            taken.update(p for p in await self.holders(host) if lo <= p <= hi)
        return hi - lo + 1 - len(taken)
