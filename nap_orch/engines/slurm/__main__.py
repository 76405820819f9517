"""``python -m nap_orch.engines.slurm``: the reconciler (what ``nap agent`` runs on the Slurm engine)."""

from .reconciler import main

main()
