"""The model versions a device has installed from rollouts, on its own disk, and which one it serves.

Layout under `<state_dir>/models/`:
- `<version>/`: the model directory of a version (card.json, its blocks) and `manifest.json`, the signed
  manifest it came with (`protocol.bundle`), checked again when the agent starts from it;
- `current`: the version to serve after a restart (replaced atomically once a swap is done);
- `.partial-<version>/`: a download in progress, never served; removed when it fails or on the next start.

At most `keep` versions stay (the current one, the one it replaced, ...): device state is bounded.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from device_agent.card import CARD_FILE, sha256_file
from protocol.bundle import BundleError, SignedManifest, check_version, decode_signed

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "current"
PARTIAL_PREFIX = ".partial-"


def model_version_of(model_dir: Union[str, Path]) -> str:
    """The version id of a model directory: its manifest's, for one installed from a rollout, else the first
    12 hex digits of its card.json's sha256 (what the agent's metrics and `runs.model_sha256` name)."""
    model_dir = Path(model_dir)
    try:
        manifest = (model_dir / MANIFEST_FILE).read_bytes()
    except OSError:
        return sha256_file(model_dir / CARD_FILE)[:12]
    import json

    try:
        return check_version(json.loads(json.loads(manifest)["manifest"])["version"])
    except (ValueError, KeyError, TypeError):
        return sha256_file(model_dir / CARD_FILE)[:12]


class ModelStore:
    """Installed versions under `root`; used from the rollout's thread only (and at start)."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        if keep < 2:
            raise ValueError(f"a model store keeps at least 2 versions (current and previous), got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        for partial in self.root.glob(PARTIAL_PREFIX + "*"):  # a download a crash cut short
            shutil.rmtree(partial, ignore_errors=True)

    def path(self, version: str) -> Path:
        return self.root / check_version(version)

    def current(self, trusted_key: Any) -> Optional[Path]:
        """The installed version to serve, if there is one and it still verifies (logged when it does not)."""
        try:
            version = (self.root / CURRENT_FILE).read_text().strip()
        except OSError:
            return None
        try:
            path = self.path(version)
            signed = decode_signed((path / MANIFEST_FILE).read_bytes(), trusted_key)
            self._verify_files(path, signed)
        except (OSError, ValueError) as exc:  # BundleError and InvalidId are ValueErrors
            logger.error(
                "installed model version %r is unusable (%s): serving the configured model", version, exc
            )
            return None
        return path

    def start_partial(self, version: str) -> Path:
        partial = self.root / (PARTIAL_PREFIX + check_version(version))
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return partial

    def write_file(self, partial: Path, name: str, data: Any) -> None:
        with open(partial / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self, partial: Path, signed: SignedManifest) -> Path:
        """The complete download becomes `<version>/` (replacing an older copy of that version)."""
        self._verify_files(partial, signed)  # what is on disk, not only what arrived
        (partial / MANIFEST_FILE).write_bytes(signed.payload)
        final = self.path(signed.manifest.version)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        return final

    def discard(self, partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    def set_current(self, version: str) -> None:
        """`version` is what a restart serves; older versions beyond `keep` are removed."""
        tmp = self.root / (CURRENT_FILE + ".tmp")
        tmp.write_text(check_version(version) + "\n")
        os.replace(tmp, self.root / CURRENT_FILE)
        self._history_add(version)
        self._prune()

    def _history_add(self, version: str) -> None:
        history = [v for v in self.history() if v != version] + [version]
        tmp = self.root / "history.tmp"
        tmp.write_text("\n".join(history[-self.keep :]) + "\n")
        os.replace(tmp, self.root / "history")

    def history(self) -> List[str]:
        try:
            return [v for v in (self.root / "history").read_text().split() if v]
        except OSError:
            return []

    def _prune(self) -> None:
        kept = set(self.history())
        for path in self.root.iterdir():
            if path.is_dir() and not path.name.startswith(".") and path.name not in kept:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("removed model version %s (keeping %d)", path.name, self.keep)

    @staticmethod
    def _verify_files(path: Path, signed: SignedManifest) -> None:
        for entry in signed.manifest.files:
            file = path / entry.name
            size = file.stat().st_size
            if size != entry.size:
                raise BundleError(f"{entry.name}: {size} bytes on disk, the manifest says {entry.size}")
            if sha256_file(file) != entry.sha256:
                raise BundleError(f"{entry.name}: sha256 on disk differs from the manifest's")

    def sizes(self) -> Dict[str, int]:
        return {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in self.root.iterdir() if p.is_dir()}
