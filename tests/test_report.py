"""``python -m hybrid_ds.report OUT`` on a real (in-process) hybrid run: its numbers are the window
means of metrics.jsonl, computed here."""

import json
import subprocess
import sys

import pytest

from inproc import base, make_run
from launch_utils import REPO, env


def test_report_prints_the_window_means_of_metrics_jsonl(tmp_path):
    from hybrid_ds.run.loop import train

    cfg = base(tmp_path, "hybrid", MAX_STEPS=4, LOG_EVERY=1)
    run = make_run(cfg)
    train(run)
    run.logger.close()
    out = cfg["OUTPUT_DIR"]
    with open(f"{out}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    p = subprocess.run([sys.executable, "-m", "hybrid_ds.report", out, "--windows", "2"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    for phase, keys in (("sft", ["sft/loss"]), ("ppo", ["ppo/reward_mean", "objective/kl", "objective/kl_coef",
                                                       "ppo/response_len", "ppo/eos_frac", "ppo/clipfrac"])):
        mine = [r for r in rows if r["phase"] == phase]
        assert len(mine) == 4
        assert f"{phase}: 4 logged steps (mean per window, first -> last)" in lines
        for k in keys:
            printed = next(ln for ln in lines if ln.split()[:1] == [k]).split()[1:]
            vals = [r[k] for r in mine]
            expected = [(vals[0] + vals[1]) / 2, (vals[2] + vals[3]) / 2]
            assert [float(x) for x in printed] == pytest.approx(expected, abs=5e-5), (k, printed, expected)
        times = next(ln for ln in lines if ln.strip().startswith("seconds per step") and
                     lines.index(ln) > lines.index(f"{phase}: 4 logged steps (mean per window, first -> last)"))
        name, value = times.split(":", 1)[1].split(",")[0].split()
        assert value == f"{sum(r[f'time/{name}_s'] for r in mine) / 4:.3f}"
    missing = subprocess.run([sys.executable, "-m", "hybrid_ds.report", str(tmp_path / "nothing")], cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr
