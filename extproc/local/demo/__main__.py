"""``python -m extproc.local.demo``: the same command as ``extproc demo``."""

import sys

from extproc.local.demo.command import main

sys.exit(main())
