"""``python -m hybrid_ds.optim --docs``: print docs/optim.md, generated from the optimizer and scheduler tables."""

import sys

from hybrid_ds.optim import optim_reference_markdown

if sys.argv[1:] == ["--docs"]:
    sys.stdout.write(optim_reference_markdown())
else:
    print("usage: python -m hybrid_ds.optim --docs")
    sys.exit(2)
