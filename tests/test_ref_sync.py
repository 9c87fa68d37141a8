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


def test_ref_sync_needs_hybrid_and_no_lora():
    """MODE=hybrid (it counts cycles) and a reference that is its own model (not LoRA's disabled
    adapters); on its own ranks (REF_PLACEMENT=separate) the weights go over the bridge."""
    from hybrid_ds.config import ConfigError
    from hybrid_ds.run.preflight import load_config

    common = ["MODEL=builtin:tiny-gpt2", "TRAIN_FILE=builtin:demo-tasks", "OUTPUT_DIR=/tmp/unused-hybrid-ds",
              "REF_SYNC_EVERY=2"]
    with pytest.raises(ConfigError, match="applies to MODE=hybrid only"):
        load_config(None, ["MODE=ppo", *common], check_files=False)
    with pytest.raises(ConfigError, match="REF_SYNC_EVERY with LORA_R > 0"):
        load_config(None, ["MODE=hybrid", "LORA_R=4", *common], check_files=False)
    cfg = load_config(None, ["MODE=hybrid", "REF_PLACEMENT=separate", *common], check_files=False, world_size=2)
    assert cfg.hybrid.ref_sync_every == 2 and cfg.run.ref_placement == "separate"


def test_mix_into_against_hand_computed_numbers():
    """ref <- alpha x policy + (1 - alpha) x ref, in the reference's dtype (models/weight_mix.py)."""
    from hybrid_ds.models.weight_mix import mix_into

    ref, pol = torch.tensor([[1.0, 2.0], [-4.0, 0.5]]), torch.tensor([3.0, 2.0, 0.0, 1.5])  # shapes differ
    assert mix_into(ref.clone(), pol, 0.25).tolist() == [[1.5, 2.0], [-3.0, 0.75]]  # 0.25 p + 0.75 r
    assert mix_into(ref.clone(), pol, 1.0).tolist() == [[3.0, 2.0], [0.0, 1.5]]  # a copy
    assert torch.equal(mix_into(ref.clone(), pol, 0.0), ref)  # alpha 0: the reference stays
    # bf16 reference, fp32 policy: mixed in fp32, rounded once to bf16 (1 + 0.5 * 2^-8 rounds to even: 1)
    r16 = torch.ones(2, dtype=torch.bfloat16)
    out = mix_into(r16, torch.tensor([1.0 + 2.0 ** -8, 3.0]), 0.5)
    assert out is r16 and out.dtype == torch.bfloat16 and out.tolist() == [1.0, 2.0]
    # the naive loop over elements gives the same numbers
    a, b = torch.randn(7, generator=torch.Generator().manual_seed(0)), torch.randn(7)
    naive = torch.tensor([0.3 * float(y) + 0.7 * float(x) for x, y in zip(a, b)])
    torch.testing.assert_close(mix_into(a.clone(), b, 0.3), naive, rtol=1e-6, atol=1e-7)
