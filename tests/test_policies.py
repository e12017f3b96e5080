"""Offload policies: the registry, each policy's rule, and hi-online's regret on a synthetic stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from device_agent.card import load_card
from device_agent.policies import (
    Action,
    Decision,
    EdgeView,
    Outcome,
    Policy,
    PolicyError,
    make_policy,
    policy_names,
    register_policy,
)
from device_agent.rule import entropy_row

CARD = {"thresholds": {"entropy_tau": 0.4, "hi_theta": 0.8}}


def view(probs, **kw) -> EdgeView:
    p = np.asarray(probs, dtype=np.float32)
    defaults = dict(
        stage="main",
        prediction=int(p.argmax()),
        exit_stage="main",
        p_main=float(p.max()),
        entropy=entropy_row(p),
    )
    defaults.update(kw)
    return EdgeView(probs=p, **defaults)


def test_all_six_policies_are_registered() -> None:
    assert set(policy_names()) >= {
        "edge-only",
        "cloud-only",
        "meanet",
        "hi-threshold",
        "hi-online",
        "entropy",
    }


def test_registry_refuses_a_duplicate_name() -> None:
    with pytest.raises(PolicyError, match="already registered"):

        @register_policy("entropy")
        class Impostor(Policy):
            pass

    assert type(make_policy({"name": "entropy", "params": {}}, CARD)).__name__ == "EntropyFilter"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "no-such-policy"}, "unknown policy 'no-such-policy'; known: cloud-only"),
        (
            {"name": "hi-threshold", "params": {"thet": 0.5}},
            "takes no parameter 'thet'; it takes: theta, edge",
        ),
        ({"name": "hi-threshold", "params": {"theta": 1.5}}, r"theta must be a number in \[0, 1\]"),
        ({"name": "hi-threshold", "params": {"theta": "high"}}, "theta must be a number"),
        ({"name": "entropy", "params": {"edge": "gpu"}}, "edge must be one of"),
        ({"name": "meanet", "params": {"tau": 0.1}}, "takes no parameter 'tau'; it takes: none"),
        ({"name": "hi-online", "params": {"beta": -1}}, "beta must be a non-negative number"),
        ({"name": "hi-online", "params": {"grid": 1}}, "grid needs at least 2 thetas"),
        ({"name": "hi-online", "params": {"grid": [0.5, 2.0]}}, "grid value must be a number in"),
        ({"name": "entropy", "params": [0.3]}, "params of policy 'entropy' must be a map"),
        ({"name": "entropy", "param": {}}, "unknown keys"),
        ("entropy", "is configured as"),
    ],
)
def test_bad_specs_get_a_clear_error(spec, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        make_policy(spec, CARD)


def test_thresholds_default_to_the_card_and_params_override(tiny_models: Path) -> None:
    card = load_card(tiny_models)
    raw = json.loads((tiny_models / "card.json").read_text())
    assert make_policy({"name": "hi-threshold"}, card).params()["theta"] == raw["thresholds"]["hi_theta"]
    assert make_policy({"name": "entropy"}, raw).params()["tau"] == raw["thresholds"]["entropy_tau"]
    assert make_policy({"name": "hi-threshold", "params": {"theta": 0.5}}, card).params()["theta"] == 0.5
    with pytest.raises(PolicyError, match="thresholds.hi_theta"):
        make_policy({"name": "hi-threshold"}, None)


def test_edge_only_and_cloud_only() -> None:
    confident, unsure = view([0.98, 0.01, 0.01]), view([0.34, 0.33, 0.33])
    edge, cloud = make_policy({"name": "edge-only"}), make_policy({"name": "cloud-only"})
    assert [edge.decide(v).action for v in (confident, unsure)] == [Action.EXIT, Action.EXIT]
    assert [cloud.decide(v).action for v in (confident, unsure)] == [Action.OFFLOAD, Action.OFFLOAD]
    assert (edge.edge, cloud.edge) == ("full", "none")  # edge-only: extension ungated; cloud-only: nothing
    assert make_policy({"name": "cloud-only", "params": {"edge": "main"}}).edge == "main"


def test_hi_threshold_accepts_at_theta_and_offloads_below() -> None:
    policy = make_policy({"name": "hi-threshold"}, CARD)  # theta 0.8 from the card
    assert policy.decide(view([0.8, 0.2])).action is Action.EXIT  # >= theta
    assert policy.decide(view([0.79, 0.21])).action is Action.OFFLOAD


def test_entropy_filter_offloads_above_tau() -> None:
    policy = make_policy({"name": "entropy", "params": {"tau": 0.5}})
    assert policy.decide(view([0.97, 0.01, 0.01, 0.01])).action is Action.EXIT
    assert policy.decide(view([0.25, 0.25, 0.25, 0.25])).action is Action.OFFLOAD
    # no entropy: no edge answer to trust
    assert policy.decide(view([0.97, 0.01, 0.01, 0.01], entropy=None)).action is Action.OFFLOAD


def test_meanet_follows_the_cascade_verdict_and_needs_it() -> None:
    policy = make_policy({"name": "meanet"}, CARD)
    assert policy.edge == "cascade" and policy.params() == {"entropy_tau": 0.4}
    assert policy.decide(view([0.6, 0.4], stage="cascade", complex=True)).action is Action.OFFLOAD
    assert policy.decide(view([0.6, 0.4], stage="cascade", complex=False)).action is Action.EXIT
    with pytest.raises(PolicyError, match="cascade's verdict"):
        policy.decide(view([0.6, 0.4]))


# -- hi-online ------------------------------------------------------------------------------------------
def run_stream(policy: Policy, n: int, seed: int, with_labels: bool = True) -> None:
    """Calibrated synthetic edge: confidence c ~ U(0.5, 1), the edge answer is right with probability c.
    The cloud answers right (the label); the policy learns only from the cloud's answers."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        c = float(rng.uniform(0.5, 1.0))
        label = 0 if rng.random() < c else 1
        v = view([c, 1.0 - c])
        decision = policy.decide(v)
        cloud: Optional[int] = label if decision.action is Action.OFFLOAD else None
        policy.observe(Outcome(v, decision, cloud_prediction=cloud, label=label if with_labels else None))


def test_hi_online_learns_the_best_threshold_and_its_regret_per_sample_shrinks() -> None:
    beta = 0.3  # offloading costs 0.3 of a wrong answer: the best fixed rule accepts when 1 - c < 0.3
    per_sample_regret = {300: [], 3000: []}
    for seed in (1, 2, 3):
        for n in (300, 3000):
            policy = make_policy({"name": "hi-online", "params": {"beta": beta, "seed": seed}})
            run_stream(policy, n, seed=seed + 1)
            report = policy.report()
            per_sample_regret[n].append(report["regret"] / n)
        assert report["scored"] == 3000 and report["unscored"] == 0
        assert report["regret"] == pytest.approx(report["cost"] - report["best_fixed_cost"])
        assert report["best_fixed_theta"] == pytest.approx(1 - beta, abs=0.051)
        assert abs(report["theta"] - report["best_fixed_theta"]) <= 0.1 + 1e-9  # within 2 grid steps
        # it beats both trivial rules: accept everything (theta 0) and offload everything (theta 1)
        costs = report["fixed_theta_costs"]
        assert report["cost"] < min(costs["0.000"], costs["1.000"])
    # regret against the best fixed theta in hindsight is small and shrinks per sample (sublinear in T)
    short, long = np.mean(per_sample_regret[300]), np.mean(per_sample_regret[3000])
    assert long < 0.03
    assert long < short


def test_hi_online_learns_from_cloud_answers_only() -> None:
    """Labels score the policy; they must not steer it: with and without labels it takes the same actions."""
    a = make_policy({"name": "hi-online", "params": {"beta": 0.3, "seed": 5}})
    b = make_policy({"name": "hi-online", "params": {"beta": 0.3, "seed": 5}})
    run_stream(a, 500, seed=3, with_labels=True)
    run_stream(b, 500, seed=3, with_labels=False)
    ra, rb = a.report(), b.report()
    assert ra["theta"] == rb["theta"] and ra["offload_fraction"] == rb["offload_fraction"]
    # without labels only offloaded samples can be scored (by the cloud's answer)
    assert rb["scored"] == round(rb["offload_fraction"] * 500) and rb["unscored"] == 500 - rb["scored"]


def test_hi_online_reports_probability_and_needs_an_edge_answer() -> None:
    policy = make_policy({"name": "hi-online"})
    decision = policy.decide(view([0.9, 0.1]))
    assert decision.offload_prob is not None and 0.0 < decision.offload_prob <= 1.0
    with pytest.raises(PolicyError, match="needs an edge answer"):
        policy.observe(Outcome(EdgeView(stage="none"), Decision(Action.OFFLOAD, 1.0), cloud_prediction=1))
