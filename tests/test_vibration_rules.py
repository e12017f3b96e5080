"""HI's rule and the cost-sensitive two-threshold rule (arXiv 2509.15674) of the fault hierarchy."""

from __future__ import annotations

import numpy as np
import pytest

from vibration.rules import HiRule, TwoThresholdRule, fit_two_thresholds, theta_for_offload


def test_hi_rule_offloads_below_theta() -> None:
    rule = HiRule(0.8)
    assert rule.decide(np.array([0.1, 0.85, 0.05, 0.0])).offload is False
    unsure = rule.decide(np.array([0.5, 0.3, 0.1, 0.1]))
    assert unsure.offload and unsure.prediction == 0 and unsure.p_fault == pytest.approx(0.5)
    with pytest.raises(ValueError):
        HiRule(1.5)


def test_two_thresholds_closed_form_from_costs() -> None:
    # a miss costs 10, a false alarm 1, an offload 0.5: low = min(0.05, 1/11), high = max(0.5, 1/11)
    rule = TwoThresholdRule.from_costs(miss_cost=10.0, false_alarm_cost=1.0, offload_cost=0.5)
    assert rule.low == pytest.approx(0.05) and rule.high == pytest.approx(0.5)
    # offloading free: never decide locally unless certain
    free = TwoThresholdRule.from_costs(10.0, 1.0, 0.0)
    assert (free.low, free.high) == (0.0, 1.0)
    # offloading dearer than any error: one threshold at the cost balance, nothing offloaded
    dear = TwoThresholdRule.from_costs(10.0, 1.0, 100.0)
    assert dear.low == dear.high == pytest.approx(1 / 11)


def test_two_threshold_decisions_pick_the_likeliest_fault() -> None:
    rule = TwoThresholdRule(0.1, 0.6)
    healthy = rule.decide(np.array([0.95, 0.02, 0.02, 0.01]))
    assert not healthy.offload and healthy.prediction == 0
    fault = rule.decide(np.array([0.3, 0.1, 0.2, 0.4]))  # p_fault 0.7 >= 0.6
    assert not fault.offload and fault.prediction == 3
    middle = rule.decide(np.array([0.6, 0.3, 0.05, 0.05]))  # p_fault 0.4: unsure
    assert middle.offload
    with pytest.raises(ValueError):
        TwoThresholdRule(0.7, 0.2)


def test_fit_keeps_misses_rare_when_they_cost_more() -> None:
    rng = np.random.default_rng(0)
    is_fault = rng.random(2000) < 0.75
    p = np.clip(np.where(is_fault, rng.normal(0.75, 0.2, 2000), rng.normal(0.25, 0.2, 2000)), 0, 1)
    cheap_miss = fit_two_thresholds(p, is_fault, 1.0, 1.0, 0.3, max_offload=0.2)
    dear_miss = fit_two_thresholds(p, is_fault, 20.0, 1.0, 0.3, max_offload=0.2)

    def misses(rule: TwoThresholdRule) -> float:
        return float(((p <= rule.low) & is_fault).mean())

    def offloaded(rule: TwoThresholdRule) -> float:
        return float(((p > rule.low) & (p < rule.high)).mean())

    assert misses(dear_miss) < misses(cheap_miss)
    assert offloaded(dear_miss) <= 0.2 and offloaded(cheap_miss) <= 0.2


def test_theta_for_offload_is_the_quantile() -> None:
    conf = np.linspace(0.0, 1.0, 101)
    theta = theta_for_offload(conf, 0.2)
    assert float((conf < theta).mean()) == pytest.approx(0.2, abs=0.011)
    assert theta_for_offload(conf, 0.0) == 0.0
