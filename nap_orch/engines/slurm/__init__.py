"""The Slurm engine (``NAP_ENGINE=slurm``): instances as jobs of a real Slurm cluster.

- ``engine.py``: the engine (units translated into jobs; status, stop, start, remove, journal);
- ``scripts.py``: the batch scripts; ``cli.py``: Slurm's commands; ``config.py``: ``NAP_SLURM_*``;
- ``records.py``: what the engine and the reconciler keep; ``observe.py``: what they make of it;
- ``reconciler.py``: what ``nap agent`` runs on this engine (ports, restarts, cancels) and ``main``.
"""

from .engine import SlurmEngine
from .reconciler import main

__all__ = ["SlurmEngine", "main"]
