#!/usr/bin/env python3
"""``python -m cndiff`` with one check turned off: a batch may name one file twice.

bench.py's ``cndiff-batch`` row converts eight hard links of the one generated control
file (eight copies of a 5.7 GB file would take 46 GB of disk). Since cndiff refuses a
file named twice, by inode (``cndiff.commands.runner.refuse_repeats``, imported into
``cndiff.commands.extract``), this wrapper replaces that check in ``extract`` with a
no-op and runs the command line as ``python -m cndiff`` does; nothing else changes.

    python benchmarks/batch_links.py batch FOLDER BASE -o OUT [options]
"""

from __future__ import annotations

import sys


def main() -> int:
    from cndiff.commands import extract

    if not hasattr(extract, "refuse_repeats"):
        print(
            "batch_links.py: cndiff.commands.extract.refuse_repeats is gone; update this "
            "wrapper to the library's current duplicate check",
            file=sys.stderr,
        )
        return 2
    extract.refuse_repeats = lambda paths: None  # the eight links are one file, on purpose
    from cndiff.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
