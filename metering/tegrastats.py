"""Jetson rails from `tegrastats --interval N`: a child process whose lines are parsed as they arrive.

Formats (the first number is the instantaneous power in mW, the second the running average):

- Nano (L4T 32):         ``POM_5V_IN 933/933 POM_5V_GPU 0/0 POM_5V_CPU 84/105``
- Orin Nano / NX:        ``VDD_IN 4968mW/4968mW VDD_CPU_GPU_CV 436mW/436mW VDD_SOC 1708mW/1708mW``
- AGX Orin (no VDD_IN):  ``VDD_GPU_SOC 3067mW/3067mW VDD_CPU_CV 766mW/766mW VIN_SYS_5V0 3720mW/3720mW ...``

Each sample is stamped with the monotonic time its line arrived (tegrastats' own timestamp has a resolution of
one second); the total follows `metering.jetson.total_rails`.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from typing import IO, Any, Dict, List, Optional, Sequence

from metering.common import MeterUnavailable, SampledPowerMeter
from metering.jetson import is_unconnected, total_rails

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 100
FIRST_LINE_TIMEOUT_S = 5.0
# NAME inst/avg with optional mW units, followed by a space or the end (so "RAM 2197/3956MB" never matches)
_RAIL = re.compile(r"(?<![\w@])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM", "LFB"})


def parse_line(line: str) -> Dict[str, float]:
    """Instantaneous watts per rail in one tegrastats line ({} when it has none)."""
    rails = {}
    for name, inst_mw, _avg_mw in _RAIL.findall(line):
        if name not in _NOT_RAILS and not is_unconnected(name):
            rails[name] = int(inst_mw) / 1000.0
    return rails


class TegrastatsMeter(SampledPowerMeter):
    """Rails parsed from a running `tegrastats --interval N` (N in ms)."""

    source = "tegrastats"

    def __init__(
        self,
        *,
        executable: str = "tegrastats",
        interval_ms: int = DEFAULT_INTERVAL_MS,
        total: Optional[Sequence[str]] = None,
        first_line_timeout_s: float = FIRST_LINE_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        path = shutil.which(executable)
        if path is None:
            raise MeterUnavailable(f"{executable!r} not found on PATH (it ships with L4T on Jetson only)")
        command = [path, "--interval", str(int(interval_ms))]
        stdbuf = shutil.which("stdbuf")
        if stdbuf is not None:  # line-buffer its stdout into our pipe, so each sample arrives when taken
            command = [stdbuf, "-oL", *command]
        try:
            self._proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as err:
            raise MeterUnavailable(f"cannot start {path}: {err}") from err
        self.bad_lines = 0
        stdout: IO[str] = self._proc.stdout  # type: ignore[assignment]
        try:
            first = self._first_rails(stdout, first_line_timeout_s)
            names = sorted(first)
            super().__init__(
                interval_s=interval_ms / 1000.0,
                rails=names,
                total_rails=total_rails(names, total),
                detail={"executable": path, "interval_ms": int(interval_ms)},
                **kwargs,
            )
        except BaseException:
            self._stop_process()
            raise
        self._ingest(self.clock(), first)
        self._reader = threading.Thread(
            target=self._read_lines, args=(stdout,), name="tegrastats", daemon=True
        )
        self._reader.start()

    def _first_rails(self, stdout: IO[str], timeout_s: float) -> Dict[str, float]:
        """Wait for the first line with rails (in a thread, so a silent tegrastats cannot hang us)."""
        box: List[Dict[str, float]] = []

        def first() -> None:
            for line in stdout:
                rails = parse_line(line)
                if rails:
                    box.append(rails)
                    return
                self.bad_lines += 1

        reader = threading.Thread(target=first, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not box:
            raise MeterUnavailable(f"tegrastats printed no power rails within {timeout_s:.0f} s")
        return box[0]

    def _read_lines(self, stdout: IO[str]) -> None:
        try:
            for line in stdout:
                rails = parse_line(line)
                if not rails:
                    self.bad_lines += 1
                    if self.bad_lines == 1:
                        logger.warning("tegrastats line without power rails (ignored): %r", line[:200])
                    continue
                self._ingest(self.clock(), rails)
        except (OSError, ValueError) as err:
            self._fail(f"reading tegrastats failed: {err}")
            return
        self._fail(f"tegrastats exited (code {self._proc.poll()})")

    def _stop_process(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def close(self) -> None:
        self._stop_process()
        if self._reader.is_alive():
            self._reader.join(timeout=2.0)


def open_tegrastats(options: Dict[str, Any], **kwargs: Any) -> TegrastatsMeter:
    """Factory for `open_meter`: options `tegrastats_path`, `tegrastats_interval_ms`, `jetson_total_rails`."""
    interval_ms = int(options.get("tegrastats_interval_ms", DEFAULT_INTERVAL_MS))
    if interval_ms <= 0:
        raise ValueError(f"tegrastats_interval_ms must be > 0, got {interval_ms}")
    return TegrastatsMeter(
        executable=str(options.get("tegrastats_path", "tegrastats")),
        interval_ms=interval_ms,
        total=options.get("jetson_total_rails"),
        **kwargs,
    )
