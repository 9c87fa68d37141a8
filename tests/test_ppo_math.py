"""Tests of hybrid_ds.algorithms.ppo_math against numbers computed by hand and against naive loops.

Expected values are written as literals (worked out in the comments), not recomputed with the
formula under test.
"""

import ast
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from hybrid_ds.algorithms import kl_control as klc
from hybrid_ds.algorithms import ppo_math as pm
from hybrid_ds.models import logprobs as lp

T = torch.tensor


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# Module hygiene
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, allowed", [(pm, set()), (klc, set()), (lp, {"hybrid_ds.models.policy_value"})],
                         ids=["ppo_math", "kl_control", "logprobs"])
def test_module_imports_only_torch_and_stdlib_and_never_syncs(module, allowed):
    source = Path(module.__file__).read_text()
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"__future__", "math", "typing", "dataclasses", "torch"} | allowed, imported
    host_syncs = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"item", "tolist", "cpu", "numpy"}
    }
    assert not host_syncs, host_syncs


# ------------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------------
X = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # selects 1, 2, 4


def test_masked_sum_and_mean():
    close(pm.masked_sum(X, M), 7.0)
    close(pm.masked_sum(X, M, dim=1), [3.0, 4.0])
    close(pm.masked_mean(X, M), 7.0 / 3.0)
    close(pm.masked_mean(X, M, dim=1), [1.5, 4.0])
    close(pm.masked_mean(X, M.bool()), 7.0 / 3.0)  # bool masks work too
    close(pm.masked_mean_per_row(X, M), [1.5, 4.0])


def test_masked_stats_empty_and_nonfinite():
    empty = torch.zeros_like(M)
    close(pm.masked_mean(X, empty), 0.0)
    close(pm.masked_mean(X, T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), dim=1), [1.0, 0.0])
    close(pm.masked_var(X, empty), 0.0)
    # inf / NaN under the mask's zeros must not leak into the result
    bad = T([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    close(pm.masked_sum(bad, M), 7.0)
    close(pm.masked_mean(bad, M), 7.0 / 3.0)


def test_masked_var_by_hand():
    # values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 14/3
    close(pm.masked_var(X, M, unbiased=True), 7.0 / 3.0)  # 14/3 / 2
    close(pm.masked_var(X, M, unbiased=False), 14.0 / 9.0)  # 14/3 / 3
    # a single element: Bessel undefined -> biased variance, i.e. 0, not NaN
    close(pm.masked_var(X, T([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])), 0.0)


# ------------------------------------------------------------------------------------------------
# Whitening
# ------------------------------------------------------------------------------------------------
def test_whiten_by_hand():
    # values 1, 2, 4: mean 7/3, unbiased var 7/3 -> (1 - 7/3) / sqrt(7/3) = -0.8728715609
    out = pm.whiten(X, M)
    close(out[0, 0], -0.8728715609439694)
    close(out[0, 1], -0.2182178902359924)  # (2 - 7/3) / sqrt(7/3)
    close(out[1, 0], 1.0910894511799618)  # (4 - 7/3) / sqrt(7/3)
    close(out[M == 0], [0.0, 0.0, 0.0])  # outside the mask -> 0
    kept = pm.whiten(X, M, shift_mean=False)
    close(kept[0, 0], -0.8728715609439694 + 7.0 / 3.0)


def _ragged(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t  # at least one full row
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    x = torch.randn(b, t, generator=g) * 3.0 + 5.0
    return x, mask


def test_whiten_statistics_over_mask():
    x, mask = _ragged(8, 10, seed=0)
    out = pm.whiten(x, mask)
    close(pm.masked_mean(out, mask), 0.0, atol=1e-5)
    close(pm.masked_var(out, mask), 1.0, atol=1e-5)
    kept = pm.whiten(x, mask, shift_mean=False)
    close(pm.masked_mean(kept, mask), pm.masked_mean(x, mask), atol=1e-5)
    close(pm.masked_var(kept, mask), 1.0, atol=1e-5)
    assert out.dtype == x.dtype


def test_moment_sums_and_moments_from_sums_by_hand():
    sums = pm.moment_sums(X, M)
    assert sums.dtype == torch.float64 and sums.shape == (3,)
    close(sums, [3.0, 7.0, 21.0])  # count, 1+2+4, 1+4+16
    mean, var = pm.moments_from_sums(sums)
    close(mean, 7.0 / 3.0)
    close(var, 7.0 / 3.0)  # (21 - 3 * 49/9) / 2
    mean, var = pm.moments_from_sums(T([0.0, 0.0, 0.0], dtype=torch.float64))
    close(mean, 0.0)
    close(var, 0.0)


def test_whiten_two_halves_equals_concatenation():
    x, mask = _ragged(10, 7, seed=1)
    sums = pm.moment_sums(x[:5], mask[:5]) + pm.moment_sums(x[5:], mask[5:])
    close(sums, pm.moment_sums(x, mask), atol=1e-9)
    stats = pm.moments_from_sums(sums)
    parts = ((x[:5], mask[:5]), (x[5:], mask[5:]))
    for shift in (True, False):
        halves = torch.cat([pm.whiten(h, m, shift_mean=shift, stats=stats) for h, m in parts])
        close(halves, pm.whiten(x, mask, shift_mean=shift), atol=1e-6)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_whiten_worker(rank, world, port, x, mask, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        rows = x.shape[0] // world
        xs, ms = x[rank * rows : (rank + 1) * rows], mask[rank * rows : (rank + 1) * rows]
        sums = pm.moment_sums(xs, ms)
        dist.all_reduce(sums)  # SUM
        out = pm.whiten(xs, ms, stats=pm.moments_from_sums(sums))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whiten_across_two_gloo_ranks_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    x, mask = _ragged(6, 9, seed=2)
    mask[4] = 0.0  # a row without tokens on rank 1
    args = (2, _free_port(), x, mask, str(tmp_path))
    mp.spawn(_gloo_whiten_worker, args=args, nprocs=2, join=True)
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    torch.testing.assert_close(got, pm.whiten(x, mask), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Log-probs and entropy
# ------------------------------------------------------------------------------------------------
def test_logprobs_by_hand():
    logits = T([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # (1, 2, 2): p = [.5, .5], [.25, .75]
    tokens = T([[0, 1]])
    close(lp.logprobs_from_logits(logits, tokens), [[-0.6931471805599453, -0.2876820724517809]])
    # temperature 2: second row becomes [0, ln sqrt3] -> p1 = sqrt3 / (1 + sqrt3)
    out = lp.logprobs_from_logits(logits, tokens, temperature=2.0)
    close(out, [[-0.6931471805599453, -0.45574639440832626]])
    with pytest.raises(ValueError):
        lp.logprobs_from_logits(logits, tokens, temperature=0.0)


# block sizes: 40 elements -> 3 positions of V=11 per block (time split); 200 -> 18 positions,
# i.e. 3 whole rows of T=6 per block (row split); default -> a single block
@pytest.mark.parametrize("chunk", [40, 200, lp._CHUNK_ELEMENTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_log_softmax(dtype, temperature, chunk, monkeypatch):
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(3)
    full = (torch.randn(4, 6, 11, generator=g) * 4).to(dtype)
    logits = full[:, :-1]  # the usual non-contiguous shifted slice, (4, 5, 11)
    tokens = torch.randint(0, 11, (4, 5), generator=g)
    ref = torch.log_softmax(logits.float() / temperature, -1)
    ref = ref.gather(-1, tokens[..., None]).squeeze(-1)
    out = lp.logprobs_from_logits(logits, tokens, temperature)
    assert out.dtype == torch.float32 and out.shape == (4, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_gradient_matches_autograd(dtype, monkeypatch):
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 40)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    weights = torch.randn(2, 4, generator=g)
    ours = base.clone().to(dtype).requires_grad_(True)
    (lp.logprobs_from_logits(ours[:, :-1], tokens, 0.7) * weights).sum().backward()
    ref = base.clone().to(dtype).float().requires_grad_(True)
    picked = torch.log_softmax(ref[:, :-1] / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (picked * weights).sum().backward()
    assert ours.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.grad.float(), ref.grad, atol=tol, rtol=0)


def test_logprobs_keep_no_fp32_copy_of_bf16_logits_for_backward():
    logits = torch.randn(2, 3, 50).to(torch.bfloat16).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lp.logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long), 0.7)
    assert (torch.float32, logits.numel()) not in saved, saved
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_entropy_by_hand():
    # uniform over 4: ln 4; [.25, 0, .75] (a -inf logit): -(.25 ln .25 + .75 ln .75)
    logits = T([[[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, math.log(3.0), -math.inf]]])
    close(lp.entropy_from_logits(logits), [[1.3862943611198906, 0.5623351446188083]])


@pytest.mark.parametrize("chunk", [40, 200, lp._CHUNK_ELEMENTS])
def test_entropy_matches_reference(chunk, monkeypatch):
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 6, 11, generator=g) * 3).to(torch.bfloat16)[:, 1:]
    z = logits.float() / 0.7
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(lp.entropy_from_logits(logits, 0.7), ref, atol=1e-5, rtol=0)
    leaf = logits.float().requires_grad_(True)
    lp.entropy_from_logits(leaf).sum().backward()  # differentiable (entropy bonus)
    assert torch.isfinite(leaf.grad).all()


# ------------------------------------------------------------------------------------------------
# KL penalty and reward shaping
# ------------------------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logp, ref = T([-1.0, -2.0]), T([-1.5, -1.0])  # d = logp - ref = [0.5, -1.0]
    close(pm.kl_penalty(logp, ref, "k1"), [0.5, -1.0])
    close(pm.kl_penalty(logp, ref, "k2"), [0.125, 0.5])
    # k3 = exp(-d) - 1 + d: e^-0.5 - 0.5 = 0.1065306597, e^1 - 2 = 0.7182818285
    close(pm.kl_penalty(logp, ref, "k3"), [0.10653065971263342, 0.7182818284590451])
    close(pm.kl_penalty(logp, ref, "abs"), [0.5, 1.0])
    with pytest.raises(ValueError, match="k3"):
        pm.kl_penalty(logp, ref, "k4")


def _shaping_inputs():
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    logp = T([[0.1, 0.2, 0.3, 9.0], [0.5, 7.0, 7.0, 7.0], [1.0, 1.0, 1.0, 1.0]])
    return T([1.0, 2.0, 3.0]), logp, torch.zeros(3, 4), mask


def test_shape_rewards_score_at_last_real_token():
    scores, logp, ref, mask = _shaping_inputs()
    rewards, kl = pm.shape_rewards(scores, logp, ref, mask, beta=0.5)
    close(kl, [[0.1, 0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # -0.5 * kl, score on the last real token; the empty row drops its score
    close(rewards, [[-0.05, -0.1, 0.85, 0.0], [1.75, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rewards, _ = pm.shape_rewards(scores, logp, ref, mask.bool(), beta=T(0.5))
    close(rewards[1], [1.75, 0.0, 0.0, 0.0])


def test_shape_rewards_missing_eos_penalty():
    scores, logp, ref, mask = _shaping_inputs()
    ended = T([True, False, False])
    rewards, _ = pm.shape_rewards(
        scores, logp, ref, mask, beta=0.5, missing_eos_penalty=1.0, ended_with_eos=ended
    )
    # row 0 ended: unchanged; row 1: score 2 - 1 = 1 -> 1 - 0.25; row 2 empty: still 0
    close(rewards, [[-0.05, -0.1, 0.85, 0.0], [0.75, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        pm.shape_rewards(scores, logp, ref, mask, beta=0.5, missing_eos_penalty=1.0)


def test_empty_response_length():
    empty = torch.zeros(2, 0)
    rewards, kl = pm.shape_rewards(T([1.0, 2.0]), empty, empty, empty, beta=0.1)
    assert rewards.shape == kl.shape == (2, 0)
    adv, ret = pm.gae(empty, empty, empty)
    assert adv.shape == ret.shape == (2, 0)


def test_last_token_index():
    index, has_any = pm.last_token_index(T([[1, 1, 0], [0, 0, 0], [1, 1, 1]]))
    assert index.tolist() == [1, 0, 2]
    assert has_any.tolist() == [True, False, True]


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------
def test_gae_by_hand():
    rewards = T([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]])
    values = T([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: d2 = 2 - 1.5 = .5; d1 = .9*1.5 - 1 = .35, A1 = .35 + .45*.5 = .575;
    #        d0 = 1 + .9*1 - .5 = 1.4, A0 = 1.4 + .45*.575 = 1.65875
    # row 1 (last token masked, its value ignored): A1 = 0 + 0 - 1 = -1; A0 = 1.4 - .45 = .95
    close(adv, [[1.65875, 0.575, 0.5], [0.95, -1.0, 0.0]])
    close(ret, [[2.15875, 1.575, 2.0], [1.45, 0.0, 0.0]])


def _gae_naive(rewards, values, mask, gamma, lam):
    """Sum form A_t = sum_l (gamma*lam)^l delta_{t+l}, one row and one step at a time."""
    b_size, t_size = rewards.shape
    adv = [[0.0] * t_size for _ in range(b_size)]
    for b in range(b_size):
        n = int(mask[b].sum())
        r, v = rewards[b].tolist(), values[b].tolist()
        delta = [r[k] + (gamma * v[k + 1] if k + 1 < n else 0.0) - v[k] for k in range(n)]
        for t in range(n):
            adv[b][t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
    adv = torch.tensor(adv, dtype=torch.float64)
    ret = torch.where(mask.bool(), adv + values.double(), torch.zeros_like(adv))
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_naive_loop_on_ragged_masks(gamma, lam):
    g = torch.Generator().manual_seed(6)
    b, t = 7, 12
    lengths = T([12, 0, 1, 5, 11, 7, 3])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(b, t, generator=g) * mask  # rewards past the mask are 0 (shape_rewards)
    values = torch.randn(b, t, generator=g)  # values past the mask are junk: must be ignored
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = _gae_naive(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), adv_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret.double(), ret_ref, atol=1e-5, rtol=0)
    assert not adv.requires_grad


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def test_policy_loss_clipping_by_hand():
    # tokens: (A, ratio) = (+1, 1.1) inside; (+1, 1.5) clipped to 1.2; (-1, 0.5) clipped to 0.8;
    # (-1, 1.5) and (+1, 0.5) outside but the unclipped term is the pessimistic one; last masked.
    ratios = T([[1.1, 1.5, 0.5, 1.5, 0.5, math.exp(50.0)]])
    adv = T([[1.0, 1.0, -1.0, -1.0, 1.0, 1.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    logp = torch.log(ratios).requires_grad_(True)
    old = torch.zeros_like(ratios)
    loss, stats = pm.policy_loss(logp, old, adv, mask, clip_range=0.2)
    # per-token terms -1.1, -1.2, 0.8, 1.5, -0.5 -> mean -0.1
    close(loss, -0.1)
    close(stats["clipfrac"], 0.4)
    close(stats["ratio_mean"], 1.02)  # 5.1 / 5
    close(stats["ratio_max"], 1.5)
    # sum of (r - 1 - ln r) over 1.1, 1.5, 0.5, 1.5, 0.5 = 0.5800539651
    close(stats["approx_kl"], 0.11601079301984737)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    loss.backward()
    # d/dlogp of -A*ratio = -A*ratio where unclipped is active, 0 where clipped, 0 when masked
    close(logp.grad, [[-0.22, 0.0, 0.0, 0.3, -0.1, 0.0]])
    loss_sum, _ = pm.policy_loss(logp, old, adv, mask, clip_range=0.2, num_tokens=10)
    close(loss_sum, -0.05)


def test_value_loss_clipping_by_hand():
    values = T([[1.0, 1.5, 1.5, 0.0, 7.0]], requires_grad=True)
    old = T([[0.9, 1.0, 1.0, 1.0, 0.0]])
    returns = T([[1.5, 2.0, 1.0, 3.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = pm.value_loss(values, old, returns, mask, clip_range=0.2)
    # token 1: inside the range, both .25; token 2: v_clip 1.2 -> .64 > .25 (clipped);
    # token 3: v_clip 1.2 -> .04 < .25; token 4: v_clip .8 -> 4.84 < 9. 0.5 * 10.14 / 4
    close(loss, 1.2675)
    close(stats["vf_clipfrac"], 0.25)
    close(stats["value_mean"], 1.0)
    # Var(R) = 2.1875/3, Var(R - v) = 6.6875/3 -> 1 - 6.6875/2.1875
    close(stats["explained_variance"], -2.057142857142857)
    loss.backward()
    # grad = 0.5 * 2 * (v - R) / 4 where the unclipped term is used, 0 where clipped or masked
    close(values.grad, [[-0.125, 0.0, 0.125, -0.75, 0.0]])
    unclipped, _ = pm.value_loss(values, old, returns, mask, clip_range=None)
    close(unclipped, 1.21875)  # 0.5 * (.25 + .25 + .25 + 9) / 4


def test_ratio_guard():
    mask = T([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    assert pm.ratio_guard(torch.log(T([[1.0, 30.0, 1.0]])), old, mask).item()  # mean 15.5
    assert not pm.ratio_guard(torch.log(T([[1.0, 2.0, 1.0]])), old, mask).item()  # mean 1.5
    assert not pm.ratio_guard(T([[0.0, 0.0, 500.0]]), old, mask).item()  # huge but masked
    assert pm.ratio_guard(T([[0.0, float("nan"), 0.0]]), old, mask).item()
    assert not pm.ratio_guard(torch.log(T([[1.0, 30.0, 1.0]])), old, mask, max_ratio=20.0).item()
    assert pm.ratio_guard(old, old, mask).dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# KL controllers
# ------------------------------------------------------------------------------------------------
def test_adaptive_kl_controller_numbers():
    ctl = klc.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 6.6: error +0.1 -> 0.1 * (1 + 0.1 * 256/10000) = 0.100256
    assert ctl.update(6.6, 256) == pytest.approx(0.100256, abs=1e-12)
    ctl = klc.AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(3.0, 256)  # error -0.5 clipped to -0.2 -> 0.1 * (1 - 0.00512)
    assert ctl.value == pytest.approx(0.099488, abs=1e-12)
    ctl = klc.AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(60.0, 256)  # error +9 clipped to +0.2 -> 0.1 * 1.00512
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    ctl.update(6.0, 256)  # on target: unchanged
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    ctl.update(float("nan"), 256)  # a broken measurement leaves beta alone
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)


def test_kl_controllers_state_dict_and_factory():
    ctl = klc.AdaptiveKLController(0.2, 1.0, 100)
    ctl.update(2.0, 10)  # 0.2 * 1.02 = 0.204
    state = ctl.state_dict()
    assert state == {"value": pytest.approx(0.204)} and isinstance(state["value"], float)
    fresh = klc.AdaptiveKLController(0.2, 1.0, 100)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    fixed = klc.FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05 and fixed.state_dict() == {"value": 0.05}
    fixed.load_state_dict({"value": 0.07})
    assert fixed.value == 0.07
    assert isinstance(klc.make_kl_controller(0.1, 6.0, 10000), klc.AdaptiveKLController)
    assert isinstance(klc.make_kl_controller(0.1, adaptive=False), klc.FixedKLController)
    with pytest.raises(ValueError):
        klc.make_kl_controller(0.1, None, 10000)
    with pytest.raises(ValueError):
        klc.AdaptiveKLController(0.1, 0.0, 10000)


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def test_mask_after_eos():
    tokens = T([[2, 5, 5, 0], [5, 2, 7, 2], [5, 6, 7, 8]])
    mask, ended = pm.mask_after_eos(tokens, eos_id=2)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]  # EOS first, middle, none
    assert ended.tolist() == [True, True, False]
    # pad == eos (GPT-2 style): the first EOS stays in, the rest is masked
    mask, ended = pm.mask_after_eos(T([[5, 2, 2, 2]]), eos_id=2, pad_id=2)
    assert mask.tolist() == [[1, 1, 0, 0]] and ended.tolist() == [True]
    # distinct pad without EOS: padding masked, still not ended
    mask, ended = pm.mask_after_eos(T([[5, 6, 0, 0]]), eos_id=2, pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0]] and ended.tolist() == [False]
    # several stop ids
    mask, ended = pm.mask_after_eos(T([[5, 9, 2]]), eos_id=(2, 9))
    assert mask.tolist() == [[1, 1, 0]] and ended.tolist() == [True]


def test_vf_clipfrac_counts_no_token_when_the_clip_is_inactive():
    """``old + (v - old)`` need not round back to ``v`` (values near 0 of either sign, as a fresh
    value head gives): such float round-off must not count as clipping."""
    g = torch.Generator().manual_seed(0)
    old, v = 0.01 * torch.randn(4, 256, generator=g), 0.01 * torch.randn(4, 256, generator=g)
    returns = torch.randn(4, 256, generator=g)
    _, stats = pm.value_loss(v, old, returns, torch.ones(4, 256), clip_range=0.2)
    assert float(stats["vf_clipfrac"]) == 0.0
