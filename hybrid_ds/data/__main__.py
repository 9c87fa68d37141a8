"""``python -m hybrid_ds.data --docs``: print docs/data.md, rendered by the data code itself."""

import sys

from hybrid_ds.data.reference import data_reference_markdown

if sys.argv[1:] == ["--docs"]:
    sys.stdout.write(data_reference_markdown())
else:
    print("usage: python -m hybrid_ds.data --docs")
