"""A model directory -> one signed model version (`protocol.bundle`): what the operator publishes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from device_agent.card import CARD_FILE, load_card, sha256_file
from protocol.bundle import (
    DEFAULT_CHUNK_BYTES,
    FileEntry,
    Manifest,
    SignedManifest,
    check_version,
    key_id,
    public_raw,
    sha256_bytes,
    sign,
)

DEVICE_BLOCKS = ("main", "extension")  # what a device runs; the cloud block is the cloud worker's
EXTRA_FILES = ("MODEL_CARD.md",)


@dataclass(frozen=True)
class Bundle:
    """A signed version and its files' bytes (by name)."""

    signed: SignedManifest
    data: Dict[str, bytes]

    @property
    def version(self) -> str:
        return self.signed.manifest.version


def build_bundle(
    model_dir: Path,
    version: str,
    private_key: Any,
    *,
    include_cloud: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    notes: str = "",
) -> Bundle:
    """card.json, MODEL_CARD.md (if there) and the device's blocks of `model_dir`, signed as `version`.
    ValueError (ModelCardError) when the card does not load or a block does not match its sha256."""
    model_dir = Path(model_dir)
    card = load_card(model_dir)
    names = [CARD_FILE] + [n for n in EXTRA_FILES if (model_dir / n).is_file()]
    for block in (*DEVICE_BLOCKS, *(("cloud",) if include_cloud else ())):
        info = card.blocks.get(block)
        if info is None:
            raise ValueError(f"{model_dir}: the card lists no {block!r} block")
        path = card.block_path(block)
        if not path.is_file() or sha256_file(path) != info.sha256:
            raise ValueError(f"{path}: missing, or not the file whose sha256 the card names")
        names.append(info.file)
    data = {name: (model_dir / name).read_bytes() for name in names}
    manifest = Manifest(
        version=check_version(version),
        files=tuple(FileEntry(n, len(b), sha256_bytes(b)) for n, b in data.items()),
        chunk_bytes=int(chunk_bytes),
        created_unix=round(time.time(), 3),
        key_id=key_id(public_raw(private_key.public_key())),
        notes=notes,
    )
    return Bundle(sign(manifest, private_key), data)
