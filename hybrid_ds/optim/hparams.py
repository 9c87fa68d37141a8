"""Small pieces both the optimizer and the schedule side use: writing a phase's learning rate
(and momentum) into parameter groups, and the unknown-name message with its suggestion."""

from __future__ import annotations

import difflib
from typing import Optional
def unknown_name(kind: str, key: str, name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return f"{key}: {name!r} is not a known {kind}.{hint} Valid: {', '.join(valid)}."


def set_optimizer_hparams(param_groups, lr: float, momentum: Optional[float] = None) -> None:
    """Write ``lr`` (and a cycled ``momentum``: beta1 of Adam/Lion/AdEMAMix, SGD/RMSprop momentum)
    into every parameter group."""
    for g in param_groups:
        g["lr"] = lr
        if momentum is None:
            continue
        if "betas" in g:
            g["betas"] = (momentum, *tuple(g["betas"])[1:])
        elif "momentum" in g:
            g["momentum"] = momentum
        else:
            raise ValueError(f"parameter group without betas or momentum (keys {sorted(g)}): cannot cycle momentum.")
