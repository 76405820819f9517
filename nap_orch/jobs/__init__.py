"""The job model: records and their event streams (``records.py``), dramatiq's configuration
(``broker.py``), attempts, states and cancellation (``runner.py``) and the actors (``actors.py``)."""
