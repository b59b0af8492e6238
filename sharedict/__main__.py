"""``python -m sharedict``: the same as the ``sharedict`` command."""

import sys

from sharedict.api.cli import main

sys.exit(main())
