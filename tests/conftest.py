"""Shared fixtures: a private Mosquitto from the project's broker/ config, and a topic namespace per test."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from broker.launcher import BrokerProcess
from protocol.topics import Topics

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One Mosquitto for the whole session, started with broker/edgecascade.conf and .acl on a free port."""
    proc = BrokerProcess(tmp_path_factory.mktemp("broker"))
    proc.start()
    yield proc
    proc.close()


@pytest.fixture
def topics() -> Topics:
    """A topic root of this test's own, so tests never see each other's messages."""
    return Topics.namespaced(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir (main/extension/cloud.onnx, card.json) of tiny deterministic models (tinymodels.py)."""
    from tinymodels import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-models"))
