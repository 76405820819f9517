"""The ``nap`` command line (``main.py``), its HTTP client of the API (``client.py``) and ``nap up``
(``up.py``)."""

from .main import main

__all__ = ["main"]
