"""PPO update features, in-process on one process (tests/inproc.py): the ratio guard, PPO-ptx,
WHITEN_REWARDS, PPO_GRAD_ACCUM equivalence, REF_INIT=after_warmup, a non-finite PPO update."""

import copy
import math

import pytest
import torch

from inproc import base, changed, make_run, prepared_rollout, weights

from hybrid_ds import ppo

pytestmark = pytest.mark.slow


def test_ratio_guard_drops_only_the_exploding_micro_batch(tmp_path):
    """One minibatch of 4 rows in 4 micro-batches; row 0's old log-probs make its ratio overflow.
    Its micro-batch must contribute exactly zero gradient and the other three still step: the
    weights equal those of the same update where row 0 carries no gradient by construction
    (advantage 0, VF_COEF 0)."""
    keys = dict(MODE="ppo", PPO_GRAD_ACCUM=4, VF_COEF=0.0, ENTROPY_COEF=0.0)
    a, b = make_run(base(tmp_path / "a", **keys)), make_run(base(tmp_path / "b", **keys))
    w0 = weights(a)
    assert all(torch.equal(w0[k], v) for k, v in weights(b).items())
    ro = prepared_rollout(a, a.examples[:4])
    ro_a, ro_b = copy.deepcopy(ro), copy.deepcopy(ro)
    ro_a.logprobs[0] = -1e4  # exp(logp - old) overflows: mean ratio inf
    ro_b.advantages[0] = 0.0
    ma = ppo.ppo_epochs(a, ro_a, None)
    mb = ppo.ppo_epochs(b, ro_b, None)
    assert ma["ppo/skipped_microbatches"] == 1.0 and mb["ppo/skipped_microbatches"] == 0.0
    assert math.isfinite(ma["ppo/grad_norm"]), ma["ppo/grad_norm"]
    assert all(math.isfinite(v) for v in ma.values()), {k: v for k, v in ma.items() if not math.isfinite(v)}
    wa, wb = weights(a), weights(b)
    assert changed(w0, wa, "lm."), "the other micro-batches did not step"
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)
