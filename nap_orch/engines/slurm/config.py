"""The Slurm engine's own settings: ``NAP_SLURM_*`` (``SLURM_CONF`` names the cluster, as for Slurm's
own commands)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...config import read_env


@dataclass(frozen=True)
class SlurmSettings:
    # The partition jobs go to (empty: the cluster's default).
    partition: str = ""
    # The folder of Slurm's client commands (empty: PATH).
    bin: str = ""
    # Extra environment of MPI runs, "NAME=value NAME=value" (e.g. OMPI_MCA_btl=self,tcp where several
    # slurmd "nodes" share one host, so that Open MPI's shared-memory segment names don't collide).
    mpi_env: str = ""
    # How often the reconciler (``nap agent`` on this engine) looks at Slurm while nothing is starting.
    poll: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmSettings:
        return read_env(cls, "NAP_SLURM_", env)
