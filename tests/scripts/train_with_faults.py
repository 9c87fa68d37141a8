"""``python -m hybrid_ds.train`` with the faults of tests/fault_injection.py named in the environment
(``HYBRID_DS_FAULT_<NAME>=value``). Runs under any launcher: ``python tests/scripts/train_with_faults.py
cfg.json`` or ``accelerate launch ... tests/scripts/train_with_faults.py cfg.json``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import fault_injection  # noqa: E402

from hybrid_ds.train import main  # noqa: E402

if __name__ == "__main__":
    fault_injection.install(fault_injection.from_env())
    sys.exit(main())
