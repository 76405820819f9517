"""The engines by name (``NAP_ENGINE``): each is one package with its ``Engine`` and its daemon's
``main`` (what ``nap agent`` runs: the local agent, or the Slurm reconciler)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings
from . import local, slurm
from .base import Engine


@dataclass(frozen=True)
class EngineKind:
    engine: Callable[[Settings], Engine]
    daemon: Callable[[], None]  # runs until SIGTERM or SIGINT, with ``Settings.from_env()``


ENGINES: dict[str, EngineKind] = {
    "local": EngineKind(local.LocalEngine, local.main),
    "slurm": EngineKind(slurm.SlurmEngine, slurm.main),
}


def kind(settings: Settings) -> EngineKind:
    try:
        return ENGINES[settings.engine]
    except KeyError:
        raise ValueError(f"unknown engine {settings.engine!r} ({' or '.join(ENGINES)})") from None


def open_engine(settings: Settings) -> Engine:
    """The engine ``settings`` name (not yet opened)."""
    return kind(settings).engine(settings)


def run_daemon(settings: Settings) -> None:
    """What ``nap agent`` runs for the engine ``settings`` name."""
    kind(settings).daemon()
