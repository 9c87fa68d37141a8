"""The loop: walk the run's schedule of SFT steps, PPO updates or hybrid cycles of both.

Read top to bottom: :func:`train` runs the MODE's phases (:data:`hybrid_ds.algorithms.registry.MODES`)
from the counters (restored on resume) to the plan's end; each step is :func:`phase_step`, one
call into the phase's module; after each step :func:`hybrid_ds.run.checkpoint.at_boundary`
writes SAVE_EVERY checkpoints and, after SIGTERM/SIGINT, stops all ranks together. With EVAL_FILE,
:func:`maybe_evaluate` evaluates the policy every EVAL_EVERY steps (the unit of MAX_STEPS and
SAVE_EVERY) and when the run completes (:mod:`hybrid_ds.algorithms.evaluate`).
Building the run is :mod:`hybrid_ds.run.setup`; the CLI that drives both is :mod:`hybrid_ds.run.cli`.
"""

from __future__ import annotations

from hybrid_ds.algorithms import dpo, rm
from hybrid_ds.algorithms.evaluate import evaluate
from hybrid_ds.algorithms.registry import Phase, mode_phases
from hybrid_ds.engine.param_stream import parameter_manifest, whole_parameters
from hybrid_ds.run import curriculum
from hybrid_ds.run.checkpoint import at_boundary
from hybrid_ds.run.faults import check_finite
from hybrid_ds.run.state import Run


def phase_step(run: Run, phase: Phase) -> dict:
    """One step of ``phase`` (an SFT step, a PPO update): its update, its counter, the fault check."""
    m = phase.step(run, run.next_batch)
    setattr(run.counters, phase.counter, getattr(run.counters, phase.counter) + 1)
    check_finite(run, phase, m)  # a non-finite loss: its update was skipped; counted, limited
    return m


def train(run: Run) -> None:
    """Walk the run's schedule (see the module docstring); returns early when a signal stopped it."""
    cfg, plan, c = run.cfg, run.plan, run.counters
    phases = mode_phases(cfg.run.mode, cfg.pref.hybrid_rl)
    if len(phases) == 1:  # sft, ppo, dpo or rm: one phase until its total
        phase = phases[0]
        total = {"sft": plan.sft_steps, "ppo": plan.ppo_updates}.get(phase.name, plan.pref_steps)
        run.logger.progress(cfg.run.mode, total, getattr(c, phase.counter))
        while getattr(c, phase.counter) < total:
            m = phase_step(run, phase)
            _log(run, getattr(c, phase.counter), phase.name, m)
            maybe_evaluate(run, getattr(c, phase.counter))
            if at_boundary(run):
                return
        maybe_evaluate(run, total, final=True)
        run.dist.barrier()
        return
    sft, rl = phases
    # 0. SFT warm-up (optional), then the reference snapshot if REF_INIT=after_warmup.
    if c.sft_step < cfg.hybrid.sft_warmup_steps:
        run.logger.progress("sft warm-up", cfg.hybrid.sft_warmup_steps, c.sft_step)
    while c.sft_step < cfg.hybrid.sft_warmup_steps:
        _log(run, c.sft_step + 1, "sft", phase_step(run, sft))
        if at_boundary(run):
            return
    run.logger.progress(cfg.run.mode, plan.cycles, c.cycle)
    if cfg.hybrid.ref_init == "after_warmup" and not c.ref_snapshot:
        run.dist.copy_weights(run.engine.module.lm, run.ref)
        c.ref_snapshot = 1  # checkpoints from now on carry the reference
    if run.ref_client is not None and 0 < cfg.hybrid.ref_sync_every <= c.cycle and run.dist.is_main:
        print("[hybrid_ds] warning: resumed with the reference on its own ranks: they start from MODEL, not from "
              "the synced reference (checkpoints do not carry it); the next REF_SYNC_EVERY sync moves them", flush=True)
    synced_once = False
    while c.cycle < plan.cycles:
        # 1. SFT steps, 2. RL updates, as many as the curriculum says for this cycle; the phases
        # meet at collectives, so no rank runs ahead.
        n_sft, n_rl = curriculum.cycle_mix(cfg, c.cycle, plan.cycles)
        mix = {"curriculum/sft_steps": n_sft, "curriculum/ppo_updates": n_rl}
        for _ in range(n_sft):
            _log(run, c.sft_step + 1, sft.name, {**phase_step(run, sft), **mix}, advance=False)
        every = cfg.hybrid.ref_sync_every
        # 1b. the reference follows the policy SFT moved; a cycle without SFT steps has nothing to
        # follow, and a sync there would only erase the KL anchor of PPO's own updates
        if n_sft and every and (c.cycle + 1) % every == 0:
            lm, alpha = run.engine.module.lm, cfg.hybrid.ref_sync_alpha
            if run.ref_client is not None:  # on its own ranks: over the bridge, one whole parameter at a time
                run.ref_client.sync(parameter_manifest(lm), whole_parameters(lm), alpha)
            else:
                run.dist.copy_weights(lm, run.ref, alpha=alpha)
                c.ref_snapshot = 1  # checkpoints from now on carry the reference
            _log(run, c.cycle + 1, "ref", {"ref/synced": 1.0, "ref/alpha": cfg.hybrid.ref_sync_alpha}, advance=False)
            if run.dist.is_main and not synced_once:  # once: a line per cycle would break the progress bar
                print(f"[hybrid_ds] cycle {c.cycle + 1}: reference synced to the policy (alpha {alpha}); it "
                      f"follows every {every} cycle(s), each sync logged as a \"ref\" row in metrics.jsonl", flush=True)
            synced_once = True
        for _ in range(n_rl):
            _log(run, getattr(c, rl.counter) + 1, rl.name, {**phase_step(run, rl), **mix}, advance=False)
        c.cycle += 1
        run.logger.advance()
        maybe_evaluate(run, c.cycle)
        if cfg.run.cleanse:
            run.dist.cleanse()
        if at_boundary(run):
            return
    maybe_evaluate(run, plan.cycles, final=True)
    run.dist.barrier()


def maybe_evaluate(run: Run, step: int, final: bool = False) -> None:
    """Evaluate on EVAL_FILE after ``step`` (cycles, SFT steps or PPO updates) when EVAL_EVERY divides it,
    and at the end of the run (``final``) unless that step was just evaluated; logged as phase ``eval``."""
    every = run.cfg.data.eval_every
    due = bool(every) and step % every == 0
    if not (run.eval_examples or run.eval_pairs) or not (due or final) or (final and due):
        return
    if run.eval_pairs:  # MODE=dpo or rm: held-out preference pairs
        m = (rm if run.cfg.run.mode == "rm" else dpo).evaluate_pairs(run, run.eval_pairs)
    else:
        m = evaluate(run, run.eval_examples)
    run.logger.log(step, "eval", m)
    if run.dist.is_main:
        keys = ("eval/loss", "eval/reward_mean", "eval/rewards/accuracies", "eval/accuracy")
        shown = ", ".join(f"{k.split('/', 1)[1]} {m[k]:.4g}" for k in keys if k in m)
        print(f"[hybrid_ds] eval at step {step} on {int(m['eval/items'])} items: {shown}", flush=True)


def _log(run: Run, step: int, phase: str, metrics: dict, advance: bool = True) -> None:
    if step % run.cfg.run.log_every == 0 or step == 1:
        extra = {"progress/cycle": run.counters.cycle} if run.cfg.run.mode == "hybrid" else {}
        run.logger.log(step, phase, {**metrics, **extra})
    if advance:
        run.logger.advance()
