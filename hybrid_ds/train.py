"""``python -m hybrid_ds.train cfg.json [KEY=VALUE ...] [--dry-run]``: the command line is
:mod:`hybrid_ds.run.cli`. Imported, this module is also callable as ``hybrid_ds.train(config, ...)``
(see the comment in ``hybrid_ds/__init__.py``)."""

import sys
import types

from hybrid_ds.run.cli import main


class _CallableModule(types.ModuleType):
    def __call__(self, config, overrides=None, *, reward_fns=None):
        from hybrid_ds.run.api import train

        return train(config, overrides, reward_fns=reward_fns)


if __name__ == "__main__":
    sys.exit(main())
else:  # imported (the console script, ``import hybrid_ds.train``): stays callable as hybrid_ds.train(...)
    sys.modules[__name__].__class__ = _CallableModule
