"""The adaptation loop's parts: the worker keeps what it answered (real broker, bounded), BatchNorm
adaptation, and a torch module rebuilt from its folded ONNX export."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tinymodels import tiny_images
from torch import nn
from waiting import wait_for

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.keep import InputKeeper, read_kept
from cloud_worker.probe import OffloadProbe
from protocol.topics import Topics
from training.adapt import adapt_batchnorm
from training.from_onnx import load_folded


@pytest.mark.integration
def test_the_worker_keeps_what_it_answered_bounded_by_count(
    broker: BrokerProcess, tiny_models: Path, tmp_path: Path
) -> None:
    topics = Topics.namespaced("keep")
    keeper = InputKeeper(tmp_path / "kept.db", max_items=25)
    worker = CloudWorker(WorkerConfig(broker.credentials("cloud"), topics, tiny_models, "w-keep"))
    worker.observers.append(keeper.observe)
    images = tiny_images(40, seed=3)
    with worker.start(), OffloadProbe(broker.credentials("dev-keep"), topics, "dev-keep") as probe:
        answers = [probe.request(images[i], seq=i).result(timeout=10).reply for i in range(40)]
        # The keeper observes a batch after its replies have left: a reply may arrive before its row.
        wait_for(lambda: keeper.kept == 40, 10, "every answered input kept")
    kept = read_kept(tmp_path / "kept.db")
    assert keeper.failed == 0
    assert len(kept) == 25  # the newest 25: the count bound held
    by_tensor = {images[i].tobytes(): answers[i] for i in range(40)}
    index = {images[i].tobytes(): i for i in range(40)}
    order = [index[k.tensor.tobytes()] for k in kept]  # an offload redelivered (QoS 1) is answered twice
    assert order == sorted(order) and order[-1] == 39 and order[0] >= 15  # the newest, in order
    for k in kept:
        assert k.tensor.dtype == np.uint8 and k.tensor.shape == (1, 28, 28)
        assert k.device_id == "dev-keep" and k.prediction == by_tensor[k.tensor.tobytes()].prediction
        assert 0.0 < k.confidence <= 1.0
    assert len(read_kept(tmp_path / "kept.db", limit=5)) == 5


def test_kept_inputs_older_than_the_age_limit_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "kept.db"
    keeper = InputKeeper(path, max_items=100, max_age_s=3600)
    keeper.observe(_served(2, seed=1))
    with sqlite3.connect(path) as db:  # as if written two hours ago
        db.execute("UPDATE kept SET ts_unix = ts_unix - 7200")
    keeper.observe(_served(3, seed=2))
    assert len(read_kept(path)) == 3
    assert len(read_kept(path, since_unix=time.time() - 60)) == 3
    with pytest.raises(FileNotFoundError, match="--keep-inputs"):
        read_kept(tmp_path / "none.db")
    with pytest.raises(ValueError, match="positive"):
        InputKeeper(path, max_items=0)


def _served(n: int, seed: int) -> object:
    from cloud_worker.worker import BatchServed
    from protocol.codec import OffloadRequest

    images = tiny_images(n, seed=seed)
    requests = [OffloadRequest("run-1", "dev-1", i, images[i]) for i in range(n)]
    logits = np.random.default_rng(seed).normal(size=(n, 10)).astype(np.float32)
    return BatchServed(n, 0.001, [0.0] * n, None, "none", requests, logits)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


class _UInt8(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


def test_batchnorm_adaptation_takes_the_traffics_statistics_mixed_by_count() -> None:
    model = _UInt8(_net())
    with torch.no_grad():  # give the model training statistics different from the traffic's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
    traffic = torch.from_numpy(tiny_images(64, seed=7))
    first_conv = model.net[0]
    with torch.no_grad():
        out = first_conv(traffic.float() / 255.0)
    mean, var = out.mean((0, 2, 3)), out.var((0, 2, 3), unbiased=True)
    adapted = adapt_batchnorm(model, traffic)
    bn = adapted.net[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert model.net[1].running_mean[0] == pytest.approx(0.3)  # the served model is not touched
    half = adapt_batchnorm(model, traffic, prior=64).net[1]  # N = n: halfway between the two
    assert torch.allclose(half.running_mean, (mean + 0.3) / 2, atol=1e-5)
    assert not adapted.training and all(not m.training for m in adapted.modules())


def test_a_module_rebuilt_from_its_folded_onnx_export_computes_the_same(tmp_path: Path) -> None:
    trained = _UInt8(_net())
    trained.train()
    with torch.no_grad():  # a few batches give its BatchNorms statistics of their own
        for seed in range(3):
            trained(torch.from_numpy(tiny_images(32, seed=seed)))
    trained.eval()
    path = tmp_path / "m.onnx"
    probe = torch.from_numpy(tiny_images(2, seed=9))
    torch.onnx.export(
        trained,
        (probe,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert "BatchNormalization" not in {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    fresh = _UInt8(_net())
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # nothing of the fresh module's own weights may survive
    clean = [torch.from_numpy(tiny_images(50, seed=20 + i)) for i in range(4)]
    rebuilt = load_folded(fresh, path, clean)
    x = torch.from_numpy(tiny_images(16, seed=11))
    (expected,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        assert np.abs(rebuilt(x).numpy() - expected).max() < 1e-4
    bn = rebuilt.net[1]
    with torch.no_grad():  # the statistics are the clean images' own, not placeholders
        conv_out = torch.cat([rebuilt.net[0](c.float() / 255.0) for c in clean])
    assert torch.allclose(bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-4)


def test_adapt_refuses_bad_arguments_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgecascade.cli import main

    out = tmp_path / "new"
    assert main(["adapt", "--kept", str(tmp_path / "none.db"), "--out", str(out)]) == 2
    assert "--keep-inputs" in capsys.readouterr().err  # how to make such a file
    assert main(["adapt", "--kept", str(tmp_path / "none.db"), "--out", str(out), "--holdout", "0"]) == 2
    assert "--holdout" in capsys.readouterr().err
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    assert main(["adapt", "--kept", str(tmp_path / "junk.db"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


@pytest.mark.integration
def test_edgecascade_cloud_keep_inputs_keeps_them_and_says_how_many(
    broker: BrokerProcess, tiny_models: Path, tmp_path: Path
) -> None:
    """`edgecascade cloud --keep-inputs` over the real broker; its last stats line counts what it kept."""
    import json
    import signal
    import subprocess
    import sys

    topics = Topics.namespaced("keepcli")
    password_file = tmp_path / "cloud.pw"
    password_file.write_text(broker.credentials("cloud").password + "\n")
    kept_db = tmp_path / "kept.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecascade", "cloud", "--broker", f"{broker.host}:{broker.port}"]
        + ["--user", "cloud", "--password-file", str(password_file), "--models", str(tiny_models)]
        + [
            "--worker-id",
            "w-keepcli",
            "--namespace",
            "keepcli",
            "--keep-inputs",
            str(kept_db),
            "--keep-max",
            "7",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "worker w-keepcli ready"
        images = tiny_images(12, seed=8)
        with OffloadProbe(broker.credentials("dev-keepcli"), topics, "dev-keepcli") as probe:
            for i in range(12):
                probe.request(images[i], seq=i).result(timeout=10)
        wait_for(lambda: kept_db.exists() and len(read_kept(kept_db)) == 7, 10, "the newest 7 kept")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    final = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0 and final["kept_inputs"] == 12 and final["keep_failed"] == 0
    assert kept_db.stat().st_mode & 0o777 == 0o600  # the fleet's inputs: its owner's only


def _perturbed(seed: int) -> nn.Module:
    """The small net with weights and BatchNorm parameters and statistics of its own."""
    model = _UInt8(_net())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=gen)).abs_()
    return model.eval()


def test_weight_space_ensembles_end_at_each_model_and_mix_the_folded_maps() -> None:
    from training.wise import choose, folded_maps, mix_folded, mix_states

    clean, robust = _perturbed(1), _perturbed(2)
    batches = [torch.from_numpy(tiny_images(40, seed=30 + i)) for i in range(3)]
    x = torch.from_numpy(tiny_images(16, seed=12))
    with torch.no_grad():
        for alpha, model in ((0.0, clean), (1.0, robust)):
            for mix in (
                mix_states(clean, robust, alpha, _UInt8(_net())),
                mix_folded(clean, robust, alpha, _UInt8(_net()), batches),
            ):
                assert torch.allclose(mix(x), model(x), atol=1e-4)
        half = mix_folded(clean, robust, 0.5, _UInt8(_net()), batches)
        for (w, b), (wa, ba), (wb, bb) in zip(folded_maps(half), folded_maps(clean), folded_maps(robust)):
            assert torch.allclose(w, (wa + wb) / 2, atol=1e-5) and torch.allclose(b, (ba + bb) / 2, atol=1e-4)
        assert not torch.allclose(half(x), clean(x), atol=1e-2)
        # measured statistics: the first BatchNorm's mean is its convolution's on the clean batches
        conv_out = torch.cat([half.net[0](c.float() / 255.0) for c in batches])
        assert torch.allclose(half.net[1].running_mean, conv_out.mean((0, 2, 3)), atol=1e-4)
    table = [{"alpha": a, "acc": acc} for a, acc in ((0.0, 0.90), (0.5, 0.89), (1.0, 0.86))]
    assert choose(table, ["acc"], 0.02)["alpha"] == 0.5 and choose(table, ["acc"], 0.0)["alpha"] == 0.0
