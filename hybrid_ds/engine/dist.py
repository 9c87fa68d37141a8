"""The one seam for everything distributed.

Process groups, Accelerate, DeepSpeed, gathering ZeRO-3 weights for generation, preparing frozen
models, all-reducing metrics, barriers and main-process checks live here and nowhere else: phase
code never imports torch.distributed, accelerate or deepspeed.

Launchers: ``accelerate launch`` (its config decides DeepSpeed), ``deepspeed --module`` (ZeRO-2
unless ZERO_STAGE/DS_CONFIG say otherwise), ``torchrun`` and plain ``python`` (no DeepSpeed unless
asked). CPU uses gloo and GPU uses NCCL; that choice is the only device-specific branch.

Gradient accumulation is owned by the trainer, not by DeepSpeed's micro-step counter: the SFT and
PPO phases accumulate different numbers of micro-batches, so every backward states whether it
closes an accumulation window (``TrainEngine.backward(loss, boundary)``) and losses arrive already
normalised (DeepSpeed's own 1/GAS scaling is switched off).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch

from hybrid_ds.config import Config
from hybrid_ds.engine.launch_plan import LaunchPlan, fill_ds_config, hidden_size_of, plan_launch
from hybrid_ds.engine.train_engine import TrainEngine, model_state_bytes
from hybrid_ds.engine.shm import SHM_DIR, remove_shm_segments
from hybrid_ds.models.weight_mix import mix_into
from hybrid_ds.engine.trackers import end_trackers, tracker_objects

# --------------------------------------------------------------------------------------
# the distributed context


@dataclass
class Dist:
    """Rank, world, device and the collectives the phases use."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    plan: LaunchPlan
    accelerator: Any = None
    ds_config: Optional[dict] = None
    max_grad_norm: float = 1.0
    ds_engines: list = field(default_factory=list)  # DeepSpeed engines prepared here, destroyed at shutdown

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:  # nccl on GPU, gloo on CPU; "none" for one plain process
        return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"

    @property
    def zero_stage(self) -> int:
        return self.plan.zero_stage

    @property
    def uses_deepspeed(self) -> bool:
        return self.plan.zero_stage > 0

    @property
    def initialized(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    # -- collectives --------------------------------------------------------------------
    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.initialized or self.world == 1:
            return t.clone()
        out = t.detach().clone().to(self.device)
        torch.distributed.all_reduce(out, op=op)
        return out.to(t.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor on t's device)."""
        return self._all_reduce(t, torch.distributed.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Max of ``t`` over ranks (a new tensor on t's device)."""
        return self._all_reduce(t, torch.distributed.ReduceOp.MAX)

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when every rank is ok (an all-reduce, so also a barrier)."""
        return float(self.all_reduce_max(torch.tensor([0.0 if ok else 1.0]))[0]) == 0.0

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.initialized or self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks in one collective (same keys on every rank)."""
        if not metrics or self.world == 1 or not self.initialized:
            return dict(metrics)
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        t = self.all_reduce_sum(t) / self.world
        return dict(zip(keys, t.tolist()))

    def sum_counts(self, counts: dict[str, float]) -> dict[str, float]:
        """Counters summed over ranks, whose keys may differ (a counter appears on the ranks where it
        counted, e.g. ``reward/faults/<type>``): the key sets are united first (one object all-gather),
        then the values summed in one all-reduce."""
        if self.world == 1 or not self.initialized:
            return dict(counts)
        names: list = [None] * self.world
        torch.distributed.all_gather_object(names, sorted(counts))
        keys = sorted(set().union(*names))
        t = torch.tensor([float(counts.get(k, 0.0)) for k in keys], dtype=torch.float64)
        return dict(zip(keys, self.all_reduce_sum(t).tolist())) if keys else {}

    def memory_metrics(self, engine: Optional["TrainEngine"] = None) -> dict[str, float]:
        """Peak memory of every rank, ``mem/peak_rss_mb/rank{r}`` (host RSS) and on CUDA
        ``mem/peak_gpu_mb/rank{r}`` (allocator peak), and with ``engine`` the model state it holds,
        ``mem/params_mb/rank{r}``, ``mem/optim_mb/rank{r}`` and ``mem/buffers_mb/rank{r}``
        (:func:`model_state_bytes`), gathered in one all-reduce."""
        mine = {"mem/peak_rss_mb": peak_rss_mb()}
        if engine is not None:
            mine.update({f"mem/{k}_mb": v / 2**20 for k, v in model_state_bytes(engine).items()})
        if self.device.type == "cuda":
            mine["mem/peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        keys = sorted(mine)
        table = torch.zeros(len(keys), self.world, dtype=torch.float64)
        table[:, self.rank] = torch.tensor([mine[k] for k in keys], dtype=torch.float64)
        table = self.all_reduce_sum(table)
        return {f"{k}/rank{r}": float(table[i, r]) for i, k in enumerate(keys) for r in range(self.world)}

    def cleanse(self) -> None:
        """Free cached allocator blocks between phases (GPU only)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- models -------------------------------------------------------------------------
    def prepare_trainable(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> "TrainEngine":
        if self.uses_deepspeed:
            if self.zero_stage == 3 and self.plan.mixed_precision != "no":
                # Modules built after the partitioned load (the value head) join in the same dtype.
                dtype = torch.bfloat16 if self.plan.mixed_precision == "bf16" else torch.float16
                for p in model.parameters():
                    if not hasattr(p, "ds_id"):
                        p.data = p.data.to(dtype)
            engine, _ = self.accelerator.prepare(model, optimizer)
            self.ds_engines.append(engine)
            return TrainEngine(self, model, engine, engine.optimizer)
        model = model.to(self.device)
        wrapped = self.accelerator.prepare_model(model) if self.world > 1 else model
        return TrainEngine(self, model, wrapped, optimizer)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the reference): eval mode, no grad, no optimizer; sharded under ZeRO-3."""
        model.eval().requires_grad_(False)
        if self.zero_stage == 3:
            import deepspeed

            ds = {"train_micro_batch_size_per_gpu": self.ds_config["train_micro_batch_size_per_gpu"],
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "bf16": {"enabled": self.plan.mixed_precision == "bf16"},
                  "fp16": {"enabled": self.plan.mixed_precision == "fp16"}, "steps_per_print": 10**9}
            engine, *_ = deepspeed.initialize(model=model, config=ds)
            self.ds_engines.append(engine)
            engine.eval()
            return engine
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.plan.mixed_precision)
        model = model.to(self.device)
        return model.to(dtype) if dtype is not None and self.uses_deepspeed else model

    @contextlib.contextmanager
    def gathered(self, module: torch.nn.Module) -> Iterator[None]:
        """Under ZeRO-3, all of ``module``'s weights whole on every rank, gathered once (for generation)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    @torch.no_grad()
    def copy_weights(self, src: torch.nn.Module, dst: torch.nn.Module, alpha: float = 1.0) -> None:
        """Overwrite ``dst``'s weights with ``src``'s (same architecture), e.g. policy -> reference;
        ``alpha < 1`` mixes instead: ``dst = alpha * src + (1 - alpha) * dst`` (in ``dst``'s dtype,
        :func:`hybrid_ds.models.weight_mix.mix_into`).

        Under ZeRO-3 both are partitioned the same way over the same ranks, so each rank copies its
        own partitions and nothing is gathered."""
        dst_module = getattr(dst, "module", dst)  # a DeepSpeed inference engine wraps the model
        src_p = dict(src.named_parameters())
        for name, p in dst_module.named_parameters():
            s = src_p[name]
            d, new = (p.ds_tensor.data, s.ds_tensor.data) if hasattr(p, "ds_tensor") else (p.data, s.data)
            mix_into(d, new, alpha)  # the arithmetic a separate reference applies too

    @contextlib.contextmanager
    def generation_model(self, engine: "TrainEngine") -> Iterator[torch.nn.Module]:
        """The policy's causal LM, ready for ``generate``. Under ZeRO-3 its weights are gathered once
        for the whole rollout (:func:`_zero3_whole_weights`) and the partition hooks are lifted, so no
        collective runs per token and ranks that stop at different lengths cannot hang."""
        if self.zero_stage == 3:
            with _zero3_whole_weights(engine.wrapped, engine.module, self.device):
                yield engine.module.lm
        else:
            yield engine.module.lm

    # -- checkpoints (hybrid_ds/run/checkpoint.py): the frozen reference when it is a snapshot -----------
    def frozen_state_dict(self, model: torch.nn.Module) -> Optional[dict]:
        """A frozen model's whole state dict on the main process (gathered under ZeRO-3), None elsewhere."""
        module = getattr(model, "module", model)  # a DeepSpeed inference engine wraps the model
        with self.gathered(module):
            sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.is_main else None
        return sd

    @torch.no_grad()
    def load_frozen_state_dict(self, model: torch.nn.Module, state: dict) -> None:
        """Overwrite a frozen model's weights from a whole state dict that every rank holds."""
        module = getattr(model, "module", model)
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                if self.is_main:
                    module.load_state_dict(state)
        else:
            module.load_state_dict(state)
    # -- end checkpoints -----------------------------------------------------------------------------

    def full_state_dict(self, engine: "TrainEngine") -> Optional[dict]:
        """The whole model's state dict on the main process (ZeRO-3 consolidated), None elsewhere."""
        if self.uses_deepspeed:
            sd = self.accelerator.get_state_dict(engine.wrapped)
        else:
            sd = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
        return sd if self.is_main else None

    def autocast(self):
        """Autocast for the non-DeepSpeed path; DeepSpeed casts the model itself."""
        if self.uses_deepspeed or self.plan.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.plan.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def shutdown(self) -> None:
        """Release the DeepSpeed engines, destroy every process group and remove this run's
        shared-memory segments (idempotent).

        Order matters: DeepSpeed's engines (ZeRO-3's parameter hooks and prefetch state) go first,
        while the groups they use still exist; then the groups, while the interpreter is whole. A
        gloo group left to interpreter teardown can have its C++ worker threads destroyed unjoined
        ("terminate called without an active exception", SIGABRT)."""
        for engine in self.ds_engines:
            try:
                engine.destroy()
            except Exception:  # pragma: no cover - best effort at exit
                pass
        self.ds_engines.clear()
        end_trackers(self.accelerator)  # REPORT_TO's (Accelerate's end_training also ends the group)
        if self.initialized:
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # pragma: no cover - best effort at exit
                pass
        remove_shm_segments(own=True)


@contextlib.contextmanager
def _zero3_whole_weights(ds_engine, module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Every ZeRO-3 parameter of ``module`` whole on every rank, with DeepSpeed's fetch hooks off.

    One all-gather (``all_gather_single``, torch 2.13's name for ``all_gather_into_tensor``) of each rank's
    partitions laid end to end, then each parameter rebuilt from its ``world`` slices (rank r's slice of a
    flattened parameter sits at ``r * partition_size``). DeepSpeed's ``GatheredParameters`` does the same with
    per-parameter bookkeeping that doubles its cost on small models (bench/bench_zero.py); where its layout
    differs (mixed dtypes, hpZ secondary partitions, partitions off the compute device: parameter offload)
    its own ``unwrap_model_for_generation`` runs instead. On exit the placeholders and hooks come back.
    """
    import torch.distributed as tdist

    params = [p for p in module.parameters() if hasattr(p, "ds_tensor")]
    if (not params or len({p.ds_tensor.dtype for p in params}) != 1
            or any(getattr(p, "ds_secondary_tensor", None) is not None for p in params)
            or any(p.ds_tensor.device != device for p in params)):
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(ds_engine):
            yield
        return
    group = params[0].ds_process_group
    world = tdist.get_world_size(group)
    sizes = [p.ds_tensor.ds_numel for p in params]  # padded partition size, equal on every rank
    local = torch.cat([p.ds_tensor.data.reshape(-1)[:n] for p, n in zip(params, sizes)])
    full = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    getattr(tdist, "all_gather_single", tdist.all_gather_into_tensor)(full, local, group=group)
    full = full.view(world, local.numel())
    placeholders, offset = [], 0
    for p, n in zip(params, sizes):
        placeholders.append(p.data)
        p.data = full[:, offset:offset + n].reshape(-1)[:p.ds_numel].view(p.ds_shape)
        offset += n
    del full, local
    opt = ds_engine.optimizer
    offload = opt.parameter_offload if hasattr(opt, "parameter_offload") else opt
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        for p, placeholder in zip(params, placeholders):
            p.data = placeholder
        offload._register_deepspeed_module(offload.module)


def import_deepspeed() -> None:
    """Import DeepSpeed without the import of mlflow its autotuner makes (``deepspeed/autotuning/
    autotuner.py``: ``try: import mlflow``), about a second of every process's start with mlflow
    installed. Every run imports DeepSpeed (Accelerate starts its comm under ZeRO, and unwraps models
    through it when transformers saves); the autotuner runs in the ``deepspeed --autotuning``
    launcher, never in a training process. mlflow stays importable (REPORT_TO=mlflow imports it
    later); nothing changes when either is already imported."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError until the entry is removed
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def init_dist(cfg: Config, *, sft_micro: int, sft_accum: int) -> Dist:
    """Create the process group (gloo on CPU, NCCL on GPU) and the Accelerator for this launch."""
    import_deepspeed()
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plan = plan_launch(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        stale = remove_shm_segments(own=False)
        if stale:
            print(f"[hybrid_ds] removed {len(stale)} shared-memory segment(s) of runs that died: "
                  f"{', '.join(os.path.join(SHM_DIR, n) for n in stale)}", flush=True)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with accelerate, torchrun or deepspeed.")
    if plan.zero_stage > 0 and world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    ds_config, plugin = None, None
    if plan.zero_stage > 0:
        ds_config = fill_ds_config(plan.ds_template, stage=plan.zero_stage, micro=sft_micro, accum=sft_accum,
                                   world=world, clip=cfg.run.max_grad_norm, precision=plan.mixed_precision,
                                   hidden_size=hidden_size_of(cfg.run.model))
        from hybrid_ds.optim import deepspeed_optimizer_settings

        ds_config.update(deepspeed_optimizer_settings(cfg.optim.name, ds_config))
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=plan.zero_stage == 3)
    # A single plain process needs no process group; otherwise name the backend explicitly (on CPU,
    # Accelerate would otherwise leave every rank believing it is alone).
    distributed = world > 1 or plan.zero_stage > 0
    kwargs = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.run.dist_timeout_s))] \
        if distributed else []
    mp = plan.mixed_precision
    if plan.zero_stage == 0 and mp == "fp16" and not torch.cuda.is_available():
        raise RuntimeError("FP16 without DeepSpeed needs a GPU; use BF16, or run under DeepSpeed (ZERO_STAGE>=1).")
    acc = Accelerator(deepspeed_plugin=plugin, mixed_precision=mp, kwargs_handlers=kwargs,  # REPORT_TO's trackers:
                      log_with=tracker_objects(cfg.log.trackers, cfg.run.output_dir, cfg.log.tracker_project))
    state = acc.state
    d = Dist(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index,
             device=acc.device, plan=plan, accelerator=acc, ds_config=ds_config,
             max_grad_norm=cfg.run.max_grad_norm)
    if d.world != world:
        raise RuntimeError(f"launcher announced WORLD_SIZE={world} but the process group has {d.world} ranks")
    # Whatever way this process ends (an exception escaping a script, sys.exit), its process groups are
    # destroyed while the interpreter is still whole: a gloo group left to interpreter teardown can have
    # its C++ worker threads destroyed unjoined ("terminate called without an active exception", SIGABRT).
    import atexit

    atexit.register(d.shutdown)
    return d


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
