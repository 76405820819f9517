"""``python -m nap_orch.cli ...``: the ``nap`` command line, as ``python -m nap_orch``."""

import sys

from . import main

sys.exit(main())
