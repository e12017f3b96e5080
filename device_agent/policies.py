"""Offload policies: what to do with one sample once the edge has looked at it.

A policy sees an `EdgeView` (the edge outputs of one sample) and returns a `Decision`: exit here with the edge
answer, or offload to the cloud. Policies are chosen by name from configuration,
`{"name": "hi-threshold", "params": {"theta": 0.9}}`, through a registry that refuses duplicate names and
unknown parameters (unlike Sedna's, which silently overwrites). Thresholds default to the model card's values,
calibrated on a validation split.

`edge` says which edge outputs a policy needs, so the agent computes no more than that:
`none` (nothing runs on the device), `main` (the main block only), `cascade` (the full MEANet edge rule,
`EdgeCascade.decide`, whose verdict is `EdgeView.complex`) or `full` (the same with the extension ungated:
for a device that offloads nothing, where the card's extension gate would save nothing). Softmax, entropy
and the MEANet rule are `device_agent.rule`'s; policies only decide on what it computed.
"""

from __future__ import annotations

import enum
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

EDGE_NEEDS = ("none", "main", "cascade", "full")


class PolicyError(ValueError):
    """A policy name or parameter that cannot be used."""


class Action(enum.Enum):
    EXIT = "exit"
    OFFLOAD = "offload"


@dataclass
class EdgeView:
    """The edge's outputs for one sample, as far as the edge went.

    `stage` is where the view comes from: `none` (the device computed nothing), `main` (the main block), or
    `cascade` or `full` (the full edge rule; then `exit_stage` says whether main or extension gave the
    answer and `complex` is the cascade's offload verdict).
    """

    stage: str
    probs: Optional[np.ndarray] = None  # edge answer as a distribution over all classes
    prediction: Optional[int] = None
    exit_stage: Optional[str] = None  # "main" | "extension": the block whose answer `prediction` is
    p_main: Optional[float] = None
    p_ext: Optional[float] = None
    entropy: Optional[float] = None  # normalised, in [0, 1]
    complex: Optional[bool] = None
    seq: int = -1
    main_probs: Optional[np.ndarray] = (
        None  # the main block's softmax over all classes (`device_agent.drift`)
    )

    @property
    def confidence(self) -> float:
        """Max softmax of the edge answer (0 when there is no answer)."""
        return float(self.probs.max()) if self.probs is not None and self.probs.size else 0.0


@dataclass
class Decision:
    action: Action
    offload_prob: Optional[float] = None  # for randomised policies: P(offload) when deciding


@dataclass
class Outcome:
    """How a sample ended, fed back to the policy once it is settled."""

    view: EdgeView
    decision: Decision
    cloud_prediction: Optional[int] = None  # None: not offloaded, or no reply before the deadline
    label: Optional[int] = None  # ground truth when the source knows it (datasets); only for scoring
    # The decision was OFFLOAD but the capacity rule kept the sample at the edge (`device_agent.capacity`):
    # answered by the edge, no offload paid, no cloud answer to learn from.
    shed: bool = False


def _threshold(card: Any, key: str) -> Optional[float]:
    """A card threshold, whether the card is a ModelCard view or the plain card.json dict."""
    if card is None:
        return None
    thresholds = card.get("thresholds") if isinstance(card, dict) else getattr(card, "thresholds", None)
    if thresholds is None:
        return None
    value = thresholds.get(key) if isinstance(thresholds, dict) else getattr(thresholds, key, None)
    return None if value is None else float(value)


def _unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _edge_param(value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise PolicyError(f"edge must be one of {list(allowed)}, got {value!r}")
    return str(value)


class Policy:
    """Base class. Subclasses take their parameters as keyword arguments and implement `decide`."""

    name = ""
    edge = "main"

    def decide(self, view: EdgeView) -> Decision:
        raise NotImplementedError

    def observe(self, outcome: Outcome) -> None:
        """Called once per sample when it is settled (answered, exited, or fallen back). Default: nothing."""

    def params(self) -> Dict[str, Any]:
        """The effective parameters, card defaults filled in (recorded in the run record)."""
        return {}

    def report(self) -> Dict[str, Any]:
        """What the policy has to say at the end of a run (learned thresholds, regret...)."""
        return {"name": self.name, "params": self.params()}


P = TypeVar("P", bound=Type[Policy])
_REGISTRY: Dict[str, Type[Policy]] = {}


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator adding a policy to the registry under `name`; a second registration of a name fails."""

    def add(cls: P) -> P:
        if name in _REGISTRY:
            raise PolicyError(f"policy {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def policy_names() -> List[str]:
    return sorted(_REGISTRY)


def make_policy(spec: Dict[str, Any], card: Any = None) -> Policy:
    """Build a policy from `{"name": ..., "params": {...}}`; `card` supplies default thresholds."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise PolicyError(f'a policy is configured as {{"name": ..., "params": {{...}}}}, got {spec!r}')
    unknown_keys = set(spec) - {"name", "params"}
    if unknown_keys:
        raise PolicyError(f"policy spec has unknown keys {sorted(unknown_keys)}")
    name = spec["name"]
    cls = _REGISTRY.get(name)
    if cls is None:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise PolicyError(f"params of policy {name!r} must be a map, got {type(params).__name__}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "card")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise PolicyError(
            f"policy {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    policy = cls(card=card, **params)  # type: ignore[call-arg]
    logger.info("policy %s with %s", name, policy.params())
    return policy


@register_policy("edge-only")
class EdgeOnly(Policy):
    """Never offload: the edge cascade answers everything, its extension ungated (`edge="full"`: the card's
    gate saves the extension where the cloud would answer anyway; here nothing goes there), or gated
    (`edge="cascade"`), or the main block alone (`edge="main"`)."""

    def __init__(self, card: Any = None, edge: str = "full") -> None:
        self.edge = _edge_param(edge, ("main", "cascade", "full"))

    def decide(self, view: EdgeView) -> Decision:
        return Decision(Action.EXIT)

    def params(self) -> Dict[str, Any]:
        return {"edge": self.edge}


@register_policy("cloud-only")
class CloudOnly(Policy):
    """Offload everything. By default the device computes nothing (a deadline miss then has no answer, -1);
    `edge="main"` runs the main block too so that a deadline miss falls back to its answer."""

    def __init__(self, card: Any = None, edge: str = "none") -> None:
        self.edge = _edge_param(edge, ("none", "main"))

    def decide(self, view: EdgeView) -> Decision:
        return Decision(Action.OFFLOAD)

    def params(self) -> Dict[str, Any]:
        return {"edge": self.edge}


@register_policy("meanet")
class Meanet(Policy):
    """MEANet (Long et al., ICDCS 2021): main block, extension for hard classes, offload when the edge
    answer's normalised entropy exceeds the card's calibrated tau. The rule itself is `EdgeCascade.decide`."""

    edge = "cascade"

    def __init__(self, card: Any = None) -> None:
        self._card = card

    def decide(self, view: EdgeView) -> Decision:
        if view.complex is None:
            raise PolicyError("meanet needs the cascade's verdict (an EdgeView of stage 'cascade')")
        return Decision(Action.OFFLOAD if view.complex else Action.EXIT)

    def params(self) -> Dict[str, Any]:
        return {"entropy_tau": _threshold(self._card, "entropy_tau")}  # the card's, which EdgeCascade applies


def _required(value: Optional[float], what: str, card_key: str) -> float:
    if value is None:
        raise PolicyError(f"{what}: give it in params or use a model card with thresholds.{card_key}")
    return value


@register_policy("hi-threshold")
class HiThreshold(Policy):
    """Hierarchical Inference (Moothedath et al., arXiv 2304.00891): accept the edge answer when its max
    softmax is at least theta, else offload. theta defaults to the card's calibrated hi_theta."""

    def __init__(self, card: Any = None, theta: Optional[float] = None, edge: str = "main") -> None:
        theta = _threshold(card, "hi_theta") if theta is None else theta
        self.theta = _unit_interval("theta", _required(theta, "hi-threshold needs theta", "hi_theta"))
        self.edge = _edge_param(edge, ("main", "cascade"))

    def decide(self, view: EdgeView) -> Decision:
        return Decision(Action.EXIT if view.confidence >= self.theta else Action.OFFLOAD)

    def params(self) -> Dict[str, Any]:
        return {"theta": self.theta, "edge": self.edge}


@register_policy("entropy")
class EntropyFilter(Policy):
    """Sedna's CrossEntropy hard-example filter / DDNN's exit rule: offload when the normalised entropy
    η = −Σ p log p / log C of the edge answer exceeds tau (default: the card's entropy_tau)."""

    def __init__(self, card: Any = None, tau: Optional[float] = None, edge: str = "main") -> None:
        tau = _threshold(card, "entropy_tau") if tau is None else tau
        self.tau = _unit_interval("tau", _required(tau, "entropy needs tau", "entropy_tau"))
        self.edge = _edge_param(edge, ("main", "cascade"))

    def decide(self, view: EdgeView) -> Decision:
        entropy = view.entropy if view.entropy is not None else 1.0  # no edge answer: nothing to trust
        return Decision(Action.OFFLOAD if entropy > self.tau else Action.EXIT)

    def params(self) -> Dict[str, Any]:
        return {"tau": self.tau, "edge": self.edge}


# The online policy lives in its own module; importing it registers "hi-online".
from device_agent import hi_online as _hi_online  # noqa: E402,F401

__all__ = [
    "Action",
    "Decision",
    "EdgeView",
    "Outcome",
    "Policy",
    "PolicyError",
    "make_policy",
    "policy_names",
    "register_policy",
]
