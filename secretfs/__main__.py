"""``python -m secretfs`` is the ``secretfs`` command."""

import sys

from secretfs.cli import main

sys.exit(main())
