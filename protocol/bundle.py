"""Signed model bundles: the manifest of one model version, its ed25519 signature, and its files' chunks.

A model version is a model directory (card.json + the ONNX blocks, `device_agent.card`) plus a manifest:
the version id, each file's name, size and sha256, and the chunk size the files travel in. The operator
signs the manifest's exact bytes with an ed25519 key (`cryptography`); a device that trusts the matching
public key checks the signature first, then every file's size and sha256 as it arrives, and refuses anything
that does not match (`BundleError`, whose message is the one log line a refusal gets).

On the wire (topics in `protocol.topics`):
- the signed manifest, retained on `Topics.model_manifest(group)`: JSON `{"v": 1, "manifest": "<the
  manifest's JSON text>", "signature": "<base64>"}`; the signature covers the UTF-8 bytes of that text, so
  nothing is re-serialised before checking it;
- each file, retained, in chunks of `chunk_bytes` on `Topics.model_chunk(sha256, index)` (raw bytes): the
  broker's packet limit is 4 MiB, model files are 0.2-5 MB. Files are addressed by content, so two versions
  (or groups) sharing a file share its chunks.

Every limit is checked before anything is allocated. Python >= 3.8; `cryptography` is in the device extra.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, List, Tuple

from protocol.codec import ProtocolError
from protocol.ids import check_name

BUNDLE_VERSION = 1
CONTENT_TYPE_MANIFEST = "application/vnd.edgecascade.model-manifest+json;v=1"
MODEL_VERSION_MAX = 64  # the results table's model_version column (migration 0007)
MAX_FILES = 16
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_BUNDLE_BYTES = 128 * 1024 * 1024
MAX_MANIFEST_BYTES = 16 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024  # under the broker's max_packet_size with topic and header
DEFAULT_CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class BundleError(ProtocolError):
    """A manifest, signature or file that a device must refuse; the message says why, in one line."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a model version, as its manifest lists it."""

    name: str
    size: int
    sha256: str

    def chunks(self, chunk_bytes: int) -> int:
        return max(1, math.ceil(self.size / chunk_bytes))

    def chunk_size(self, index: int, chunk_bytes: int) -> int:
        """The exact length chunk `index` must have (the last one is the rest; an empty file: one empty)."""
        return max(0, min(chunk_bytes, self.size - index * chunk_bytes))


@dataclass(frozen=True)
class Manifest:
    """What the operator signs: one model version."""

    version: str
    files: Tuple[FileEntry, ...]
    chunk_bytes: int
    created_unix: float
    key_id: str  # which key signed it (`key_id`), so that a refusal can say "signed by another key"
    notes: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> str:
        """The canonical text that is signed (sorted keys, no spaces)."""
        body = {
            "v": BUNDLE_VERSION,
            "version": self.version,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
            "chunk_bytes": self.chunk_bytes,
            "created_unix": self.created_unix,
            "key_id": self.key_id,
            "notes": self.notes,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with its signature, as it travels; `payload` is the exact message (republished as is)."""

    manifest: Manifest
    text: str
    signature: bytes
    payload: bytes

    @property
    def digest(self) -> str:
        """sha256 of the message: tells two publications of one version apart."""
        return hashlib.sha256(self.payload).hexdigest()


def check_version(value: object) -> str:
    """A model version id: the identifier rule of `protocol.ids`, at most 64 characters."""
    return check_name(value, "model version", MODEL_VERSION_MAX)


def check_file_name(value: object) -> str:
    """A file name of a bundle: one path component under the identifier rule (no '/', no leading dot)."""
    return check_name(value, "bundle file name", 128)


def key_id(public_raw: bytes) -> str:
    """Short id of an ed25519 public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def public_raw(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(manifest: Manifest, private_key: Any) -> SignedManifest:
    """Sign `manifest` with an `Ed25519PrivateKey`; its `key_id` must be that key's."""
    if manifest.key_id != key_id(public_raw(private_key.public_key())):
        raise ValueError("the manifest's key_id is not the signing key's")
    text = manifest.to_json()
    signature = private_key.sign(text.encode("utf-8"))
    body = {"v": BUNDLE_VERSION, "manifest": text, "signature": base64.b64encode(signature).decode()}
    payload = json.dumps(body, separators=(",", ":")).encode()
    return SignedManifest(manifest, text, signature, payload)


def decode_signed(payload: bytes, trusted_key: Any) -> SignedManifest:
    """Check the signature with `trusted_key` (an `Ed25519PublicKey`), then the manifest; BundleError."""
    from cryptography.exceptions import InvalidSignature

    if len(payload) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest message of {len(payload)} bytes, at most {MAX_MANIFEST_BYTES}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"manifest message is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != BUNDLE_VERSION:
        raise BundleError(f"manifest message is not version {BUNDLE_VERSION}")
    text, signature_b64 = body.get("manifest"), body.get("signature")
    if not isinstance(text, str) or not isinstance(signature_b64, str):
        raise BundleError("manifest message lacks its manifest text or signature")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        raise BundleError("manifest signature is not base64") from None
    try:
        trusted_key.verify(signature, text.encode("utf-8"))
    except InvalidSignature:
        signer = _claimed_key(text)
        trusted = key_id(public_raw(trusted_key))
        who = f"signed by key {signer}" if signer and signer != trusted else "altered after signing"
        raise BundleError(
            f"bad signature: the manifest is {who}, not signed by trusted key {trusted}"
        ) from None
    return SignedManifest(parse_manifest(text), text, signature, bytes(payload))


def parse_unverified(payload: bytes) -> Manifest:
    """The manifest in a signed message without checking its signature: for the operator's own listings
    (`edgecascade models status`), never for a decision on a device."""
    try:
        text = json.loads(payload)["manifest"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BundleError(f"not a signed manifest message: {exc}") from None
    return parse_manifest(text)


def _claimed_key(text: str) -> str:
    try:
        data = json.loads(text)
        return str(data.get("key_id", "")) if isinstance(data, dict) else ""
    except ValueError:
        return ""


def parse_manifest(text: str) -> Manifest:
    """The manifest in `text`, every field and limit checked; BundleError."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != BUNDLE_VERSION:
            raise BundleError(f"manifest is not version {BUNDLE_VERSION}")
        files_in = data["files"]
        if not isinstance(files_in, list) or not 0 < len(files_in) <= MAX_FILES:
            raise BundleError(f"a manifest lists 1 to {MAX_FILES} files")
        files: List[FileEntry] = []
        for item in files_in:
            size, digest = item["size"], item["sha256"]
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
                raise BundleError(f"file size {size!r} is not 0..{MAX_FILE_BYTES} bytes")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise BundleError(f"file sha256 {digest!r} is not 64 lowercase hex digits")
            files.append(FileEntry(check_file_name(item["name"]), size, digest))
        chunk = data["chunk_bytes"]
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 < chunk <= MAX_CHUNK_BYTES:
            raise BundleError(f"chunk_bytes {chunk!r} is not 1..{MAX_CHUNK_BYTES}")
        manifest = Manifest(
            version=check_version(data["version"]),
            files=tuple(files),
            chunk_bytes=chunk,
            created_unix=float(data["created_unix"]),
            key_id=str(data["key_id"]),
            notes=str(data.get("notes", "")),
        )
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError) as exc:  # InvalidId is a ValueError
        raise BundleError(f"manifest field missing or malformed: {exc}") from None
    names = [f.name for f in manifest.files]
    if len(set(names)) != len(names):
        raise BundleError(f"manifest lists a file twice: {names}")
    if manifest.total_bytes > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle of {manifest.total_bytes} bytes, at most {MAX_BUNDLE_BYTES}")
    return manifest


def chunk_index(topic: str) -> Tuple[str, int]:
    """(sha256, index) from a chunk topic `.../<sha256>/<index>`; BundleError."""
    parts = topic.rsplit("/", 2)
    if len(parts) != 3 or not _SHA256.match(parts[1]) or not parts[2].isdigit() or len(parts[2]) > 6:
        raise BundleError(f"not a model chunk topic: {topic!r}")
    return parts[1], int(parts[2])


def sha256_bytes(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()
