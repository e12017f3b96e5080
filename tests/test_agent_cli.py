"""`edgecascade agent`: help, refusals with a clear message, and a real run on the Fashion-MNIST IDX files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from device_agent.capacity import SHED_REASONS
from device_agent.sources import find_dataset_dir
from edgecascade.cli import main
from protocol.topics import Topics


def test_help_shows_usage_and_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["agent", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--broker",
        "--policy-params",
        "dataset:NAME:SPLIT[:N]",
        "dir:PATH",
        "examples:",
        "hi-online",
        "--shed-above",
        "--offload-budget",
        "--no-capacity",
    ):
        assert text in out


def test_capacity_flags_build_the_config_and_win_over_the_profile(tmp_path: Path) -> None:
    import argparse

    from device_agent.cli import add_arguments, build_config, parse_source

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--broker", "127.0.0.1:1", "--device-id", "cam-01", "--source", "dataset:fashion-mnist:test"]

    def config(*extra: str):
        args = parser.parse_args([*base, *extra])
        return build_config(args, *parse_source(args.source))

    default = config("--profile", "x86")
    assert (default.capacity_aware, default.shed_above, default.offload_budget_per_s) == (True, 0.4, None)
    tuned = config("--shed-above", "0.3", "--offload-budget", "5", "--offload-budget-burst", "10")
    assert (tuned.shed_above, tuned.offload_budget_per_s, tuned.offload_budget_burst) == (0.3, 5.0, 10.0)
    assert not config("--no-capacity").capacity_aware
    with pytest.raises(ValueError, match="shed_above"):
        config("--shed-above", "2")
    with pytest.raises(ValueError, match="needs capacity_aware"):
        config("--no-capacity", "--offload-budget", "5")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source", "webcam:0"], "--source must be dataset:NAME:SPLIT[:N], dir:PATH, mqtt, file:PATH"),
        (["--source", "camera:front"], "camera:N takes a device index"),
        (["--source", "file:/nonexistent/clip.mp4"], "OpenCV cannot open video source"),
        (["--source", "mqtt", "--input-queue", "0"], "--input-queue must be at least 1"),
        (["--source", "mqtt", "--metrics-port", "70000"], "--metrics-port must be in 0..65535"),
        (["--source", "dataset:fashion-mnist:test", "--policy", "best"], "unknown policy 'best'"),
        (["--source", "dataset:fashion-mnist:test", "--policy-params", "[1]"], "must be a JSON object"),
        (["--source", "dataset:fashion-mnist:test", "--policy-params", "{oops"], "Expecting property name"),
        (["--source", "dir:/nonexistent/inbox"], "is not a directory"),
        (
            ["--source", "dataset:fashion-mnist:test", "--profile", "mainframe"],
            "no device profile 'mainframe'",
        ),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(extra, message, tmp_path: Path, capsys) -> None:
    code = main(
        ["agent", "--broker", "127.0.0.1:1", "--device-id", "cam-01", "--state-dir", str(tmp_path), *extra]
    )
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.integration
def test_a_dataset_run_prints_its_summary(
    broker: BrokerProcess, tiny_models: Path, tmp_path: Path, capsys
) -> None:
    try:
        find_dataset_dir("fashion-mnist")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
    topics = Topics.namespaced("clitest")
    creds = broker.credentials("cli-cam")
    password = tmp_path / "pw"
    password.write_text(creds.password + "\n")
    worker = CloudWorker(WorkerConfig(broker.credentials("cloud"), topics, tiny_models / "cloud.onnx", "cli"))
    worker.start()
    start_at = time.time() + 1.0  # connected and loaded, it waits for this before its first sample
    try:
        code = main(
            [
                "agent",
                "--start-at", str(start_at),
                "--broker", f"{creds.host}:{creds.port}",
                "--device-id", "cli-cam",
                "--password-file", str(password),
                "--models", str(tiny_models),
                "--policy", "hi-threshold",
                "--policy-params", '{"theta": 0.5}',
                "--source", "dataset:fashion-mnist:test:40",
                "--state-dir", str(tmp_path / "state"),
                "--namespace", "clitest",
                "--profile", "x86",
                "--idle-seconds", "0",
                "--no-receipts",  # no collector here: records leave the outbox on the broker's PUBACK
                "--no-progress",
            ]
        )  # fmt: skip
    finally:
        worker.stop()
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert time.time() - summary["seconds"] >= start_at  # the samples all came after the start time
    assert summary["samples"] == 40 and summary["labelled"] == 40 and summary["failed"] == 0
    assert summary["policy_report"]["params"] == {"theta": 0.5, "edge": "main"}
    # Capacity-aware by default: the worker's published load may shed some (its slow start), each counted.
    assert set(summary["exits"]) <= {"main", "cloud", "shed"} and summary["fallbacks"] == 0
    assert summary["exits"].get("cloud", 0) == summary["offload_stats"]["answered"]
    shed_by = summary["capacity"]
    assert (
        summary["shed"] == summary["exits"].get("shed", 0) == sum(shed_by[f"shed_{r}"] for r in SHED_REASONS)
    )
    assert summary["outbox_left"] == {"record": 0, "offload": 0}
    assert (tmp_path / "state" / "outbox-cli-cam.sqlite").exists()
