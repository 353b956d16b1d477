"""``python -m extproc.bench.peers [options]``: the same as ``extproc bench peers [options]``."""

import sys

from extproc.cli import main

sys.exit(main(["bench", "peers", *sys.argv[1:]]))
