"""``python -m nap_orch.engines.local``: the nap agent (what ``nap agent`` runs on the local engine)."""

from .http import main

main()
