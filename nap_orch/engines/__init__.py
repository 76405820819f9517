"""Engines run rendered units somewhere: ``local`` (the nap agent on this host) or ``slurm``."""

from __future__ import annotations

from ..config import Settings
from .base import Engine, InstanceStatus, UnitSpec


def open_engine(settings: Settings) -> Engine:
    if settings.engine == "local":
        from .local import LocalEngine

        return LocalEngine(settings)
    if settings.engine == "slurm":
        from .slurm import SlurmEngine

        return SlurmEngine(settings)
    raise ValueError(f"unknown engine {settings.engine!r} (local or slurm)")


__all__ = ["Engine", "InstanceStatus", "UnitSpec", "open_engine"]
