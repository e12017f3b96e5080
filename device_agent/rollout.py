"""Model rollout on the device: follow a group's signed manifest, download, verify, install, offer a swap.

`ModelRollout` reads the retained manifest of the agent's device group (`Topics.model_manifest`), checks
its ed25519 signature against the trusted public key of the device's config, subscribes to the files'
chunks (`Topics.model_chunks`, QoS 1), checks every chunk's length and every file's sha256, installs the
version in the `ModelStore`, builds the new model off the inference thread (`prepare`, the agent's) and
offers it to the agent, which swaps it in between two samples (`DeviceAgent`). Anything that does not
verify is refused with one log line, counted (`stats["refused"]`, by reason in `refusals`), and the model
being served keeps serving. A refused manifest is not tried again until a new one is published (or the
agent restarts).

All the work happens on one thread of its own: paho's thread only queues what arrives, and the inference
thread only swaps. `AgreementTracker` is the device's rolling agreement with the cloud, per version, which
the status topic carries (`protocol.status.ModelStatus`) for the operator's canary watch.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

from device_agent.model_store import ModelStore
from protocol.bundle import BundleError, FileEntry, SignedManifest, chunk_index, decode_signed, sha256_bytes
from protocol.ids import check_name
from protocol.status import Agreement, ModelStatus
from protocol.topics import Topics

logger = logging.getLogger(__name__)

STOP = object()
REMEMBERED = 256


def load_public_key(path: Path) -> Any:
    """The ed25519 public key in a PEM file (`edgecascade models keygen` writes one); ValueError otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the trusted model key {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"the trusted model key {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"the trusted model key {path} is not an ed25519 key")
    return key


@dataclass(frozen=True)
class RolloutSettings:
    """Which group's manifest the device follows and whose signature it trusts. Validated when built."""

    group: str
    trusted_key: Path
    download_timeout_s: float = 120.0  # a version whose files have not all arrived by then is refused
    keep_versions: int = 3  # installed versions kept on disk (current, previous, one more)
    public_key: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_name(self.group, "device group")
        object.__setattr__(self, "trusted_key", Path(self.trusted_key))
        timeout = self.download_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
            raise ValueError(f"download_timeout_s must be a finite number > 0, got {timeout!r}")
        if timeout <= 0:
            raise ValueError(f"download_timeout_s must be a finite number > 0, got {timeout!r}")
        if int(self.keep_versions) < 2:
            raise ValueError(f"keep_versions must be at least 2, got {self.keep_versions!r}")
        if self.public_key is None:
            object.__setattr__(self, "public_key", load_public_key(self.trusted_key))


class AgreementTracker:
    """Rolling agreement of the cloud's answers with the edge's, over the last `window` offloads answered by
    the version served now (answers for a version swapped out are not counted). Thread-safe."""

    def __init__(self, version: str, window: int = 200) -> None:
        self.version = version
        self.previous: Optional[Agreement] = None
        self._window: Deque[bool] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self.changes = 0  # bumped on every change: the status is republished when it moved

    def observe(self, version: Optional[str], agreed: bool) -> None:
        with self._lock:
            if version != self.version:
                return
            self._window.append(agreed)
            self.changes += 1

    def swapped(self, version: str) -> None:
        with self._lock:
            self.previous = self._snapshot()
            self.version = version
            self._window.clear()
            self.changes += 1

    def current(self) -> Agreement:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> Agreement:
        n = len(self._window)
        return Agreement(self.version, sum(self._window) / n if n else None, n)


class _Download:
    """The files of one manifest as their chunks arrive (in memory: at most the manifest's bundle size)."""

    def __init__(self, signed: SignedManifest, partial: Path, timeout_s: float) -> None:
        self.signed = signed
        self.partial = partial
        self.deadline = time.monotonic() + timeout_s
        chunk = signed.manifest.chunk_bytes
        self.by_sha: Dict[str, List[FileEntry]] = {}
        for entry in signed.manifest.files:
            self.by_sha.setdefault(entry.sha256, []).append(entry)
        self.buffers = {sha: bytearray(es[0].size) for sha, es in self.by_sha.items()}
        self.missing = {sha: set(range(es[0].chunks(chunk))) for sha, es in self.by_sha.items()}
        for sha, entries in self.by_sha.items():
            if entries[0].size == 0:  # an empty file has no chunk to wait for
                self.missing[sha] = set()

    @property
    def version(self) -> str:
        return self.signed.manifest.version

    def received_bytes(self) -> int:
        chunk = self.signed.manifest.chunk_bytes
        return sum(
            es[0].size - sum(es[0].chunk_size(i, chunk) for i in self.missing[sha])
            for sha, es in self.by_sha.items()
        )


class ModelRollout:
    """The device side of rollouts for one agent (see the module docstring).

    `prepare(model_dir)` builds what the agent serves from an installed version (raises if it cannot);
    `offer(prepared)` hands it to the agent, which calls `swapped(version)` once it serves it."""

    def __init__(
        self,
        settings: RolloutSettings,
        state_dir: Path,
        topics: Topics,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.store = ModelStore(Path(state_dir) / "models", settings.keep_versions)
        self.serving = ""  # the version the agent serves (`attach`, then `swapped`)
        self._offered: Optional[str] = None  # a version offered to the agent and not swapped in yet
        self.agreement = AgreementTracker("")
        self.stats: Dict[str, int] = {"manifests": 0, "installed": 0, "swaps": 0, "refused": 0}
        self.refusals: collections.Counter = collections.Counter()  # by reason
        # Manifests (by digest) refused: not tried again (the newest REMEMBERED of them).
        self._refused: Dict[str, None] = {}
        self._queue: queue.Queue = queue.Queue()
        self._download: Optional[_Download] = None
        self._link: Any = None
        self._thread: Optional[threading.Thread] = None
        self.prepare: Optional[Callable[[Path], Any]] = None
        self.offer: Optional[Callable[[Any], None]] = None

    def startup_dir(self, configured: Path) -> Path:
        """The model directory to start with: the installed current version when it verifies."""
        return self.store.current(self.settings.public_key) or Path(configured)

    def attach(
        self,
        link: Any,
        agreement: AgreementTracker,
        serving: str,
        prepare: Callable[[Path], Any],
        offer: Callable[[Any], None],
    ) -> None:
        """Before the link starts: read the group's manifest on it; start the rollout's thread."""
        self._link, self.agreement, self.serving = link, agreement, serving
        self.prepare, self.offer = prepare, offer
        link.listen(self.topics.model_manifest(self.settings.group), self._arrived("manifest"))
        self._thread = threading.Thread(target=self._run, name="model-rollout", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(STOP)
            self._thread.join(10)

    def swapped(self, version: str) -> None:
        """The inference thread now serves `version` (its first sample is being answered by it)."""
        self._queue.put(("swapped", version, b""))

    def status(self) -> ModelStatus:
        return ModelStatus(
            self.settings.group, self.agreement.current(), self.agreement.previous, self.stats["refused"]
        )

    # -- the rollout's thread -------------------------------------------------------------------------
    def _arrived(self, kind: str) -> Callable[[str, bytes], None]:
        return lambda topic, payload: self._queue.put((kind, topic, payload))  # paho's thread: no work

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is STOP:
                break
            try:
                if item is not None:
                    kind, topic, payload = item
                    if kind == "manifest":
                        self._on_manifest(payload)
                    elif kind == "chunk":
                        self._on_chunk(topic, payload)
                    elif kind == "swapped":
                        self._on_swapped(topic)
                self._check_deadline()
            except Exception:  # a bug here must not end rollouts for good; the served model is unaffected
                logger.exception("model rollout step failed")
        if self._download is not None:
            self._abandon(self._download)

    def _on_manifest(self, payload: bytes) -> None:
        if not payload:
            return  # the retained manifest was cleared: keep serving what we serve
        digest = sha256_bytes(payload)
        if digest in self._refused:
            return  # (a reconnect delivers the retained manifest again)
        try:
            signed = decode_signed(payload, self.settings.public_key)
        except BundleError as exc:
            self._refuse(digest, "?", "signature" if "signature" in str(exc) else "manifest", str(exc))
            return
        version = signed.manifest.version
        self.stats["manifests"] += 1
        # What the agent will serve once what it was offered is swapped in: a rollback that comes between
        # an offer and its swap is offered in turn (it replaces the offer, or swaps straight back).
        if version == (self._offered or self.serving):  # e.g. a rollback while the bad one still downloads
            if self._download is not None:
                self._abandon(self._download)
            return
        if self._download is not None:
            if self._download.signed.digest == digest:
                return
            logger.warning("model version %s replaces the download of %s", version, self._download.version)
            self._abandon(self._download)
        installed = self.store.path(version)
        if (installed / "manifest.json").exists() and self._same_manifest(installed, signed):
            self._install_done(digest, installed, signed)  # already on disk (a rollback): no download
            return
        names = [f.name for f in signed.manifest.files]
        if "card.json" not in names:
            self._refuse(digest, version, "manifest", f"the bundle has no card.json (files: {names})")
            return
        download = _Download(signed, self.store.start_partial(version), self.settings.download_timeout_s)
        self._download = download
        logger.info(
            "downloading model version %s (%d files, %d bytes)",
            version,
            len(names),
            signed.manifest.total_bytes,
        )
        for sha in download.by_sha:
            self._link.subscribe(self.topics.model_chunks(sha), self._arrived("chunk"))
        self._maybe_complete(download)

    def _same_manifest(self, installed: Path, signed: SignedManifest) -> bool:
        try:
            on_disk = decode_signed((installed / "manifest.json").read_bytes(), self.settings.public_key)
        except (OSError, BundleError):
            return False
        return on_disk.manifest.files == signed.manifest.files

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        download = self._download
        if download is None or not payload:  # late chunks of a finished download; a cleared retained chunk
            return
        try:
            sha, index = chunk_index(topic)
        except BundleError:
            return
        entries = download.by_sha.get(sha)
        if entries is None or index not in download.missing[sha]:
            return  # another file's, or a chunk already taken (QoS 1 may deliver twice)
        entry, chunk = entries[0], download.signed.manifest.chunk_bytes
        if index >= entry.chunks(chunk) or len(payload) != entry.chunk_size(index, chunk):
            self._fail(
                download,
                "truncated",
                f"{entry.name}: chunk {index} of {entry.chunks(chunk)} has {len(payload)} bytes, "
                f"{entry.chunk_size(index, chunk)} expected",
            )
            return
        start = index * chunk
        download.buffers[sha][start : start + len(payload)] = payload
        download.missing[sha].discard(index)
        if not download.missing[sha]:
            self._file_complete(download, sha)
        self._maybe_complete(download)

    def _file_complete(self, download: _Download, sha: str) -> None:
        data = download.buffers.pop(sha)
        self._link.unsubscribe(self.topics.model_chunks(sha))
        if sha256_bytes(data) != sha:
            names = ", ".join(e.name for e in download.by_sha[sha])
            self._fail(download, "tampered", f"{names}: sha256 differs from the signed manifest's")
            return
        for entry in download.by_sha[sha]:
            self.store.write_file(download.partial, entry.name, data)

    def _maybe_complete(self, download: _Download) -> None:
        if self._download is not download or any(download.missing.values()):
            return
        for sha in list(download.buffers):  # empty files
            self._file_complete(download, sha)
        if self._download is not download:
            return
        self._download = None
        try:
            installed = self.store.finish(download.partial, download.signed)
        except (OSError, BundleError) as exc:
            self.store.discard(download.partial)
            self._refuse(download.signed.digest, download.version, "tampered", str(exc))
            return
        self.stats["installed"] += 1
        self._install_done(download.signed.digest, installed, download.signed)

    def _install_done(self, digest: str, installed: Path, signed: SignedManifest) -> None:
        assert self.prepare is not None and self.offer is not None
        try:
            prepared = self.prepare(installed)
        except Exception as exc:  # whatever stops a model from loading must refuse it, not end the agent
            self._refuse(digest, signed.manifest.version, "unusable", f"{type(exc).__name__}: {exc}")
            return
        self.offer(prepared)
        self._offered = signed.manifest.version

    def _on_swapped(self, version: str) -> None:
        was, self.serving = self.serving, version
        if self._offered == version:
            self._offered = None
        self.stats["swaps"] += 1
        try:
            self.store.set_current(version)
        except (OSError, ValueError) as exc:  # serving it anyway; a restart falls back to the one before
            logger.error("could not record model version %s as current: %s", version, exc)
        logger.warning("now serving model version %s (was %s)", version, was)

    def _check_deadline(self) -> None:
        download = self._download
        if download is not None and time.monotonic() > download.deadline:
            total = download.signed.manifest.total_bytes
            self._fail(
                download,
                "incomplete",
                f"{download.received_bytes()} of {total} bytes arrived within "
                f"{self.settings.download_timeout_s:g} s (truncated or not published)",
            )

    def _fail(self, download: _Download, reason: str, why: str) -> None:
        self._abandon(download)
        self._refuse(download.signed.digest, download.version, reason, why)

    def _abandon(self, download: _Download) -> None:
        for sha in download.by_sha:
            self._link.unsubscribe(self.topics.model_chunks(sha))
        self.store.discard(download.partial)
        if self._download is download:
            self._download = None

    def _refuse(self, digest: str, version: str, reason: str, why: str) -> None:
        _remember(self._refused, digest)
        self.stats["refused"] += 1
        self.refusals[reason] += 1
        logger.error(
            "refused model version %s for group %s (%s): %s; still serving %s",
            version,
            self.settings.group,
            reason,
            why,
            self.serving,
        )


def _remember(seen: Dict[str, None], digest: str) -> None:
    seen[digest] = None
    while len(seen) > REMEMBERED:
        del seen[next(iter(seen))]
