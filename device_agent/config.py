"""`AgentConfig` and device profiles (bench/profiles/*.toml) for the agent."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from device_agent.capacity import SHED_ABOVE
from device_agent.drift import DriftSettings
from device_agent.rollout import RolloutSettings
from protocol.ids import check_device_id, check_run_id
from protocol.mqtt import BrokerAddress
from protocol.topics import Topics

if sys.version_info >= (3, 11):
    import tomllib
else:  # the device extra installs tomli on older Pythons
    import tomli as tomllib

# Where `--profile x86` looks when given a name rather than a file.
PROFILE_DIR = Path(__file__).resolve().parent.parent / "bench" / "profiles"


@dataclass(frozen=True)
class AgentConfig:
    """Everything a `DeviceAgent` needs; `apply_profile` fills the hardware-specific part from a profile.

    Validated when built and never changed after (`dataclasses.replace` builds a new, validated one)."""

    device_id: str
    broker: BrokerAddress
    topics: Topics = field(default_factory=Topics)
    model_dir: Path = Path("models/fashion-mnist")
    policy: Dict[str, Any] = field(default_factory=lambda: {"name": "meanet", "params": {}})
    state_dir: Path = Path("state")
    run_id: Optional[str] = None
    providers: List[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: Optional[int] = None  # onnxruntime intra-op threads; None = its default
    model_cache_dir: Optional[Path] = None  # optimised graphs / TensorRT engines
    meters: List[str] = field(default_factory=lambda: ["rapl", "estimate"])
    meter_options: Dict[str, Any] = field(default_factory=dict)
    idle_seconds: float = 5.0
    window_size: int = 32  # inferences per energy window
    window_max_s: float = 1.0  # ... and at most this long open (what a SIGKILL can lose: see settlement)
    max_inflight: int = 64  # offloads awaiting a reply
    offload_deadline_s: float = 2.0  # then the edge answer is used, flagged `fallback`
    # Capacity-aware offloading (device_agent.capacity): an offload that would come back too late, or beyond
    # the operator's budget, is answered at the edge at once, flagged `shed`. False: every offload goes.
    capacity_aware: bool = True
    shed_above: float = SHED_ABOVE  # shed when the predicted round trip exceeds this fraction of the deadline
    offload_budget_per_s: Optional[float] = None  # at most this many offloads a second (None: no budget)
    offload_budget_burst: Optional[float] = None  # ... saved up to this many (None: one second's worth)
    # Back off offloading while the cloud is not more sure than the edge on what is offloaded
    # (device_agent.safety): offload decisions then answered at the edge, flagged `shed`, but a probe share.
    cloud_watch: bool = False
    # Drift detection (device_agent.drift) against the card's reference, where it has one. None: off.
    drift: Optional[DriftSettings] = DriftSettings()
    # Model rollouts (device_agent.rollout): the device group whose signed manifest it follows. None: off.
    rollout: Optional[RolloutSettings] = None
    results_batch: int = 100  # result records per MQTT message
    flush_s: float = 0.2  # a partial batch of records waits at most this long
    results_receipts: bool = True  # keep records until the collector has stored them (False: the broker)
    receipt_timeout_s: float = 30.0  # a batch PUBACKed but not receipted this long is sent again
    dataset: str = "fashion-mnist"
    split: str = "test"
    profile: str = "x86"
    session_expiry_s: int = 3600  # how long the broker keeps our reply subscription while we are away
    connect_timeout_s: float = 10.0  # start() waits this long for the broker, then runs on from the outbox
    close_timeout_s: float = 30.0  # close() waits this long for offloads and records to drain
    outbox_max_entries: int = 200_000
    outbox_max_bytes: int = 512 * 1024 * 1024
    outbox_wait_s: Optional[float] = 300.0  # how long the loop waits for room in a full outbox, then fails

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        check_device_id(self.device_id)
        if self.run_id is not None:
            check_run_id(self.run_id)
        for name in (
            "window_size",
            "max_inflight",
            "results_batch",
            "outbox_max_entries",
            "outbox_max_bytes",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("offload_deadline_s", "flush_s", "receipt_timeout_s", "window_max_s"):
            check_positive(name, getattr(self, name))
        for name in ("idle_seconds", "connect_timeout_s", "close_timeout_s"):
            check_positive(name, getattr(self, name), zero=True)
        if self.outbox_wait_s is not None:
            check_positive("outbox_wait_s", self.outbox_wait_s, zero=True)
        if not isinstance(self.shed_above, (int, float)) or not 0 < self.shed_above <= 1:
            raise ValueError(
                f"shed_above must be a fraction of the deadline in (0, 1], got {self.shed_above!r}"
            )
        if self.offload_budget_per_s is not None:
            check_positive("offload_budget_per_s", self.offload_budget_per_s)
            if not self.capacity_aware:  # the rule holds the budget: off, it would be ignored
                raise ValueError("offload_budget_per_s needs capacity_aware")
        if self.offload_budget_burst is not None:
            if self.offload_budget_per_s is None:
                raise ValueError("offload_budget_burst needs offload_budget_per_s")
            check_positive("offload_budget_burst", self.offload_budget_burst)
            if self.offload_budget_burst < 1:
                raise ValueError(
                    f"offload_budget_burst must be at least 1, got {self.offload_budget_burst!r}"
                )
        if self.drift is not None and not isinstance(self.drift, DriftSettings):
            raise ValueError(f"drift must be DriftSettings or None, got {self.drift!r}")
        if self.rollout is not None and not isinstance(self.rollout, RolloutSettings):
            raise ValueError(f"rollout must be RolloutSettings or None, got {self.rollout!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads!r}")


def check_positive(name: str, value: Any, zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with `zero`): NaN and infinity are refused too."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}")


def load_profile(profile: Union[str, Path]) -> Dict[str, Any]:
    """A profile by file path, or by name from bench/profiles/ (`x86`, `jetson`, ...)."""
    path = Path(profile)
    if not path.suffix and not path.exists():
        path = PROFILE_DIR / f"{profile}.toml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.toml")) if PROFILE_DIR.is_dir() else []
        raise FileNotFoundError(f"no device profile {profile!r} (known: {', '.join(known) or 'none'})")
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    data.setdefault("device", {}).setdefault("name", path.stem)
    return data


def apply_profile(config: AgentConfig, profile: Dict[str, Any]) -> AgentConfig:
    """A copy of `config` with the profile's device, metering and agent settings."""
    device = profile.get("device", {})
    metering = profile.get("metering", {})
    agent = profile.get("agent", {})
    changes: Dict[str, Any] = {"profile": str(device.get("name", config.profile))}
    if "providers" in device:
        changes["providers"] = list(device["providers"])
    if device.get("intra_op_threads"):
        changes["threads"] = int(device["intra_op_threads"])
    if device.get("trt_engine_cache"):
        changes["model_cache_dir"] = Path(device["trt_engine_cache"])
    if "backends" in metering:
        changes["meters"] = list(metering["backends"])
    if "idle_seconds" in metering:
        changes["idle_seconds"] = float(metering["idle_seconds"])
    changes["meter_options"] = {
        **{k: v for k, v in metering.items() if k not in ("backends", "idle_seconds")},
        **config.meter_options,
    }
    for name, kind in (
        ("window_size", int),
        ("max_inflight", int),
        ("offload_deadline_s", float),
        ("results_batch", int),
        ("capacity_aware", _boolean),
        ("cloud_watch", _boolean),
        ("shed_above", float),
        ("offload_budget_per_s", float),
        ("offload_budget_burst", float),
    ):
        if name in agent:
            changes[name] = kind(agent[name])
    drift = drift_settings(config.drift, agent)
    if drift is not config.drift:
        changes["drift"] = drift
    return dataclasses.replace(config, **changes)


DRIFT_KEYS = {
    "drift_window": "window",
    "drift_stride": "stride",
    "drift_alpha": "alpha",
    "drift_horizon": "horizon",
}


def drift_settings(current: Optional[DriftSettings], options: Dict[str, Any]) -> Optional[DriftSettings]:
    """`current` with a profile's or config file's `drift` (true/false) and `drift_<setting>` keys applied."""
    if "drift" in options and not _boolean(options["drift"]):
        return None
    changes = {field: options[key] for key, field in DRIFT_KEYS.items() if options.get(key) is not None}
    if not changes and not options.get("drift"):
        return current
    return dataclasses.replace(current or DriftSettings(), **changes)


def _boolean(value: Any) -> bool:
    """A TOML boolean; `bool("false")` would be True, so a quoted one is refused, not guessed."""
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value
