"""The offloaded inputs a cloud worker answered, kept for adaptation (`edgecascade adapt`); opt-in.

`edgecascade cloud --keep-inputs kept.db` keeps each answered classification offload — its tensor, the
cloud's prediction and confidence, device and time — in a SQLite file (stdlib sqlite3: one file an operator
can copy, query and delete, with no server), bounded by count and by age: each batch's insert also deletes
what is older than the age limit and the oldest beyond the count. Nothing leaves the worker; the inputs are
the fleet's data, so this is off unless asked for.

Runs as a `CloudWorker.observers` callback on the compute thread after the replies have left: one
transaction of one batch's rows (well under a millisecond for 32 images) that delays the next batch by that
much, not worth a thread of its own. The file is created readable by its owner only: it holds the fleet's
inputs.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

import numpy as np

from device_agent.rule import softmax

logger = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS = 20_000
DEFAULT_MAX_AGE_S = 24 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kept (
    id INTEGER PRIMARY KEY,
    ts_unix REAL NOT NULL,
    device_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    tensor BLOB NOT NULL,
    prediction INTEGER NOT NULL,
    confidence REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS kept_ts ON kept (ts_unix);
"""


@dataclass
class KeptSample:
    ts_unix: float
    device_id: str
    tensor: np.ndarray
    prediction: int  # the cloud's answer: the label an adaptation trains the edge on
    confidence: float  # the cloud's max-softmax


def _open(path: Union[str, Path]) -> sqlite3.Connection:
    connection = sqlite3.connect(str(path), check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(_SCHEMA)
    return connection


class InputKeeper:
    """Appends each answered batch to the SQLite file at `path` and applies the retention limits."""

    def __init__(
        self, path: Union[str, Path], max_items: int = DEFAULT_MAX_ITEMS, max_age_s: float = DEFAULT_MAX_AGE_S
    ) -> None:
        if max_items < 1 or not max_age_s > 0:
            raise ValueError(
                f"keep limits must be positive, got max_items={max_items}, max_age_s={max_age_s}"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        if not self.path.exists():
            self.path.touch(mode=0o600)
        self.max_items = max_items
        self.max_age_s = max_age_s
        self._db = _open(path)
        self._lock = threading.Lock()  # several compute streams may observe at once
        self.kept = 0
        self.failed = 0

    def observe(self, batch: Any) -> None:
        """A `CloudWorker` observer: `batch` is a `BatchServed` whose outputs are the classifier's logits."""
        outputs = batch.outputs
        if not isinstance(outputs, np.ndarray) or outputs.ndim != 2:
            return  # not a classifier's batch (e.g. REACT's detections): nothing to keep
        probs = softmax(outputs)
        now = time.time()
        rows = [
            (
                now,
                r.device_id,
                r.run_id,
                r.seq,
                str(r.tensor.dtype),
                ",".join(map(str, r.tensor.shape)),
                np.ascontiguousarray(r.tensor).tobytes(),
                int(p.argmax()),
                float(p.max()),
            )
            for r, p in zip(batch.requests, probs)
        ]
        try:
            with self._lock, self._db:
                self._db.executemany(
                    "INSERT INTO kept (ts_unix, device_id, run_id, seq, dtype, shape, tensor, prediction, "
                    "confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._db.execute("DELETE FROM kept WHERE ts_unix < ?", (now - self.max_age_s,))
                self._db.execute(
                    "DELETE FROM kept WHERE id <= (SELECT id FROM kept ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (self.max_items,),
                )
            self.kept += len(rows)
        except sqlite3.Error:  # a full disk must not stop the worker answering
            self.failed += len(rows)
            logger.exception("could not keep %d answered inputs in %s", len(rows), self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_kept(
    path: Union[str, Path], since_unix: Optional[float] = None, limit: Optional[int] = None
) -> List[KeptSample]:
    """The kept samples, oldest first (the newest `limit` of them, those after `since_unix`)."""
    return list(iter_kept(path, since_unix, limit))


def iter_kept(
    path: Union[str, Path], since_unix: Optional[float] = None, limit: Optional[int] = None
) -> Iterator[KeptSample]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no kept inputs at {path} (start the worker with --keep-inputs {path})")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        query = (
            "SELECT ts_unix, device_id, dtype, shape, tensor, prediction, confidence FROM ("
            "SELECT * FROM kept WHERE ts_unix >= ? ORDER BY id DESC LIMIT ?) ORDER BY id"
        )
        for ts, device, dtype, shape, blob, prediction, confidence in connection.execute(
            query, (since_unix or 0.0, -1 if limit is None else limit)
        ):
            dims = tuple(int(d) for d in shape.split(",") if d)
            yield KeptSample(
                ts, device, np.frombuffer(blob, dtype=dtype).reshape(dims), prediction, confidence
            )
    finally:
        connection.close()
