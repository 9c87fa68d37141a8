"""``python -m hybrid_ds.checkpoint export CKPT_DIR OUT_DIR``: a checkpoint as plain HF weights.

The checkpoint code itself is :mod:`hybrid_ds.run.checkpoint`; export is :mod:`hybrid_ds.run.export`."""

import sys

from hybrid_ds.run.export import main

if __name__ == "__main__":
    sys.exit(main())
