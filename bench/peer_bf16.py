"""Run a peer script (``../shared/bench-peers``) in bfloat16: ``python bench/peer_bf16.py SCRIPT [ARGS ...]``.

The peers build their extra modules in torch's default dtype (floor_bench.py's value head, TRL 0.11's
``ValueHead``) and load the model in the dtype it was saved in (bench/matrix.py saves a bf16 copy),
so bfloat16 as the default dtype makes the whole peer bf16 without editing it. Used by the matrix's
bf16 rows; bf16 weights and AdamW states throughout (no fp32 master copy).
"""

import os
import runpy
import sys

import torch

if __name__ == "__main__":
    torch.set_default_dtype(torch.bfloat16)
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
