"""Synthetic but well-formed result records, for tests, the collector benchmark and report demos.

Deterministic for a given seed. The numbers are plausible (an offloaded sample costs more latency and bytes,
the cloud is more accurate) but made up: nothing here is a measurement.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

from protocol.records import InferenceRecord, validate_record

NUM_CLASSES = 10


def run_record(
    run_id: str,
    device_id: str,
    *,
    policy: str = "meanet",
    dataset: str = "fashion-mnist",
    model_sha256: str = "0" * 64,
    started_unix: float = 1_700_000_000.0,
) -> Dict[str, Any]:
    return validate_record(
        {
            "type": "run",
            "run_id": run_id,
            "device_id": device_id,
            "policy": policy,
            "policy_params": {"tau": 0.31},
            "profile": "x86",
            "dataset": dataset,
            "split": "test",
            "model_sha256": model_sha256,
            "code_revision": "synthetic",
            "host": {"machine": "x86_64", "cores": 2},
            "started_unix": started_unix,
        }
    )


def run_end_record(run_id: str, device_id: str, samples: int, ended_unix: float) -> Dict[str, Any]:
    return validate_record(
        {
            "type": "run_end",
            "run_id": run_id,
            "device_id": device_id,
            "ended_unix": ended_unix,
            "samples": samples,
        }
    )


def inference_records(
    run_id: str,
    device_id: str,
    count: int,
    *,
    start_seq: int = 0,
    offload_fraction: float = 0.25,
    fallback_fraction: float = 0.02,
    shed_fraction: float = 0.0,
    gateway_fraction: float = 0.0,
    edge_accuracy: float = 0.85,
    cloud_accuracy: float = 0.95,
    device_j: Optional[float] = 0.01,
    energy_source: Optional[str] = None,
    ts_start: float = 1_700_000_000.0,
    ts_step: float = 0.01,
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """`count` inference records with sequence numbers from `start_seq`; `energy_source` defaults to
    `estimate` (`none` without joules): say `rapl` to make a run that looks metered."""
    rng = random.Random(f"{run_id}/{device_id}/{seed}/{start_seq}")
    out = []
    for seq in range(start_seq, start_seq + count):
        label = rng.randrange(NUM_CLASSES)
        draw = rng.random()
        if draw < fallback_fraction:
            stage = "fallback"
        elif draw < offload_fraction:
            stage = "cloud"
        elif draw < offload_fraction + shed_fraction:  # never drawn at 0: earlier seeds stay as they were
            stage = "shed"
        elif draw < offload_fraction + shed_fraction + gateway_fraction:  # likewise
            stage = "gateway"
        else:
            stage = "main" if rng.random() < 0.7 else "extension"
        offloaded = stage in ("cloud", "fallback", "gateway")
        accurate = rng.random() < (cloud_accuracy if stage == "cloud" else edge_accuracy)
        edge_ms = round(rng.uniform(0.5, 2.0) * (1.6 if stage == "extension" else 1.0), 3)
        gross = None if device_j is None else device_j * (1.5 if stage == "extension" else 1.0)
        record = InferenceRecord(
            run_id=run_id,
            device_id=device_id,
            seq=seq,
            prediction=label if accurate else (label + 1) % NUM_CLASSES,
            exit_stage=stage,
            edge_ms=edge_ms,
            label=label,
            p_main=round(rng.uniform(0.3, 1.0), 4),
            p_ext=round(rng.uniform(0.3, 1.0), 4) if stage != "main" else None,
            p_cloud=round(rng.uniform(0.5, 1.0), 4) if stage == "cloud" else None,
            network_ms=round(rng.uniform(0.4, 3.0), 3) if offloaded else None,
            cloud_ms=round(rng.uniform(1.0, 4.0), 3) if stage == "cloud" else None,
            bytes_up=840 if offloaded else 0,
            bytes_down=120 if stage == "cloud" else 0,
            device_j_gross=gross,
            device_j_net=None if gross is None else gross * 0.6,
            device_j_analytic=None if gross is None else gross * 0.5,
            cloud_j=0.05 if stage == "cloud" else None,
            energy_source=energy_source or ("estimate" if gross is not None else "none"),
            ts_unix=ts_start + seq * ts_step,
        )
        out.append(record.to_record())
    return out


def energy_window_record(run_id: str, device_id: str, window_seq: int, start_unix: float) -> Dict[str, Any]:
    return validate_record(
        {
            "type": "energy_window",
            "run_id": run_id,
            "device_id": device_id,
            "window_seq": window_seq,
            "source": "estimate",
            "rails": {"package-0": 0.32},
            "start_unix": start_unix,
            "end_unix": start_unix + 0.32,
            "samples": 32,
            "meter_samples": 4,
            "idle_w": 0.4,
            "gross_j": 0.32,
            "net_j": 0.19,
        }
    )


def idle_baseline_record(run_id: str, device_id: str, measured_unix: float) -> Dict[str, Any]:
    return validate_record(
        {
            "type": "idle_baseline",
            "run_id": run_id,
            "device_id": device_id,
            "source": "estimate",
            "rails": {"package-0": 0.4},
            "duration_s": 5.0,
            "idle_w": 0.4,
            "measured_unix": measured_unix,
        }
    )


def full_run(
    run_id: str,
    device_id: str,
    count: int,
    *,
    policy: str = "meanet",
    seed: int = 0,
    policy_params: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> List[Dict[str, Any]]:
    """A whole run as a device would publish it: run, idle baseline, inferences, windows, run_end."""
    start = 1_700_000_000.0
    run = run_record(run_id, device_id, policy=policy, started_unix=start)
    if policy_params is not None:
        run = dict(run, policy_params=policy_params)
    records = [
        run,
        idle_baseline_record(run_id, device_id, start - 5.0),
    ]
    records += inference_records(run_id, device_id, count, seed=seed, ts_start=start, **kwargs)
    records += [
        energy_window_record(run_id, device_id, w, start + w * 0.32) for w in range((count + 31) // 32)
    ]
    records.append(run_end_record(run_id, device_id, count, start + count * 0.01))
    return records
