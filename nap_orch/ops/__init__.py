"""The domain operations: deploy an app, start common instances and MPI runs, and what users do with
instances. Plain async functions on a ``context.Context`` (what a job gives them) or
``context.Resources`` (settings, state store, engine): the actors in ``nap_orch.jobs`` and the API
call them, and tests can too, without a queue.
"""
