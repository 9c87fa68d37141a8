"""``python -m hybrid_ds.config --docs``: print docs/config.md, generated from the config dataclasses."""

import sys

from hybrid_ds.config import config_reference_markdown

if sys.argv[1:] == ["--docs"]:
    sys.stdout.write(config_reference_markdown())
else:
    print("usage: python -m hybrid_ds.config --docs")
    sys.exit(2)
