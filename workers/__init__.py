"""The dramatiq entry point the design names: ``dramatiq workers`` (or ``nap worker``) imports the
actors from here. They live in ``nap_orch.jobs.actors``; the work is in ``nap_orch.ops``."""

from nap_orch.jobs.actors import broker, deploy, start_common, start_mpi

__all__ = ["broker", "deploy", "start_common", "start_mpi"]
