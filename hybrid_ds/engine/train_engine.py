"""The trainable policy/value model as the phases see it: forward, backward at a stated
accumulation boundary, step with per-role learning rates; and what its state costs in memory.

Built by :meth:`hybrid_ds.engine.dist.Dist.prepare_trainable` around a DeepSpeed engine, a DDP
module or the bare model; ``dist`` is that :class:`~hybrid_ds.engine.dist.Dist`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional

import torch

from hybrid_ds.models.lora import adapters_disabled
from hybrid_ds.optim import set_optimizer_hparams

MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE = "model.pt", "optimizer.pt", "scaler.pt"  # save_state without DeepSpeed


class TrainEngine:
    """The policy/value model as the phases see it: forward, backward at a stated boundary, step.

    ``module`` is the plain (unwrapped) model; ``wrapped`` is what runs the forward (a DeepSpeed
    engine, a DDP module, or the model itself).
    """

    def __init__(self, dist, module: torch.nn.Module, wrapped: Any, optimizer: Any):
        self.dist, self.module, self.wrapped, self.optimizer = dist, module, wrapped, optimizer
        self._ddp_sync_ctx = None
        # fp16 without DeepSpeed: autocast computes in float16, whose small gradients underflow to 0
        # unless the loss is scaled up first; DeepSpeed scales its own (dynamic loss scale).
        fp16 = dist is not None and not dist.uses_deepspeed and dist.plan.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(dist.device.type) if fp16 else None

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def __call__(self, *args, **kwargs):
        with self.dist.autocast():
            return self.wrapped(*args, **kwargs)

    def train(self) -> None:
        self.wrapped.train()

    def eval(self) -> None:
        self.wrapped.eval()

    def no_sync(self, boundary: bool):
        """Context for the forward+backward of one micro-batch (DDP skips the all-reduce off-boundary)."""
        if not self.dist.uses_deepspeed and self.dist.world > 1 and not boundary:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Backward of an already-normalised micro-batch loss; ``boundary`` closes the accumulation."""
        if self.dist.uses_deepspeed:
            self.wrapped.set_gradient_accumulation_boundary(boundary)
            self.wrapped.backward(loss, scale_wrt_gas=False)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    @property
    def has_frozen(self) -> bool:
        """Whether part of the model is frozen (a LoRA base, models/lora.py): checkpoints then hold only
        the trainable parameters, and the frozen ones come from MODEL again on resume."""
        return any(not p.requires_grad for p in self.module.parameters())

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[torch.nn.Module]:
        """The policy's causal LM with its LoRA adapters off, i.e. the frozen base: the reference of
        a LoRA run, computed by the policy's own (under ZeRO-3 partitioned) weights, no second model."""
        with adapters_disabled(self.module.lm) as lm:
            yield lm

    def trainable_state_dict(self) -> Optional[dict]:
        """The trainable parameters, whole, on CPU, on the main process (None elsewhere); under ZeRO-3
        only these are gathered (collective: every rank calls it)."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        gather = contextlib.nullcontext()
        if self.dist.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        with gather:
            return {n: p.detach().cpu().clone() for n, p in named} if self.dist.is_main else None

    def save_state(self, path: str, tag: str) -> None:
        """Weights and optimizer state into directory ``path`` (collective: every rank calls it).
        DeepSpeed writes its shards under ``path/tag``; without it the main rank writes
        ``model.pt`` and ``optimizer.pt``. A frozen base is left out (:attr:`has_frozen`)."""
        if self.dist.uses_deepspeed:
            self.wrapped.save_checkpoint(path, tag=tag, save_latest=False, exclude_frozen_parameters=self.has_frozen)
        elif self.dist.is_main:
            sd = self.module.state_dict()
            if self.has_frozen:
                sd = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
            torch.save(sd, os.path.join(path, MODEL_FILE))
            torch.save(self.optimizer.state_dict(), os.path.join(path, OPTIMIZER_FILE))
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), os.path.join(path, SCALER_FILE))

    def load_state(self, path: str, tag: str, load: Callable[[str, torch.device], dict]) -> bool:
        """Restore what :meth:`save_state` wrote; ``load(file, device)`` reads our own files (the
        caller's verified loader). False when DeepSpeed found nothing to load."""
        frozen = self.has_frozen
        if self.dist.uses_deepspeed:
            loaded, _ = self.wrapped.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False, load_module_strict=not frozen)
            return loaded is not None
        result = self.module.load_state_dict(load(os.path.join(path, MODEL_FILE), self.dist.device), strict=not frozen)
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        missing = sorted(trainable & set(result.missing_keys))
        if frozen and (result.unexpected_keys or missing):
            raise RuntimeError(f"{os.path.join(path, MODEL_FILE)} does not fit the model: unexpected "
                               f"{result.unexpected_keys[:3]}, missing {missing[:3]}")
        self.optimizer.load_state_dict(load(os.path.join(path, OPTIMIZER_FILE), self.dist.device))
        if self.scaler is not None and os.path.isfile(os.path.join(path, SCALER_FILE)):
            self.scaler.load_state_dict(load(os.path.join(path, SCALER_FILE), torch.device("cpu")))
        return True

    def step(self, lrs: dict[str, float], momentum: Optional[float] = None) -> Optional[float]:
        """Apply the accumulated gradients with per-role learning rates (and a scheduled momentum,
        for onecycle/cyclic); returns the global gradient norm."""
        for role, lr in lrs.items():
            set_optimizer_hparams([g for g in self.optimizer.param_groups if g["role"] == role], lr, momentum)
        if self.dist.uses_deepspeed:
            self.wrapped.step()
            norm = self.wrapped.get_global_grad_norm()
            return float(norm) if norm is not None else None
        clip = self.dist.max_grad_norm
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and report the true gradient
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if not torch.isfinite(norm):  # run/faults.py: a non-finite gradient never reaches the
            if self.scaler is not None:  # weights (DeepSpeed skips such steps itself); under fp16
                self.scaler.update()  # the scale backs off, as DeepSpeed's does on an overflow
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def saved_weights(path: str, tag: str, deepspeed: bool) -> dict:
    """The fp32 weights :meth:`TrainEngine.save_state` wrote to ``path``, whole, on CPU. DeepSpeed
    shards are consolidated with DeepSpeed's own ``zero_to_fp32`` (its fp32 master weights,
    whatever the training precision)."""
    if deepspeed:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(path, tag=tag)
    return torch.load(os.path.join(path, MODEL_FILE), map_location="cpu", weights_only=True)


def model_state_bytes(engine: TrainEngine) -> dict[str, int]:
    """Bytes of model state this rank holds, each storage counted once (views share one).

    ``params``: the policy/value parameters as stored here (under ZeRO-3 this rank's partitions,
    not the gathered whole). ``optim``: the optimizer's state (Adam's moments) and the tensors it
    steps (DeepSpeed's fp32 master partitions). ``buffers``: whatever else DeepSpeed's optimizer
    holds (gradient partitions, the reduce bucket).
    """
    seen: set = set()

    def size(t) -> int:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return 0
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    def walk(obj, depth: int) -> int:
        if isinstance(obj, torch.Tensor):
            return size(obj)
        if depth == 0 or isinstance(obj, (str, bytes, int, float, torch.nn.Module)):
            return 0
        if isinstance(obj, dict):
            return sum(walk(v, depth - 1) for v in obj.values())
        if isinstance(obj, (list, tuple, set)):
            return sum(walk(v, depth - 1) for v in obj)
        if isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
            return sum(walk(v, depth - 1) for v in vars(obj).values())
        return 0

    params = sum(size(getattr(p, "ds_tensor", p.data)) for p in engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed wraps the torch optimizer
    optim = walk(inner.state, 3) + walk([g["params"] for g in inner.param_groups], 3)
    return {"params": params, "optim": optim, "buffers": walk(engine.optimizer, 5)}
