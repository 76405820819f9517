"""Instances: ``launch.py`` (what every launch takes), ``common.py`` (start_common), ``mpi.py``
(start_mpi, MPI runs), ``manage.py`` (status, port, stop, start, profile of one instance)."""
