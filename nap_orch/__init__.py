"""nap-orch: the control plane of a small PaaS (the nap interface as a job-queue orchestrator)."""

__version__ = "0.1.0"
