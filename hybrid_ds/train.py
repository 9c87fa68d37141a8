"""``python -m hybrid_ds.train cfg.json [KEY=VALUE ...] [--dry-run]``: the command line is
:mod:`hybrid_ds.run.cli`."""

import sys

from hybrid_ds.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
