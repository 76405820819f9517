"""``python -m nap_orch ...``: the ``nap`` command line."""

import sys

from .cli import main

sys.exit(main())
