"""REF_SYNC_EVERY / REF_SYNC_ALPHA: the reference follows the policy SFT moved, copied or mixed."""

import pytest
import torch

from inproc import base, make_run


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_reference_is_synced_after_the_cycles_sft_steps(tmp_path, alpha):
    """One hybrid cycle of SFT only: the reference ends as alpha x (policy after SFT) + (1 - alpha) x
    (the start), and the sync is logged; with REF_SYNC_EVERY=0 it stays the start."""
    from hybrid_ds.run.loop import train
    from hybrid_ds.run.metrics import read_metrics

    keys = dict(CYCLE_SFT_STEPS=1, CYCLE_PPO_UPDATES=0, MAX_STEPS=1)
    run = make_run(base(tmp_path / "sync", REF_SYNC_EVERY=1, REF_SYNC_ALPHA=alpha, **keys))
    start = {k: v.clone() for k, v in run.ref.state_dict().items()}
    train(run)
    policy = run.engine.module.lm.state_dict()
    moved = [k for k in start if not torch.equal(policy[k], start[k])]
    assert moved, "SFT changed nothing"
    for k in moved:
        torch.testing.assert_close(run.ref.state_dict()[k], alpha * policy[k] + (1 - alpha) * start[k],
                                   rtol=1e-6, atol=1e-7)
    assert run.counters.ref_snapshot == 1  # checkpoints now carry the reference
    assert read_metrics(run.cfg.run.output_dir, "ref")[-1]["ref/alpha"] == alpha

    plain = make_run(base(tmp_path / "plain", REF_SYNC_EVERY=0, **keys))
    train(plain)
    assert all(torch.equal(plain.ref.state_dict()[k], start[k]) for k in start)


def test_ref_sync_needs_hybrid_and_colocated():
    from hybrid_ds.config import ConfigError
    from hybrid_ds.run.preflight import load_config

    common = ["MODEL=builtin:tiny-gpt2", "TRAIN_FILE=builtin:demo-tasks", "OUTPUT_DIR=/tmp/unused-hybrid-ds",
              "REF_SYNC_EVERY=2"]
    with pytest.raises(ConfigError, match="applies to MODE=hybrid only"):
        load_config(None, ["MODE=ppo", *common], check_files=False)
    with pytest.raises(ConfigError, match="REF_PLACEMENT=colocated"):
        load_config(None, ["MODE=hybrid", "REF_PLACEMENT=separate", *common], check_files=False, world_size=2)
