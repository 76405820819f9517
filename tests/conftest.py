"""The tests: ``unit/`` (no daemons, seconds), ``integration/`` (real Redis, etcd, agents, workers, APIs,
Slurm clusters and MPI runs that they start themselves), ``support/`` (what both use)."""

pytest_plugins = ["tests.support.fixtures"]
