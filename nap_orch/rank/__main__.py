"""``python -m nap_orch.rank master|slave ...``: see the package's docstring."""

import sys

from . import main

sys.exit(main())
