"""The PI KL controller: hand-checked beta values on a synthetic KL sequence, and closed-loop control."""

import math

import pytest

from hybrid_ds.algorithms.kl_control import PIKLController, make_kl_controller


def test_pi_controller_by_hand():
    ctl = PIKLController(0.1, target=1.0, kp=0.5, ki=0.2)
    # KL e^0.5: e = 0.5, I = 0.5 -> beta = 0.1 * exp(0.25 + 0.1)
    assert ctl.update(math.exp(0.5), 4) == pytest.approx(0.1 * math.exp(0.35))
    # KL 100: e clipped to 1, I = 1.5 -> beta = 0.1 * exp(0.5 + 0.3)
    assert ctl.update(100.0, 4) == pytest.approx(0.1 * math.exp(0.8))
    # KL at target: e = 0, the integral keeps beta up: 0.1 * exp(0.2 * 1.5)
    assert ctl.update(1.0, 4) == pytest.approx(0.1 * math.exp(0.3))
    # KL e^-0.25: e = -0.25, I = 1.25 -> 0.1 * exp(-0.125 + 0.25)
    assert ctl.update(math.exp(-0.25), 4) == pytest.approx(0.1 * math.exp(0.125))
    # a non-finite measurement changes nothing
    assert ctl.update(float("nan"), 4) == pytest.approx(0.1 * math.exp(0.125)) and ctl.integral == 1.25


def test_pi_controller_reaches_the_target_within_tens_of_updates():
    """Plant: KL = 2 / beta (a policy that drifts twice as far when beta halves). From beta 0.2 the
    KL is 10, 33 times the target 0.3; the controller is within 15 % by update 25 and 3 % by 40.
    Ziegler's rule with 4 samples per update and horizon 10 000 has barely moved by then."""
    pi = make_kl_controller(0.2, 0.3, 10000, kind="pi")
    zg = make_kl_controller(0.2, 0.3, 10000, kind="ziegler")
    kls = []
    for _ in range(40):
        kls.append(2.0 / pi.value)
        pi.update(kls[-1], 4)
        zg.update(2.0 / zg.value, 4)
    assert abs(kls[25] / 0.3 - 1) < 0.15 and abs(kls[-1] / 0.3 - 1) < 0.03
    assert max(kls[25:]) < 0.345 and min(kls) > 0.3  # approached from above, no overshoot
    assert zg.value < 0.21


def test_pi_controller_state_round_trips():
    a = PIKLController(0.2, 0.3)
    for kl in (3.0, 1.0, 0.2):
        a.update(kl, 8)
    b = PIKLController(0.2, 0.3)
    b.load_state_dict(a.state_dict())
    assert (b.value, b.integral) == (a.value, a.integral)
    assert a.update(0.5, 8) == b.update(0.5, 8)
