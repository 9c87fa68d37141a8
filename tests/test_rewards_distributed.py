"""ema_normalize across 2 gloo processes equals one process scoring the concatenated batches."""

import json
import socket

import pytest
import rewards_helpers as helpers

from hybrid_ds.rewards import make_reward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ema_normalize_is_identical_across_ranks(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    world = 2
    mp.spawn(helpers.ema_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    # identical running statistics on both ranks although each saw different data
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["state"]["postprocess"][0]["count"] == sum(
        len(shards[r][0]) for shards in helpers.ema_steps(world) for r in range(world))

    # and exactly what one process computes on the whole batch of each step
    single = make_reward(helpers.EMA_SPEC)
    for step, shards in enumerate(helpers.ema_steps(world)):
        responses = [x for r in range(world) for x in shards[r][0]]
        targets = [x for r in range(world) for x in shards[r][1]]
        expected = single.score_batch(responses, targets)
        got = ranks[0]["outputs"][step] + ranks[1]["outputs"][step]
        assert got == pytest.approx(expected, abs=1e-12)
    assert single.state_dict()["postprocess"][0] == pytest.approx(ranks[0]["state"]["postprocess"][0])
    # each rank normalises its own data: the outputs differ between ranks
    assert ranks[0]["outputs"][0] != ranks[1]["outputs"][0][: len(ranks[0]["outputs"][0])]
