"""The reference model on its own ranks: placement arithmetic, the bridge protocol, faults.

Fast tier: placement and environment rewriting as pure functions, request merging, and the
protocol with every rank of a layout played by a thread of this process (real gloo groups).
Slow tier: real launches (torchrun and a deepspeed-launcher-like environment), DeepSpeed ZeRO-3 on
the policy ranks while the reference serves, and a reference that raises or is SIGKILLed.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch

from hybrid_ds.engine.placement import (Placement, connect_bridge, placement_problems, policy_world_size,
                                 setup_placement)
from hybrid_ds.reference.protocol import Request, RefClient, RefServer, merge_requests, model_logprob_fn
from inproc import full_forward_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "scripts", "refproto_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
import refproto_worker as W  # noqa: E402  (tiny model and rollouts shared with the launched workers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_of(rank, world, port, **extra):
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **extra}


# --------------------------------------------------------------------------------------
# placement


def test_roles_and_who_serves_whom():
    ps = [Placement.from_env("separate", 2, env_of(r, 5, 1234)) for r in range(5)]
    assert [p.role for p in ps] == ["policy"] * 3 + ["reference"] * 2
    assert [p.role_rank for p in ps] == [0, 1, 2, 0, 1]
    assert ps[0].policy_world == 3
    assert [ps[0].reference_of(p) for p in range(3)] == [3, 4, 3]  # p -> P + p % R
    assert ps[0].clients_of(0) == [0, 2] and ps[0].clients_of(1) == [1]
    assert [p.bridge_members for p in ps] == [[3, 0, 2], [4, 1], [3, 0, 2], [3, 0, 2], [4, 1]]
    assert "reference rank 4" in str(ps[4])


def test_policy_env_shrinks_to_the_policy_world():
    # two nodes of four (torchrun), two reference ranks at the end of node 1
    env = env_of(5, 8, 29500, LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", ROLE_WORLD_SIZE="8", GROUP_WORLD_SIZE="2")
    ch = Placement.from_env("separate", 2, env).role_env(env)
    assert ch["WORLD_SIZE"] == "6" and ch["ROLE_WORLD_SIZE"] == "6"
    assert ch["LOCAL_WORLD_SIZE"] == "2"  # ranks 4 and 5 are this node's policy ranks
    assert ch["GROUP_WORLD_SIZE"] == "2" and ch["HYBRID_DS_ROLE"] == "policy"
    assert "RANK" not in ch and "LOCAL_RANK" not in ch  # devices and data shards unchanged
    # deepspeed launcher, one node: LOCAL_SIZE drives DeepSpeed's shared-memory all-reduce
    env = env_of(0, 3, 29500, LOCAL_SIZE="3", CROSS_SIZE="1")
    ch = Placement.from_env("separate", 1, env).role_env(env)
    assert ch["WORLD_SIZE"] == "2" and ch["LOCAL_SIZE"] == "2" and ch["CROSS_SIZE"] == "1"
    # reference ranks lose MASTER_*: an accidental init_process_group fails instead of joining the policy
    ch = Placement.from_env("separate", 1, env_of(2, 3, 29500)).role_env(env_of(2, 3, 29500))
    assert ch["MASTER_ADDR"] is None and ch["MASTER_PORT"] is None and ch["HYBRID_DS_ROLE"] == "reference"


def test_placement_problems_and_colocated():
    assert placement_problems("colocated", 5, 1) == []
    assert placement_problems("separate", 1, 3) == []
    assert "smaller than the 2" in placement_problems("separate", 2, 2)[0]
    assert "at least 1" in placement_problems("separate", 0, 4)[0]
    assert "not one of" in placement_problems("seperate", 1, 4)[0]
    assert policy_world_size("separate", 1, 3) == 2 and policy_world_size("colocated", 1, 3) == 3
    with pytest.raises(ValueError, match="smaller than"):
        Placement.from_env("separate", 3, env_of(0, 3, 1))
    with pytest.raises(RuntimeError, match="already"):
        Placement.from_env("separate", 1, {**env_of(0, 3, 1), "HYBRID_DS_ROLE": "policy"})
    before = dict(os.environ)
    assert setup_placement(Placement.from_env("colocated", 1, env_of(0, 2, 1))) is None
    assert dict(os.environ) == before


# --------------------------------------------------------------------------------------
# merging requests of several clients


@pytest.fixture(scope="module")
def model():
    return W.tiny_gpt2(seed=0)


def local_logprobs(model, ro):
    from hybrid_ds.algorithms.ppo import forward_logprobs

    return forward_logprobs(model, ro, W.TEMPERATURE, 2, with_values=False)[0]


def as_request(rank, ro):
    from hybrid_ds.models.logprobs import sequence_inputs

    ids, att, _ = sequence_inputs(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
    return Request(rank, 1, ids, att, ro.query_ids.shape[1], ro.response_ids.shape[1], W.TEMPERATURE)


def test_merged_batch_gives_each_request_its_own_logprobs(model):
    """Left-padding prompts and right-padding responses to a common shape changes nothing (fp32)."""
    ros = [W.rollout(r, s) for r, s in ((0, 0), (1, 1), (2, 0))]
    reqs = [as_request(i, ro) for i, ro in enumerate(ros)]
    assert len({(r.P, r.T) for r in reqs}) == 3
    ids, mask, P, T = merge_requests(reqs)
    assert (P, T) == (max(r.P for r in reqs), max(r.T for r in reqs))
    out = model_logprob_fn(model)(ids, mask, P, T, W.TEMPERATURE)
    row = 0
    for ro, r in zip(ros, reqs):
        b = r.input_ids.shape[0]
        torch.testing.assert_close(out[row:row + b, :r.T], local_logprobs(model, ro), atol=1e-6, rtol=0)
        row += b
    # unmerged and chunked: bit-identical to the colocated computation (ppo.forward_logprobs, which
    # shares lm_response_logprobs with it), and both equal a plain full forward computed here
    one = model_logprob_fn(model, chunk=2)(reqs[0].input_ids, reqs[0].attention_mask, reqs[0].P, reqs[0].T,
                                           W.TEMPERATURE)
    assert torch.equal(one, local_logprobs(model, ros[0]))
    for ro, r in zip(ros, reqs):
        got = model_logprob_fn(model)(r.input_ids, r.attention_mask, r.P, r.T, W.TEMPERATURE)
        torch.testing.assert_close(got, naive_logprobs(model, ro), atol=1e-5, rtol=0)


def naive_logprobs(model, ro):
    """inproc.full_forward_logprobs at the layout's temperature, in float32 as the protocol answers."""
    return full_forward_logprobs(model, ro, W.TEMPERATURE).float()


# --------------------------------------------------------------------------------------
# the protocol, each rank a thread of this process


def run_layout(world, ref_ranks, policy_fn, server_fn, timeout_s=20.0):
    """Play every rank of a launch in a thread; returns ({rank: result}, {rank: exception})."""
    from torch.distributed import PrefixStore, TCPStore

    port = free_port()
    host = TCPStore("127.0.0.1", port, None, True, timedelta(seconds=30), wait_for_workers=False)
    results, errors = {}, {}

    def body(rank):
        try:
            pl = Placement.from_env("separate", ref_ranks, env_of(rank, world, port))
            store = host if rank == 0 else TCPStore("127.0.0.1", port, None, False, timedelta(seconds=30))
            bridge = connect_bridge(pl, PrefixStore("test/", store), timeout_s)
            results[rank] = (policy_fn if pl.role == "policy" else server_fn)(pl, bridge)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors[rank] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results, errors


def ask(client, ro, blocking=True):
    from hybrid_ds.models.logprobs import sequence_inputs

    ids, att, _ = sequence_inputs(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
    args = (ids, att, ro.query_ids.shape[1], ro.response_ids.shape[1], W.TEMPERATURE)
    return client.logprobs(*args) if blocking else client.request(*args)


@pytest.mark.parametrize("world,ref_ranks", [(3, 1), (4, 1), (4, 2)], ids=["2+1", "3+1", "2+2"])
def test_layouts_answer_like_the_colocated_reference(model, world, ref_ranks):
    def policy(pl, bridge):
        diffs = []
        with RefClient(bridge) as client:
            for step in range(2):
                ro = W.rollout(pl.rank, step)
                if step == 0:
                    lp = ask(client, ro)
                else:  # non-blocking, local work meanwhile
                    pending = ask(client, ro, blocking=False)
                    local = local_logprobs(model, ro)
                    lp = pending.wait()
                assert lp.dtype == torch.float32 and lp.shape == ro.response_ids.shape
                diffs.append(float((lp - local_logprobs(model, ro)).abs().max()))
        return max(diffs)

    def server(pl, bridge):
        return RefServer(bridge, model_logprob_fn(model)).serve()

    results, errors = run_layout(world, ref_ranks, policy, server)
    assert not errors, errors
    P = world - ref_ranks
    assert max(results[p] for p in range(P)) <= 1e-6
    for r in range(P, world):
        clients = len(range(r - P, P, ref_ranks))
        assert results[r].requests == 2 * clients and results[r].rounds == 2  # one batch per round


def test_requests_complete_in_order_and_shapes_are_checked(model):
    def policy(pl, bridge):
        with RefClient(bridge) as client:
            ros = [W.rollout(0, s) for s in range(3)]
            pend = [ask(client, ro, blocking=False) for ro in ros]
            out = [pend[2].wait(), pend[0].wait(), pend[1].wait()]  # waiting out of order is fine
            with pytest.raises(ValueError, match="P \\+ T == L"):
                client.logprobs(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), 3, 3, 1.0)
        return [float((o - local_logprobs(model, ros[i])).abs().max()) for i, o in zip((2, 0, 1), out)]

    results, errors = run_layout(2, 1, policy, lambda pl, b: RefServer(b, model_logprob_fn(model)).serve())
    assert not errors, errors
    assert max(results[0]) <= 1e-6 and results[1].requests == 3


def test_compute_error_reaches_every_client_with_the_reference_rank(model):
    compute = model_logprob_fn(model)
    calls = []

    def failing(*a):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom in compute_fn")
        return compute(*a)

    def policy(pl, bridge):
        with RefClient(bridge) as client:
            for step in range(3):
                ask(client, W.rollout(pl.rank, step))

    results, errors = run_layout(3, 1, policy, lambda pl, b: RefServer(b, failing).serve())
    assert isinstance(errors[2], ValueError)
    for p in (0, 1):
        assert "reference rank 2 failed: ValueError: boom in compute_fn" in str(errors[p])


def test_policy_abort_stops_the_reference_and_its_other_clients(model):
    def policy(pl, bridge):
        with RefClient(bridge) as client:
            ask(client, W.rollout(pl.rank, 0))
            if pl.rank == 1:
                raise RuntimeError("policy rank 1 broke")
            ask(client, W.rollout(pl.rank, 1))

    results, errors = run_layout(3, 1, policy, lambda pl, b: RefServer(b, model_logprob_fn(model)).serve())
    assert "policy rank 1 broke" in str(errors[1])
    assert "policy rank 1 aborted" in str(errors[2])
    assert "reference rank 2" in str(errors[0]) and "policy rank 1 aborted" in str(errors[0])


def test_a_hung_reference_times_out_with_its_rank(model):
    release = threading.Event()

    def hanging(*a):
        release.wait(30)
        raise RuntimeError("released")

    def policy(pl, bridge):
        try:
            with RefClient(bridge) as client:
                ask(client, W.rollout(0, 0))
        finally:
            release.set()

    results, errors = run_layout(2, 1, policy, lambda pl, b: RefServer(b, hanging, watchdog=False).serve(),
                                 timeout_s=1.0)
    assert "reference rank 1 did not answer within 1 s" in str(errors[0])
    assert 1 in errors  # the server notices too (its reply cannot be delivered)


def test_one_reference_rank_answers_for_each_refs_model(model):
    """REFS on its own ranks (2 policy ranks, 1 reference holding two models): each policy rank sends one
    request per model, all before waiting; each is answered by its own model (as the colocated
    ``ppo.forward_logprobs`` of that model, to fp32 rounding), one round per model. A request for a model
    the reference does not hold reaches its client as the reference's error, naming the model."""
    other = W.tiny_gpt2(seed=1)

    def policy(pl, bridge):
        from hybrid_ds.models.logprobs import sequence_inputs

        ro = W.rollout(pl.rank, 0)
        ids, att, _ = sequence_inputs(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
        with RefClient(bridge) as client:
            pending = [client.request(ids, att, ro.query_ids.shape[1], ro.response_ids.shape[1], W.TEMPERATURE, ref=k)
                       for k in (0, 1)]
            return [float((p.wait() - local_logprobs(m, ro)).abs().max()) for p, m in zip(pending, (model, other))]

    def server(pl, bridge):
        return RefServer(bridge, [model_logprob_fn(model), model_logprob_fn(other)]).serve()

    results, errors = run_layout(3, 1, policy, server)
    assert not errors, errors
    assert max(results[0] + results[1]) <= 1e-6
    assert results[2].requests == 4 and results[2].rounds == 2
    assert float((local_logprobs(model, W.rollout(0, 0)) - local_logprobs(other, W.rollout(0, 0))).abs().max()) > 1e-2

    def too_far(pl, bridge):
        r = as_request(pl.rank, W.rollout(pl.rank, 0))
        with RefClient(bridge) as client:
            client.request(r.input_ids, r.attention_mask, r.P, r.T, W.TEMPERATURE, ref=2).wait()

    results, errors = run_layout(2, 1, too_far, server)
    assert isinstance(errors[1], ValueError), errors
    assert "reference rank 1 failed: ValueError: a request for model 2; this reference holds 2" in str(errors[0])


def test_sync_mixes_the_policy_weights_like_the_colocated_copy(model):
    """REF_SYNC_EVERY over the bridge (2 policy ranks, 1 reference): a SYNC with alpha 0.25 leaves the
    reference's weights bit-equal to ``Dist.copy_weights`` (the colocated path) and the next request is
    answered by them; a policy of another architecture gets the reference's error, naming its rank."""
    import copy

    from hybrid_ds.engine.dist import Dist
    from hybrid_ds.engine.launch_plan import LaunchPlan
    from hybrid_ds.engine.param_stream import parameter_manifest, whole_parameters

    policy_lm, alpha = W.tiny_gpt2(seed=1), 0.25
    expected = copy.deepcopy(model)
    Dist(0, 1, 0, torch.device("cpu"), LaunchPlan(0, "no", None, "test")).copy_weights(policy_lm, expected, alpha)
    served = copy.deepcopy(model)

    def policy(pl, bridge):
        with RefClient(bridge) as client:
            before = ask(client, W.rollout(pl.rank, 0))
            client.sync(parameter_manifest(policy_lm), whole_parameters(policy_lm), alpha)
            after = ask(client, W.rollout(pl.rank, 1))
        return before, after

    def server(pl, bridge):
        return RefServer(bridge, model_logprob_fn(served), weights=list(served.parameters())).serve()

    results, errors = run_layout(3, 1, policy, server)
    assert not errors, errors
    assert results[2].syncs == 1 and results[2].requests == 4
    for (a, b), (c, d) in zip(expected.named_parameters(), served.named_parameters()):
        assert a == c and torch.equal(b, d), a
    for p in (0, 1):
        assert torch.equal(results[p][0], local_logprobs(model, W.rollout(p, 0)))
        assert torch.equal(results[p][1], local_logprobs(expected, W.rollout(p, 1)))

    other = W.tiny_gpt2(seed=1)
    other.transformer.h = other.transformer.h[:1]  # one block fewer: the manifest does not fit

    def mismatched(pl, bridge):
        with RefClient(bridge) as client:
            client.sync(parameter_manifest(other), whole_parameters(other), 1.0)

    results, errors = run_layout(3, 1, mismatched, server)
    assert isinstance(errors[2], ValueError) and "the reference has" in str(errors[2])
    for p in (0, 1):
        assert "reference rank 2 failed: ValueError: reference sync: the policy sends" in str(errors[p]), errors[p]


# --------------------------------------------------------------------------------------
# real launches (slow tier)


def worker_env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HYBRID_DS_ROLE"):
        e.pop(k, None)
    return e


def spawn(world, out, *args, timeout=240):
    """Start ``world`` workers with the environment the deepspeed launcher gives (no torchrun agent)."""
    port, procs = free_port(), []
    t0 = time.perf_counter()
    for r in range(world):
        env = dict(worker_env(), **env_of(r, world, port, LOCAL_SIZE=str(world)))
        procs.append(subprocess.Popen([sys.executable, WORKER, "--out", str(out), *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs, ends = [], []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1, timeout - (time.perf_counter() - t0)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"launch hung:\n{p.communicate()[0][-3000:]}") from None
        ends.append(time.perf_counter() - t0)
    return [p.returncode for p in procs], logs, ends


def results(out, world):
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def check_ok(codes, logs):
    assert codes == [0] * len(codes), "\n\n".join(f"rank {r} exit {c}:\n{l[-2500:]}"
                                                  for r, (c, l) in enumerate(zip(codes, logs)) if c)


@pytest.mark.slow
def test_torchrun_two_policy_one_reference(tmp_path):
    """(a) torchrun (the agent's store): reference log-probs equal the local ones within 1e-6 (fp32)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port",
           str(free_port()), WORKER, "--ref-ranks", "1", "--out", str(tmp_path)]
    p = subprocess.run(cmd, env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    check_ok([p.returncode], [p.stdout + p.stderr])
    res = results(tmp_path, 3)
    assert [r["world"] for r in res[:2]] == [2, 2]  # the policy's default group holds the policy only
    assert max(r["max_diff"] for r in res[:2]) <= 1e-6
    assert res[2] == {"requests": 6, "rows": 18, "rounds": 3, "role": "reference"}


@pytest.mark.slow
@pytest.mark.parametrize("world,ref_ranks", [(4, 2)], ids=["2+2"])
def test_launch_layouts(tmp_path, world, ref_ranks):
    """(b) deepspeed-launcher environment (rank 0 hosts the store), two reference ranks. The 3+1
    layout runs in the fast tier (threads, real gloo groups); 2+1 under torchrun and ZeRO-3."""
    codes, logs, _ = spawn(world, tmp_path, "--ref-ranks", str(ref_ranks))
    check_ok(codes, logs)
    res = results(tmp_path, world)
    P = world - ref_ranks
    assert all(r["world"] == P and r["max_diff"] <= 1e-6 for r in res[:P])
    assert sum(r["requests"] for r in res[P:]) == 3 * P


@pytest.mark.slow
def test_zero3_policy_trains_while_the_reference_serves(tmp_path):
    """(c) DeepSpeed ZeRO-3 initialises and steps on the 2 policy ranks: it never sees the reference rank."""
    codes, logs, _ = spawn(3, tmp_path, "--zero3")
    check_ok(codes, logs)
    res = results(tmp_path, 3)
    for r in res[:2]:
        assert r["world"] == 2 and r["max_diff"] <= 1e-6
        assert len(r["losses"]) == 3 and all(0 < x < 10 for x in r["losses"])


@pytest.mark.slow
@pytest.mark.parametrize("fault,expect", [("raise", "reference rank 2 failed: ValueError: boom"),
                                          ("kill", "reference rank 2 closed its connection"),
                                          ("kill-sync", "reference rank 2 closed its connection")])
def test_reference_fault_stops_every_rank(tmp_path, fault, expect):
    """(d) compute_fn raises, (e) the reference is SIGKILLed, (f) SIGKILLed while it takes the policy's
    weights (REF_SYNC_EVERY): every process exits non-zero, well within the bridge timeout after the
    fault, each policy rank naming the reference rank."""
    timeout = 60
    codes, logs, ends = spawn(3, tmp_path, "--fault", fault, "--timeout", str(timeout), timeout=200)
    assert all(c != 0 for c in codes), codes
    assert codes[2] == (-9 if fault.startswith("kill") else 1)
    for log in logs[:2]:
        assert expect in log, log[-2500:]
    if fault == "kill-sync":  # the sending rank mid-stream, the other waiting for the reference to take them
        assert "while sending weight 4 of" in logs[0] or "while sending weight 5 of" in logs[0], logs[0][-2500:]
        assert "while waiting for the reference to take the weights" in logs[1], logs[1][-2500:]
    assert max(ends) - min(ends) < timeout, ends  # nobody waited out the timeout after the fault
