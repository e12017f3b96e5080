"""`hi-online`: the Hierarchical-Inference threshold learned online (Hedge over a grid of thetas).

After Moothedath, Champati and Gross, "Online Algorithms for Hierarchical Inference in Deep Learning
applications at the Edge" (arXiv 2304.00891; HIL-F / HIL-N) and Behera et al. (arXiv 2304.11763). Each expert
is a fixed threshold theta_k: accept the edge answer when its max softmax p >= theta_k, else offload. Cost per
sample: beta for an offload, 1 for a wrong accepted answer.

Feedback is partial: an offloaded sample's cloud answer tells whether the edge answer was right; an accepted
one tells nothing. So (as in HIL-N) the policy
- samples its action from the experts' weights, plus a forced exploration eps_t ~ t^(-1/3) to offloading;
- charges every expert that would have offloaded beta (known without feedback) and every expert that would
  have accepted the importance-weighted estimate wrong / P(offload) when the sample was offloaded (0
  otherwise), an unbiased estimate of its real cost;
- updates the weights multiplicatively with eta_t ~ t^(-2/3), which gives O(T^(2/3)) expected regret.

Not every offload decision brings the cloud's answer back: the capacity rule may shed it (answered at the
edge, `device_agent.capacity`) or its reply may miss the deadline (fallback). The importance weight is then
P(offload) × the fraction of offload decisions answered so far, the running estimate of P(answer | offload):
with P(offload) alone, an overloaded cloud would make accepting look cheaper than it is, by that fraction.
A shed sample paid no offload: its own cost is the edge answer's, and it does not count as offloaded.

Separately from learning, it keeps the score in hindsight: with the label where the source knows it (else the
cloud's answer on offloaded samples), the cumulative cost of its own actions and of every fixed theta, and
reports regret = own cost - cost of the best fixed theta.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Dict, List, Optional, Union

import numpy as np

from device_agent.policies import (
    Action,
    Decision,
    EdgeView,
    Outcome,
    Policy,
    PolicyError,
    _edge_param,
    _unit_interval,
    register_policy,
)

logger = logging.getLogger(__name__)


@register_policy("hi-online")
class HiOnline(Policy):
    """Hedge over thetas. Params: beta (offload cost, in units of one wrong answer), grid (a number of evenly
    spaced thetas in [0, 1], or an explicit list), eta / explore (fixed rates instead of the t-decaying
    schedules), seed, edge ("main" or "cascade")."""

    def __init__(
        self,
        card: Any = None,
        beta: float = 0.5,
        grid: Union[int, List[float]] = 21,
        eta: Optional[float] = None,
        explore: Optional[float] = None,
        seed: int = 0,
        edge: str = "main",
    ) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise PolicyError(f"beta must be a non-negative number, got {beta!r}")
        self.beta = float(beta)
        if isinstance(grid, int) and not isinstance(grid, bool):
            if grid < 2:
                raise PolicyError(f"grid needs at least 2 thetas, got {grid}")
            thetas = np.linspace(0.0, 1.0, grid)
        elif isinstance(grid, list) and len(grid) >= 2:
            thetas = np.array(sorted(_unit_interval("grid value", g) for g in grid))
        else:
            raise PolicyError(f"grid must be an int >= 2 or a list of >= 2 thetas, got {grid!r}")
        self.thetas = thetas
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta <= 0):
            raise PolicyError(f"eta must be a positive number, got {eta!r}")
        self._eta = None if eta is None else float(eta)
        self._explore = None if explore is None else _unit_interval("explore", explore)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PolicyError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.edge = _edge_param(edge, ("main", "cascade"))
        self._rng = np.random.default_rng(seed)
        self._log_w = np.zeros(len(thetas))
        self._t = 0  # decisions taken
        self._updates = 0
        # Hindsight score (not used for learning).
        self._own_cost = 0.0
        self._expert_cost = np.zeros(len(thetas))
        self._scored = 0
        self._unscored = 0
        self._offloads = 0  # offloads sent (decided and not shed)
        self._shed = 0
        self._chose_offload = 0  # offload decisions settled ...
        self._answered = 0  # ... and those the cloud answered
        # The agent decides on its inference thread and settles offloads on the MQTT thread.
        self._lock = threading.Lock()

    # -- schedules --------------------------------------------------------------------------------
    def _explore_at(self, t: int) -> float:
        return self._explore if self._explore is not None else min(1.0, t ** (-1.0 / 3.0))

    def _eta_at(self, t: int) -> float:
        if self._eta is not None:
            return self._eta
        return math.sqrt(math.log(len(self.thetas))) * t ** (-2.0 / 3.0) / max(self.beta, 1.0)

    def weights(self) -> np.ndarray:
        w = np.exp(self._log_w - self._log_w.max())
        return w / w.sum()

    @property
    def theta(self) -> float:
        """The currently most trusted threshold."""
        return float(self.thetas[int(np.argmax(self._log_w))])

    # -- policy -----------------------------------------------------------------------------------
    def decide(self, view: EdgeView) -> Decision:
        p = view.confidence
        with self._lock:
            self._t += 1
            accept_mass = float(self.weights()[self.thetas <= p].sum())
            eps = self._explore_at(self._t)
            offload_prob = (1.0 - eps) * (1.0 - accept_mass) + eps
            offload = bool(self._rng.random() < offload_prob)
        return Decision(Action.OFFLOAD if offload else Action.EXIT, offload_prob=offload_prob)

    def observe(self, outcome: Outcome) -> None:
        view, decision = outcome.view, outcome.decision
        if view.prediction is None:
            raise PolicyError("hi-online needs an edge answer (edge='main' or 'cascade')")
        p = view.confidence
        chose_offload = decision.action is Action.OFFLOAD
        offloaded = chose_offload and not outcome.shed  # what it paid for
        would_offload = self.thetas > p
        with self._lock:
            self._offloads += int(offloaded)
            self._shed += int(chose_offload and outcome.shed)
            self._chose_offload += int(chose_offload)
            self._answered += int(chose_offload and outcome.cloud_prediction is not None)
            # Learning: only what the device can know (beta, and the cloud's answer when it offloaded).
            loss = np.where(would_offload, self.beta, 0.0)
            if offloaded and outcome.cloud_prediction is not None and decision.offload_prob:
                wrong = float(view.prediction != outcome.cloud_prediction)
                answer_rate = self._answered / self._chose_offload  # > 0: this one was answered
                loss[~would_offload] = wrong / (decision.offload_prob * answer_rate)
            self._updates += 1
            self._log_w -= self._eta_at(self._updates) * loss
            self._log_w -= self._log_w.max()  # keep exp() in range
            # Hindsight score.
            truth = outcome.label if outcome.label is not None else outcome.cloud_prediction
            if truth is None:
                self._unscored += 1
                return
            wrong_here = float(view.prediction != truth)
            self._scored += 1
            self._own_cost += self.beta if offloaded else wrong_here
            self._expert_cost += np.where(would_offload, self.beta, wrong_here)

    def params(self) -> Dict[str, Any]:
        return {
            "beta": self.beta,
            "grid": [round(float(t), 6) for t in self.thetas],
            "eta": self._eta,
            "explore": self._explore,
            "seed": self.seed,
            "edge": self.edge,
        }

    def report(self) -> Dict[str, Any]:
        with self._lock:
            best = int(np.argmin(self._expert_cost))
            return {
                "name": self.name,
                "params": self.params(),
                "theta": round(self.theta, 6),
                "decisions": self._t,
                "offload_fraction": self._offloads / self._updates if self._updates else 0.0,
                "shed": self._shed,
                "scored": self._scored,
                "unscored": self._unscored,
                "cost": self._own_cost,
                "best_fixed_theta": round(float(self.thetas[best]), 6),
                "best_fixed_cost": float(self._expert_cost[best]),
                "regret": self._own_cost - float(self._expert_cost[best]),
                "fixed_theta_costs": {f"{t:.3f}": float(c) for t, c in zip(self.thetas, self._expert_cost)},
            }
