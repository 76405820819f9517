"""The local engine: ``nap agent`` supervises the instances on this host and runs exactly what each
unit says.

- ``engine.py``: the engine the workers and the API use, a client of the agent's socket;
- ``supervisor.py``: the agent's body (processes, restarts, journals, adoption after its restart);
- ``records.py``, ``proc.py``, ``linux.py``: its state files, processes, and Linux calls;
- ``http.py``: the agent's HTTP API and ``main``.
"""

from .engine import LocalEngine
from .http import main

__all__ = ["LocalEngine", "main"]
