"""The HTTP peer of the benchmark (`bench.http_baseline`): its two clients answer alike, and Sedna's opens a
connection per hard example and sends the image as JSON, as Sedna's own client does."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import tiny_images

from bench.http_baseline import CloudHTTPServer, run_http_peer
from device_agent.cascade import EdgeCascade


def test_sedna_style_client_opens_a_connection_per_hard_sample_and_gets_the_same_answers(
    tiny_models: Path,
) -> None:
    cascade = EdgeCascade(tiny_models)
    images = tiny_images(40, seed=3)
    samples = [(image, None) for image in images]
    records, connections = {}, {}
    with CloudHTTPServer(tiny_models / "cloud.onnx", ["CPUExecutionProvider"], 1) as server:
        for style in ("keepalive", "sedna"):
            before = server.connections
            run = run_http_peer(cascade, samples, server.url, run_id=style, device_id="d", style=style)
            records[style], connections[style] = run.records, server.connections - before
    kept, sedna = records["keepalive"], records["sedna"]
    offloaded = [i for i, r in enumerate(kept) if r.exit_stage == "cloud"]
    assert offloaded, "the tiny cascade sent nothing to the cloud: nothing compared"
    assert [r.exit_stage for r in sedna] == [r.exit_stage for r in kept]
    assert [r.prediction for r in sedna] == [r.prediction for r in kept]  # same image, same answer
    assert connections == {"keepalive": 1, "sedna": len(offloaded)}
    # JSON lists of numbers are several times the raw bytes (784 for a 28x28 image).
    assert all(sedna[i].bytes_up > 2 * kept[i].bytes_up == 2 * images[i].size for i in offloaded)


def test_an_unknown_client_style_is_refused(tiny_models: Path) -> None:
    with pytest.raises(ValueError, match="style"):
        run_http_peer(EdgeCascade(tiny_models), [], ("127.0.0.1", 1), run_id="r", device_id="d", style="grpc")
