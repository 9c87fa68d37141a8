"""Faults for the checkpoint and non-finite tests, injected from test code: the package has no hooks.

``install(faults)`` wraps functions of ``hybrid_ds.run.checkpoint`` and ``hybrid_ds.run.loop`` (where
``hybrid_ds.train`` and the loop look them up at call time), so a run started through ``tests/scripts/train_with_faults.py``
behaves like ``python -m hybrid_ds.train`` plus the faults named in the environment
(``HYBRID_DS_FAULT_<NAME>=value``); each fault announces itself on stderr when it fires.

- ``CRASH_IN_CHECKPOINT=N``: every rank exits (code 17) once checkpoint N's files are written,
  before it is marked complete.
- ``FAIL_WRITE=N``: writing checkpoint N fails as on a full disk (ENOSPC).
- ``STEP_SLEEP=S``: sleep S seconds at every step boundary (time for a test to send a signal).
- ``HANG_AT=N``: block at the boundary after step N, until killed.
- ``NAN_AT=2,3``: the policy's logits are NaN in the training forwards of those SFT steps.
- ``NAN_VALUES_AT=1,2``: the value head's outputs are NaN in the training forwards of those PPO
  updates (the rollout, in eval mode, is untouched).
"""

import errno
import os
import sys
import time

PREFIX = "HYBRID_DS_FAULT_"


def from_env() -> dict:
    return {k[len(PREFIX):]: v for k, v in os.environ.items() if k.startswith(PREFIX) and v}


def _say(msg: str) -> None:
    print(f"[fault injection] {msg}", file=sys.stderr, flush=True)


def _steps(value: str) -> set:
    return {int(s) for s in value.split(",") if s.strip()}


def install(faults: dict) -> None:
    from hybrid_ds.run import checkpoint as ck
    from hybrid_ds.run import checkpoint_dir as cdir
    from hybrid_ds.run import loop

    if not faults:
        return
    _say(f"active: {faults}")
    state = {"run": None, "ok_calls": 0, "phase": None}
    orig_phase_step = loop.phase_step
    from hybrid_ds.engine.dist import Dist

    orig_save, orig_all_ok, orig_main = ck.save_checkpoint, Dist.all_ok, ck._save_main
    orig_boundary, orig_attach = loop.at_boundary, ck.attach

    def save_checkpoint(run):
        state["run"], state["ok_calls"] = run, 0
        return orig_save(run)

    def all_ok(dist, ok):  # the first agreement of a save: every rank's files are written
        result = orig_all_ok(dist, ok)
        state["ok_calls"] += 1
        run = state["run"]
        if (run is not None and state["ok_calls"] == 1
                and faults.get("CRASH_IN_CHECKPOINT") == str(cdir.unit(run))):
            _say(f"exiting while checkpoint {cdir.checkpoint_name(run)} is being written")
            os._exit(17)
        return result

    def _save_main(run, path, ref_state):
        if faults.get("FAIL_WRITE") == str(cdir.unit(run)):
            _say(f"writing checkpoint {cdir.checkpoint_name(run)} fails")
            raise OSError(errno.ENOSPC, "No space left on device (fault injection)",
                          os.path.join(path, cdir.STATE_FILE))
        return orig_main(run, path, ref_state)

    def at_boundary(run):
        if faults.get("STEP_SLEEP"):
            time.sleep(float(faults["STEP_SLEEP"]))
        if faults.get("HANG_AT") == str(cdir.unit(run)):
            _say(f"hanging after step {cdir.unit(run)}")
            while True:
                time.sleep(1)
        return orig_boundary(run)

    def phase_step(run, phase):  # the phase the NaN faults fire in (the counters alone cannot tell it)
        state["phase"] = phase.name
        try:
            return orig_phase_step(run, phase)
        finally:
            state["phase"] = None

    def attach(run, point):
        orig_attach(run, point)
        sft_steps, ppo_updates = _steps(faults.get("NAN_AT", "")), _steps(faults.get("NAN_VALUES_AT", ""))

        def poison_logits(module, inputs, output):
            if module.training and state["phase"] == "sft" and run.counters.sft_step + 1 in sft_steps:
                _say(f"NaN logits in SFT step {run.counters.sft_step + 1}")
                output.logits = output.logits * float("nan")
            return output

        def poison_values(module, inputs, output):
            if module.training and state["phase"] == "ppo" and run.counters.ppo_update + 1 in ppo_updates:
                _say(f"NaN values in PPO update {run.counters.ppo_update + 1}")
                return output * float("nan")
            return output

        if sft_steps:
            run.engine.module.lm.register_forward_hook(poison_logits)
        if ppo_updates:
            run.engine.module.v_head.register_forward_hook(poison_values)

    ck.save_checkpoint, ck._save_main, Dist.all_ok = save_checkpoint, _save_main, all_ok
    loop.at_boundary, ck.attach = at_boundary, attach
    loop.phase_step = phase_step
