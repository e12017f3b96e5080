"""The metering error family: OS and vendor errors are translated into these once, at each backend's edge."""

from __future__ import annotations


class MeterError(Exception):
    """Base of every metering error."""


class MeterUnavailable(MeterError):
    """This backend cannot run here (no hardware, no driver, no library, no service); try the next one."""


class MeterPermissionError(MeterUnavailable):
    """The counter exists but this process may not read it; the message names the fix."""


class MeterReadError(MeterError):
    """A meter that was working failed to read (sensor gone, sampler died, garbage value)."""


def translate_os_error(err: OSError, what: str) -> MeterError:
    """Map an OSError raised while touching `what` onto the meter error family."""
    if isinstance(err, PermissionError):
        return MeterPermissionError(f"permission denied reading {what}: {err}")
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return MeterUnavailable(f"{what} is not there: {err}")
    return MeterReadError(f"cannot read {what}: {err}")
