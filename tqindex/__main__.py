"""``python -m tqindex``: the same as the ``tqindex`` command (see tqindex.cli)."""

import sys

from tqindex.cli import main

sys.exit(main())
