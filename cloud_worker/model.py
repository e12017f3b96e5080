"""The cloud model on onnxruntime: a batch of samples in, logits out (contract: `cloud.onnx`, one input with
fixed non-batch dims — `image` uint8 for the classification cascade, `window` int16 for fault detection — and
an output `logits`).

The one wrapper of the cloud block: the worker, the HTTP peer of the benchmark, training's publish step and
the model checks all open it here, with the same session options (no spinning: see `CloudSession`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from video.providers import usable_providers

logger = logging.getLogger(__name__)

CLOUD_FILE = "cloud.onnx"
# onnxruntime's input types -> numpy: the inputs a cloud model may take (each also travels: protocol.codec)
_ONNX_DTYPES = {"tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(float)": "float32"}


class ModelError(RuntimeError):
    """The cloud model cannot be loaded (missing file, hash mismatch, no usable provider, bad I/O)."""


def resolve_model(path: Union[str, Path]) -> Tuple[Path, Optional[str]]:
    """A model dir (its card's cloud block, else `cloud.onnx`) or an .onnx file -> (file, expected sha256)."""
    path = Path(path)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise ModelError(f"cloud model {path} does not exist (train it with `edgecascade train`)")
    card = path / "card.json"
    if card.exists():
        try:
            block = json.loads(card.read_text(encoding="utf-8"))["blocks"]["cloud"]
            return path / str(block["file"]), str(block["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model card {card} has no usable blocks.cloud entry: {exc}") from exc
    return path / CLOUD_FILE, None


class CloudSession:
    """One onnxruntime session of the cloud model with its fixed per-sample input shape."""

    def __init__(
        self,
        model_path: Union[str, Path],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: Optional[int] = None,
        spin: bool = False,
    ) -> None:
        import onnxruntime as ort  # heavy; only a running worker needs it

        self.path, expected_sha = resolve_model(model_path)
        if not self.path.exists():
            raise ModelError(f"cloud model file {self.path} does not exist")
        data = self.path.read_bytes()
        if expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
            raise ModelError(f"{self.path} does not match the sha256 in its card: retrain or re-export")
        try:
            usable = usable_providers(providers, ort.get_available_providers())
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            # onnxruntime's pool busy-waits after each run by default, holding cores that the worker's own
            # network thread (and often the broker) need between batches; measured in bench/offload_bench.py.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session: Any = ort.InferenceSession(data, sess_options=opts, providers=usable)
        self.providers: List[str] = self._session.get_providers()
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].type not in _ONNX_DTYPES:
            raise ModelError(
                f"{self.path}: expected one input of {sorted(_ONNX_DTYPES)}, got "
                f"{[(i.name, i.type) for i in inputs]}"
            )
        self.input_name = str(inputs[0].name)
        self.input_dtype = np.dtype(_ONNX_DTYPES[inputs[0].type])
        dims = inputs[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise ModelError(f"{self.path}: non-batch input dims must be fixed, got {dims}")
        self.input_shape: Tuple[int, ...] = tuple(int(d) for d in dims)
        self.sample_bytes = int(np.prod(self.input_shape)) * self.input_dtype.itemsize
        outputs = [o.name for o in self._session.get_outputs()]
        if "logits" not in outputs:
            raise ModelError(f"{self.path}: no `logits` output (has {outputs})")

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits [N, num_classes] for a batch [N, *input_shape] of the input's dtype."""
        (out,) = self._session.run(["logits"], {self.input_name: images})
        return np.asarray(out, dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """First runs allocate arenas and pick kernels; do it before announcing readiness."""
        for n in batch_sizes:
            self.logits(np.zeros((n, *self.input_shape), dtype=self.input_dtype))
