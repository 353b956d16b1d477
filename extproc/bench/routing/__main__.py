"""``python -m extproc.bench.routing [options]``: the benchmark without the `extproc bench` wiring."""

import sys

from extproc.bench.routing.command import main

sys.exit(main())
