"""Engines run rendered units somewhere: fleet's old role.

``base.py`` is the seam every engine implements; ``registry.py`` maps ``NAP_ENGINE`` to an engine and
its daemon (what ``nap agent`` runs). Each engine is one package that owns everything it runs
(``local/``, ``slurm/``); what they share is beside them: the restart decision (``restarts.py``), the
port allocator (``ports.py``), the instance sandbox (``sandbox.py``) and its control group
(``cgroups.py``), journal lines (``journal.py``), spare files (``files.py``) and the daemon's plumbing
(``daemon.py``). No engine imports another.
"""
