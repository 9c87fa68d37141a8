"""``python -m hybrid_ds.report OUTPUT_DIR``: a run's metric trends (:mod:`hybrid_ds.run.report`)."""

import sys

from hybrid_ds.run.report import main

if __name__ == "__main__":
    sys.exit(main())
